"""Export a session (JSON, one self-contained HTML page, ZIP with PNGs) and render its keyframes.

`render_slideshow` writes an MP4 (imageio-ffmpeg, H.264) where each keyframe is held for
`seconds_per_image`; the video-decoder issue replaces it with generated in-between frames.
"""

from __future__ import annotations

import base64
import html
import io
import json
import zipfile

FORMATS = ("json", "html", "zip")


def session_images(session: dict) -> list[str]:
    """Image hashes in order of appearance (inputs, then outputs, turn by turn), without repeats."""
    seen, order = set(), []
    for t in session["turns"]:
        for h in t["input"].get("images", []) + [s["image"] for s in t["output"] if s["type"] == "image"]:
            if h not in seen:
                seen.add(h)
                order.append(h)
    return order


def keyframes(session: dict) -> list[str]:
    """The model's images in order: the frames of a walk, the keyframes of a plan or story."""
    return [s["image"] for t in session["turns"] for s in t["output"] if s["type"] == "image"]


def to_json(session: dict) -> str:
    return json.dumps(session, indent=2)


def to_html(session: dict, png) -> str:
    """One page; images inline as data URIs. png(hash) -> bytes."""
    esc = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'>",
           f"<title>{esc(session['title'] or session['session_id'])}</title>",
           "<style>body{font-family:sans-serif;max-width:860px;margin:2em auto;line-height:1.5}"
           "img{max-width:100%;image-rendering:pixelated;border:1px solid #ccc}.user{color:#555}"
           ".turn{border-top:1px solid #ddd;padding:1em 0}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:4px 8px}</style></head><body>",
           f"<h1>{esc(session['title'] or 'Worldsim session')}</h1>",
           f"<p>mode <b>{esc(session['mode'])}</b> · session {esc(session['session_id'])}</p>"]

    def img(h):
        return f"<img alt='{h[:12]}' src='data:image/png;base64,{base64.b64encode(png(h)).decode()}'>"

    if session.get("plan"):
        out.append("<h2>Plan</h2><table><tr><th>#</th><th>subtask</th><th>keyframe</th></tr>")
        for step in session["plan"]:
            out.append(f"<tr><td>{step['step']}</td><td>{esc(step['subtask'])}</td><td>{img(step['image'])}</td></tr>")
        out.append("</table>")
    for t in session["turns"]:
        out.append(f"<div class='turn'><p class='user'>#{t['seq']} {esc(t['kind'])}: {esc(t['input'].get('text', ''))}</p>")
        out += [img(h) for h in t["input"].get("images", [])]
        for seg in t["output"]:
            if seg["type"] == "image":
                out.append(f"<p>{img(seg['image'])}</p>")
            else:
                out.append(f"<p{' class=user' if seg['type'] == 'cot' else ''}>{esc(seg['text'])}</p>")
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def to_zip(session: dict, png) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("session.json", to_json(session))
        z.writestr("session.html", to_html(session, png))
        for h in session_images(session):
            z.writestr(f"images/{h}.png", png(h))
    return buf.getvalue()


def export(session: dict, fmt: str, png) -> bytes:
    if fmt not in FORMATS:
        raise ValueError(f"format: unknown {fmt!r}; allowed: {list(FORMATS)}")
    if fmt == "json":
        return to_json(session).encode()
    if fmt == "html":
        return to_html(session, png).encode()
    return to_zip(session, png)


def render_slideshow(session: dict, png, path: str, fps: int = 8, seconds_per_image: float = 1.0,
                     progress=None) -> dict:
    """Keyframes -> MP4. Frames are upscaled (nearest) to at least 256 px and padded to even sides."""
    import imageio.v2 as imageio
    import numpy as np
    from PIL import Image

    if not 1 <= fps <= 60:
        raise ValueError(f"fps: must be in [1, 60], got {fps}")
    frames = keyframes(session)
    if not frames:
        raise ValueError("session: it has no images to render")
    first = Image.open(io.BytesIO(png(frames[0])))
    scale = max(1, -(-256 // max(first.size)))
    size = (first.width * scale + (first.width * scale) % 2, first.height * scale + (first.height * scale) % 2)
    hold = max(1, round(fps * seconds_per_image))
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1) as writer:
        for i, h in enumerate(frames):
            image = Image.open(io.BytesIO(png(h))).convert("RGB").resize(size, Image.Resampling.NEAREST)
            frame = np.asarray(image)
            for _ in range(hold):
                writer.append_data(frame)
            if progress:
                progress(i + 1, len(frames))
    return {"path": path, "frames": hold * len(frames), "keyframes": len(frames), "fps": fps}
