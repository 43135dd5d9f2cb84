"""The web server: settings from flags and environment, the engine, our owner-checked media routes,
and the Gradio UI mounted on one FastAPI app served by uvicorn.

Media (images, rendered videos, exports) is served only by /media/... routes that name the user
from the identity cookie (app/identity.py) and ask the engine, which answers "not found" for another
user's session or image: the route then says 404, exactly as for a missing one. Gradio itself serves
no file of ours: handlers return HTML with these URLs, `allowed_paths` stays empty and the data
directory is a blocked path. Uploads are capped by `max_file_size` before our checks run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import sys

from fastapi import FastAPI, HTTPException, Request  # module level: FastAPI resolves route annotations here
from fastapi.responses import FileResponse, Response

log = logging.getLogger("worldsim.app")
MAX_UPLOAD = "20mb"  # = worldsim.media.MAX_UPLOAD_BYTES


@dataclasses.dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 7860
    checkpoint: str | None = None
    database_url: str | None = None
    redis_url: str | None = None
    device: str = "cpu"
    data_dir: str = "data"
    workers: int = 1
    image_size: str = "auto"
    concurrency: int = 4
    queue_size: int = 64
    max_jobs_per_user: int = 2


def parse_args(argv=None, environ=None) -> Settings:
    """Flags win over environment variables, which win over the defaults."""
    env = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="python app.py", description="Worldsim: the browser UI (Gradio 6).")
    p.add_argument("--host", default=env.get("WORLDSIM_HOST", "127.0.0.1"), help="address to listen on (WORLDSIM_HOST)")
    p.add_argument("--port", type=int, default=int(env.get("WORLDSIM_PORT", 7860)), help="port (WORLDSIM_PORT)")
    p.add_argument("--checkpoint", default=env.get("WORLDSIM_CHECKPOINT"),
                   help="model folder, official or ours (WORLDSIM_CHECKPOINT); default: assets/demo if present, "
                        "else the debug preset with random weights")
    p.add_argument("--database-url", default=env.get("DATABASE_URL"),
                   help="SQL store (DATABASE_URL); default: SQLite in the data directory")
    p.add_argument("--redis-url", default=env.get("REDIS_URL"), help="Redis for hot state (REDIS_URL); default: none")
    p.add_argument("--device", default=env.get("WORLDSIM_DEVICE", "cpu"), help="torch device (WORLDSIM_DEVICE)")
    p.add_argument("--data-dir", default=env.get("WORLDSIM_DATA_DIR", "data"),
                   help="SQLite file, rendered videos, UI secret (WORLDSIM_DATA_DIR)")
    p.add_argument("--workers", type=int, default=int(env.get("WORLDSIM_WORKERS", 1)),
                   help="in-process model workers; 0 leaves jobs to `python -m worldsim worker` (WORLDSIM_WORKERS)")
    p.add_argument("--image-size", default=env.get("WORLDSIM_IMAGE_SIZE", "auto"),
                   help="default image size in tokens, HxW or auto (WORLDSIM_IMAGE_SIZE)")
    p.add_argument("--concurrency", type=int, default=int(env.get("WORLDSIM_CONCURRENCY", 4)),
                   help="model-work events running at once, all tabs and users together (WORLDSIM_CONCURRENCY)")
    p.add_argument("--queue-size", type=int, default=int(env.get("WORLDSIM_QUEUE_SIZE", 64)),
                   help="events waiting beyond that before new ones are refused (WORLDSIM_QUEUE_SIZE)")
    p.add_argument("--max-jobs-per-user", type=int, default=int(env.get("WORLDSIM_MAX_JOBS_PER_USER", 2)),
                   help="unfinished generations one user may have (WORLDSIM_MAX_JOBS_PER_USER)")
    a = p.parse_args(argv)
    from app.checks import parse_size

    try:
        parse_size(a.image_size)
    except ValueError as e:
        p.error(f"--image-size: {e}")
    for name in ("port", "concurrency", "queue_size", "max_jobs_per_user"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(a, name)}")
    if a.workers < 0:
        p.error(f"--workers: must be 0 or more, got {a.workers}")
    return Settings(**vars(a))


def ui_secret(data_dir: str) -> str:
    """The key gr.BrowserState encrypts with, kept in the data directory so it survives restarts
    (WORLDSIM_UI_SECRET overrides it, e.g. for several app processes without a shared disk)."""
    if os.environ.get("WORLDSIM_UI_SECRET"):
        return os.environ["WORLDSIM_UI_SECRET"]
    path = os.path.join(data_dir, "ui-secret")
    if not os.path.exists(path):
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        os.replace(path + ".tmp", path)
    with open(path) as f:
        return f.read().strip()


def model_note(engine) -> str:
    name = getattr(engine.runtime, "name", "") if engine.runtime is not None else "external workers"
    if "random weights" in name:
        return ("**Model: the `debug` preset with random weights.** Everything works, but the text is gibberish "
                "and the images are noise until a trained checkpoint is installed (assets/demo, or `--checkpoint`).")
    return f"Model: `{name}`."


def sizes(engine, image_size: str) -> tuple[int, int]:
    """(largest square side the model allows, default side for the Image tab), in tokens."""
    from app.checks import parse_size

    if engine.runtime is not None:
        cap = engine.runtime.max_image_side()
        side = engine.runtime.default_image_size(1024 * 1024)[0]
    else:
        cap, side = 99, 64
    size = parse_size(image_size)
    return cap, (max(size) if size else side)


def create_app(engine, settings: Settings):
    """FastAPI app: /media routes + the Gradio UI at /, wrapped in the identity-cookie middleware."""
    import gradio as gr

    from app import render, ui
    from app.handlers import Handlers
    from app.identity import IdentityCookie, NoIdentity, user_of
    from worldsim import export as wexport
    from worldsim.store import NotFound

    os.makedirs(settings.data_dir, exist_ok=True)
    max_side, default_side = sizes(engine, settings.image_size)
    handlers = Handlers(engine, settings.data_dir, max_jobs_per_user=settings.max_jobs_per_user,
                        max_side=max_side, default_side=default_side)
    demo = ui.build(handlers, title="Worldsim", model_note=model_note(engine), secret=ui_secret(settings.data_dir),
                    concurrency=settings.concurrency, default_size=settings.image_size)
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=1)

    api = FastAPI(title="Worldsim", docs_url=None, redoc_url=None, openapi_url=None)

    def owner(request: Request) -> str:
        try:
            return user_of(request)
        except NoIdentity:
            raise HTTPException(404) from None

    private = {"Cache-Control": "private, max-age=3600"}

    @api.get("/media/image/{digest}.png")
    def media_image(digest: str, request: Request):
        user = owner(request)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise HTTPException(404)
        try:
            png = engine.image(user, digest)
        except NotFound:
            if uploaded_for_pending_job(user, digest):
                png = engine.store.get_image(digest)["png"]
            else:
                try:
                    png = engine.image(user, digest)  # its job may have committed in between
                except NotFound:
                    raise HTTPException(404) from None
        return Response(png, media_type="image/png", headers=private)

    def uploaded_for_pending_job(user: str, digest: str) -> bool:
        """An upload is in the user's sessions only once its turn commits; while the job runs, the
        page already shows it (the engine has no call for this; its store lists unfinished jobs)."""
        return any(digest in ((j["payload"] or {}).get("input") or {}).get("images", [])
                   for j in engine.store.unfinished_jobs() if j["owner"] == user)

    @api.get("/media/video/{session_id}.mp4")
    def media_video(session_id: str, request: Request):
        user = owner(request)
        try:
            engine.show(user, session_id)
        except (NotFound, ValueError):
            raise HTTPException(404) from None
        path = handlers.video_path(user, session_id)
        if not os.path.isfile(path):
            raise HTTPException(404)
        return FileResponse(path, media_type="video/mp4", headers={"Cache-Control": "private, no-cache"})

    @api.get("/media/export/{session_id}.{fmt}")
    def media_export(session_id: str, fmt: str, request: Request):
        user = owner(request)
        if fmt not in wexport.FORMATS:
            raise HTTPException(404)
        try:
            session = engine.show(user, session_id)
            data = wexport.export(session, fmt, lambda h: engine.image(user, h))
        except (NotFound, ValueError):
            raise HTTPException(404) from None
        media = {"json": "application/json", "html": "text/html; charset=utf-8", "zip": "application/zip"}[fmt]
        name = f"worldsim-{session['mode']}-{session_id[:8]}.{fmt}"
        return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"',
                                                         "Cache-Control": "private, no-cache"})

    app = gr.mount_gradio_app(api, demo, path="/", allowed_paths=[], blocked_paths=[os.path.abspath(settings.data_dir)],
                              max_file_size=MAX_UPLOAD, show_error=False, footer_links=["api", "gradio"],
                              css=render.CSS, theme=gr.themes.Soft())
    return IdentityCookie(app)


def main(argv=None) -> int:
    settings = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import uvicorn

    from worldsim.engine import Engine

    engine = Engine.open(data_dir=settings.data_dir, database_url=settings.database_url,
                         redis_url=settings.redis_url, checkpoint=settings.checkpoint, device=settings.device,
                         workers=settings.workers)
    try:
        app = create_app(engine, settings)
        print(f"Worldsim UI on http://{settings.host}:{settings.port}  (data: {os.path.abspath(settings.data_dir)})",
              flush=True)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
