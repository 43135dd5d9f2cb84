"""`python -m worldsim`: the engine from the command line, for scripting and robotics teams.

Every subcommand prints JSON on stdout; a failure prints {"error": ..., "kind": ...} and exits
non-zero (1 for bad input or a failed job, 2 for bad usage). Common options on every subcommand:
--user, --data-dir, --database-url, --redis-url (or WORLDSIM_DATA_DIR, DATABASE_URL, REDIS_URL),
--checkpoint, --device, --workers (in-process model workers: 1 by default, 0 to leave jobs to
`python -m worldsim worker` processes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


class JsonArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        print(json.dumps({"error": message, "kind": "usage"}))
        sys.exit(2)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", default=os.environ.get("WORLDSIM_USER", "local"))
    p.add_argument("--data-dir", default=os.environ.get("WORLDSIM_DATA_DIR", "data"))
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    p.add_argument("--checkpoint", default=os.environ.get("WORLDSIM_CHECKPOINT"))
    p.add_argument("--device", default=os.environ.get("WORLDSIM_DEVICE", "cpu"))
    p.add_argument("--workers", type=int, default=1, help="in-process model workers (0: external workers only)")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for a job")


def _size(text: str) -> list[int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected HxW in tokens (e.g. 16x16), got {text!r}")
    return [int(parts[0]), int(parts[1])]


def build_parser() -> argparse.ArgumentParser:
    parser = JsonArgumentParser(prog="python -m worldsim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=JsonArgumentParser)

    p = sub.add_parser("new", help="create a session and run its first turn")
    p.add_argument("--mode", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--image", action="append", default=[], help="an input image file (x2i: up to 3)")
    p.add_argument("--arm")
    p.add_argument("--goal")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=_size, help="HxW in tokens (default: the task's area, capped at the model's; in the shape of the session's first uploaded image, else square)")
    p.add_argument("--max-steps", type=int, help="howto: most steps in the guide")
    p.add_argument("--title")
    p = sub.add_parser("step", help="one instruction turn")
    p.add_argument("session")
    p.add_argument("--instruction", default="")
    p.add_argument("--image", action="append", default=[])
    p = sub.add_parser("auto", help="free exploration: N turns on the model's own")
    p.add_argument("session")
    p.add_argument("--steps", type=int, required=True)
    for name, help_ in (("show", "a session with its turns"), ("undo", "remove the last turn"),
                        ("delete", "delete a session")):
        sub.add_parser(name, help=help_).add_argument("session")
    sub.add_parser("list", help="your sessions")
    p = sub.add_parser("branch", help="a new session sharing turns 0..SEQ")
    p.add_argument("session")
    p.add_argument("--seq", type=int, required=True)
    p = sub.add_parser("reroll", help="generate a turn again (the last by default)")
    p.add_argument("session")
    p.add_argument("--seq", type=int)
    p = sub.add_parser("replan", help="edit subtask STEP of a robot plan and plan again from there (a new session)")
    p.add_argument("session")
    p.add_argument("--step", type=int, required=True, help="the subtask to edit, 1-based; 1..STEP-1 are kept")
    p.add_argument("--subtask", required=True, help="its new text")
    p = sub.add_parser("render", help="keyframes to an MP4 (in-betweens by the video decoder, else a slideshow)")
    p.add_argument("session")
    p.add_argument("--out", required=True)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--seconds-per-image", type=float, default=1.0)
    p.add_argument("--video-decoder", help="video decoder folder (else $WORLDSIM_VIDEO_DECODER, assets/video_decoder)")
    p = sub.add_parser("export", help="write the session as json, html or zip")
    p.add_argument("session")
    p.add_argument("--format", default="json")
    p.add_argument("--out", required=True)
    sub.add_parser("worker", help="run a model worker that takes jobs from Redis")
    for p in sub.choices.values():
        _common(p)
    return parser


NEEDS_MODEL = ("new", "step", "auto", "reroll", "replan", "worker")


def run(args) -> dict | list:
    from worldsim import export as ex
    from worldsim.engine import Engine

    workers = args.workers if args.command in NEEDS_MODEL else 0
    if args.command == "worker":
        return run_worker(args)
    engine = Engine.open(data_dir=args.data_dir, database_url=args.database_url, redis_url=args.redis_url,
                         checkpoint=args.checkpoint, device=args.device, workers=workers)
    try:
        c, user = args.command, args.user
        if c == "new":
            settings = {"seed": args.seed}
            if args.image_size:
                settings["image_size"] = args.image_size
            if args.max_steps is not None:
                settings["max_steps"] = args.max_steps
            return engine.new(user, args.mode, prompt=args.prompt, images=[_read(f) for f in args.image],
                              arm=args.arm, goal=args.goal, steps=args.steps, settings=settings, title=args.title,
                              timeout=args.timeout)
        if c == "step":
            return engine.step(user, args.session, args.instruction, images=[_read(f) for f in args.image],
                               timeout=args.timeout)
        if c == "auto":
            job = engine.auto(user, args.session, args.steps, wait=False)
            done = engine.wait(user, job["id"], args.timeout)
            return {"session_id": args.session, "job_id": job["id"], "turns": done["turns"]}
        if c == "show":
            return engine.show(user, args.session)
        if c == "list":
            return engine.list(user)
        if c == "undo":
            return engine.undo(user, args.session)
        if c == "delete":
            engine.delete(user, args.session)
            return {"deleted": args.session}
        if c == "branch":
            return engine.branch(user, args.session, args.seq)
        if c == "reroll":
            return engine.reroll(user, args.session, args.seq, timeout=args.timeout)
        if c == "replan":
            return engine.replan(user, args.session, args.step, args.subtask, timeout=args.timeout)
        session = engine.show(user, args.session)
        png = lambda h: engine.store.get_image(h)["png"]  # noqa: E731  (owned: it is in the session)
        if c == "render":
            from worldsim import video

            return video.render(session, png, args.out, fps=args.fps, seconds_per_image=args.seconds_per_image,
                                decoder=args.video_decoder, data_dir=args.data_dir, device=args.device)
        data = ex.export(session, args.format, png)
        with open(args.out, "wb") as f:
            f.write(data)
        return {"path": args.out, "format": args.format, "bytes": len(data)}
    finally:
        engine.close()


def run_worker(args) -> dict:
    import signal

    from worldsim.engine import Engine
    from worldsim.worker import Worker

    if not (args.redis_url or os.environ.get("REDIS_URL")):
        raise ValueError("redis_url: a separate worker takes jobs from Redis; give --redis-url or REDIS_URL")
    engine = Engine.open(data_dir=args.data_dir, database_url=args.database_url, redis_url=args.redis_url,
                         checkpoint=args.checkpoint, device=args.device, workers=0)
    from worldsim.runtime import Runtime

    worker = Worker(engine.store, engine.hot, Runtime.load(args.checkpoint, device=args.device))
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    print(json.dumps({"worker": worker.id, "status": "running"}), flush=True)
    worker.run_forever()
    return {"worker": worker.id, "status": "stopped"}


def _read(path: str) -> bytes:
    if not os.path.isfile(path):
        raise ValueError(f"image: file {path} not found")
    with open(path, "rb") as f:
        return f.read()


def main(argv=None) -> int:
    logging.basicConfig(level=os.environ.get("WORLDSIM_LOG", "WARNING"), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from worldsim.engine import JobFailed
    from worldsim.store import Conflict, NotFound

    try:
        result = run(args)
    except NotFound as e:
        print(json.dumps({"error": str(e), "kind": "not_found"}))
        return 1
    except (ValueError, Conflict, JobFailed, TimeoutError) as e:
        print(json.dumps({"error": str(e), "kind": type(e).__name__}))
        return 1
    print(json.dumps(result, default=str))
    return 0
