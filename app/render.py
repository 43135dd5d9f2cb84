"""HTML views of sessions, and of a turn still being generated.

Everything the model wrote is escaped (with random weights it writes control characters and special
tokens). Images are <img> tags on our owner-checked media route (app/server.py), never Gradio file
URLs. A turn being generated is a list of pending segments: text so far, and a placeholder per image
with a progress bar while its rows decode (app/stream.py feeds them).
"""

from __future__ import annotations

import html
import time

esc = html.escape


def image_url(digest: str) -> str:
    return f"/media/image/{digest}.png"


def video_url(session_id: str, version: float | None = None) -> str:
    return f"/media/video/{session_id}.mp4" + (f"?v={int(version)}" if version else "")


def export_url(session_id: str, fmt: str) -> str:
    return f"/media/export/{session_id}.{fmt}"


# ---- pieces -------------------------------------------------------------------------------------
def img(digest: str, cls: str = "", alt: str = "") -> str:
    return (f"<img class='ws-img {cls}' data-digest='{esc(digest)}' src='{image_url(digest)}' "
            f"alt='{esc(alt or digest[:12])}' loading='lazy'>")


def placeholder(seg: dict, cls: str = "") -> str:
    """An image still decoding: its aspect ratio, a progress bar and 'rows done / total'."""
    h, w = seg.get("height") or 1, seg.get("width") or 1
    total = seg.get("rows_total") or h
    done = min(seg.get("rows_done", 0), total)
    label = "Waiting for the image…" if done == 0 else (
        f"Decoding image… {done}/{total} rows" if done < total else "Image decoded, saving…")
    return (f"<div class='ws-placeholder {cls}' style='aspect-ratio:{w}/{h}' role='progressbar' "
            f"aria-valuenow='{done}' aria-valuemax='{total}'>"
            f"<div class='ws-bar' style='width:{100 * done / total:.0f}%'>"
            f"</div><span>{label}</span></div>")


def segment_html(seg: dict, img_cls: str = "") -> str:
    if seg["type"] == "image":
        return img(seg["image"], img_cls)
    if seg["type"] == "placeholder":
        return placeholder(seg, img_cls)
    if seg["type"] == "cot":
        return f"<p class='ws-cot'>{esc(seg['text'])}</p>"
    return f"<p class='ws-text'>{esc(seg['text'])}</p>"


def pairs(segments: list[dict]) -> list[tuple[str, dict | None]]:
    """Output segments -> [(text before the image, image or placeholder segment)]; trailing text
    gets None. Chain-of-thought text is kept out of the step text."""
    out, text = [], []
    for seg in segments:
        if seg["type"] == "text":
            text.append(seg["text"])
        elif seg["type"] in ("image", "placeholder"):
            out.append((" ".join(text).strip(), seg))
            text = []
    if any(t.strip() for t in text):
        out.append((" ".join(text).strip(), None))
    return out


def empty(message: str) -> str:
    return f"<div class='ws-empty'>{esc(message)}</div>"


def instruction_of(turn: dict) -> str:
    if turn["kind"] == "continue":
        return "(the model moves on its own)"
    return turn["input"].get("text") or ("(image)" if turn["input"].get("images") else "")


# ---- per mode -------------------------------------------------------------------------------------
def explore(turns: list[dict]) -> str:
    """The current view large, then the timeline of keyframes, one figure per step."""
    if not turns:
        return empty("Start a world from a description or an image; its keyframes appear here.")
    frames = []  # (seq, caption, narration, segment)
    for t in turns:
        if t["seq"] == 0:
            for h in t["input"].get("images", []):
                frames.append(("start", "your image", "", {"type": "image", "image": h}))
        text = " ".join(s["text"] for s in t["output"] if s["type"] == "text")
        images = [s for s in t["output"] if s["type"] in ("image", "placeholder")]
        for s in images or [{"type": "placeholder", "height": 1, "width": 1, "rows_done": 0, "rows_total": 1}]:
            frames.append((t["seq"], instruction_of(t), text, s))
    seq, caption, narration, seg = frames[-1]
    current = (f"<div class='ws-current'>{segment_html(seg, 'ws-big')}<div class='ws-caption'><b>Step "
               f"{esc(str(seq))}</b> · {esc(caption)}<p class='ws-text'>{esc(narration)}</p></div></div>")
    strip = "".join(
        f"<figure class='ws-frame' data-seq='{esc(str(s))}'>{segment_html(g, 'ws-thumb')}"
        f"<figcaption><b>#{esc(str(s))}</b> {esc(c[:60])}</figcaption></figure>" for s, c, _, g in frames)
    return f"<div class='ws-explore'>{current}<div class='ws-strip'>{strip}</div></div>"


def story(turns: list[dict]) -> str:
    if not turns:
        return empty("Write a premise (optionally with a picture); the story's beats appear here.")
    out, beat = [], 0
    first = turns[0]
    intro = "".join(img(h, "ws-thumb") for h in first["input"].get("images", []))
    out.append(f"<div class='ws-premise'><b>Premise:</b> {esc(first['input'].get('text', ''))}{intro}</div>")
    for t in turns:
        for text, seg in pairs(t["output"]) or [("", None)]:
            beat += 1
            body = segment_html(seg, "ws-mid") if seg else ""
            out.append(f"<div class='ws-beat' data-seq='{t['seq']}'><h4>Beat {beat}</h4>"
                       f"<p class='ws-text'>{esc(text)}</p>{body}</div>")
    return f"<div class='ws-story'>{''.join(out)}</div>"


def guide(turns: list[dict]) -> str:
    if not turns:
        return empty("Ask how to do something; numbered steps with a picture each appear here.")
    out = []
    for t in turns:
        out.append(f"<h3 class='ws-question'>{esc(t['input'].get('text', ''))}</h3><ol class='ws-steps'>")
        for text, seg in pairs(t["output"]):
            out.append(f"<li class='ws-step'><p class='ws-text'>{esc(text)}</p>"
                       f"{segment_html(seg, 'ws-mid') if seg else ''}</li>")
        out.append("</ol>")
    return f"<div class='ws-guide'>{''.join(out)}</div>"


def plan(turns: list[dict], motion: list[float | None] | None = None) -> str:
    """Subtask table and keyframe strip. `motion[i]`: mean pixel change from keyframe i-1 to i."""
    if not turns:
        return empty("Give an arm, a goal and a scene; the subtask plan and its keyframes appear here.")
    t = turns[-1]
    steps = [(text.split("Current Step:", 1)[-1].strip(), seg) for text, seg in pairs(t["output"]) if seg]
    scene = "".join(img(h, "ws-thumb") for h in t["input"].get("images", []))
    rows, strip = [], []
    for i, (subtask, seg) in enumerate(steps):
        flag = ""
        if motion and i < len(motion) and motion[i] is not None and motion[i] < 2.0:
            flag = ("<span class='ws-warn' title='this keyframe barely differs from the previous one'>"
                    "⚠ no visible change</span>")
        rows.append(f"<tr><td>{i + 1}</td><td class='ws-text'>{esc(subtask)} {flag}</td>"
                    f"<td>{segment_html(seg, 'ws-thumb')}</td></tr>")
        strip.append(f"<figure class='ws-frame'>{segment_html(seg, 'ws-thumb')}"
                     f"<figcaption>{i + 1}</figcaption></figure>")
    return (f"<div class='ws-plan'><p class='ws-question'>{esc(t['input'].get('text', ''))}</p>{scene}"
            f"<table class='ws-table'><tr><th>#</th><th>Subtask</th><th>Keyframe</th></tr>{''.join(rows)}</table>"
            f"<div class='ws-strip'>{''.join(strip)}</div></div>")


def images(turns: list[dict]) -> str:
    if not turns:
        return empty("Describe an image (or add reference images to edit); results appear here, newest first.")
    cards = []
    for t in reversed(turns):
        refs = "".join(img(h, "ws-ref") for h in t["input"].get("images", []))
        result = "".join(segment_html(s, "ws-mid") for s in t["output"] if s["type"] in ("image", "placeholder"))
        cards.append(f"<div class='ws-card' data-seq='{t['seq']}'>{result}<p>{esc(t['input'].get('text', ''))}</p>"
                     f"{'<div class=ws-refs>' + refs + '</div>' if refs else ''}</div>")
    return f"<div class='ws-images'>{''.join(cards)}</div>"


VIEWS = {"explore": explore, "story": story, "howto": guide, "vla": plan, "t2i": images, "x2i": images}


def view(mode: str, turns: list[dict], **kw) -> str:
    return VIEWS[mode](turns, **kw)


# ---- sessions -----------------------------------------------------------------------------------
MODE_NAMES = {"explore": "Explore", "story": "Story", "howto": "Guide", "vla": "Robot plan", "t2i": "Image",
              "x2i": "Image edit"}


def session_label(s: dict) -> str:
    when = time.strftime("%b %d %H:%M", time.localtime(s["updated_at"]))
    title = (s["title"] or "untitled").replace("\n", " ")
    title = title[:64] + ("…" if len(title) > 64 else "")
    return f"{title} · {MODE_NAMES.get(s['mode'], s['mode'])} · {s['num_turns']} turn(s) · {when}"


def export_links(session_id: str | None) -> str:
    if not session_id:
        return "<p class='ws-muted'>Select a session to export it.</p>"
    links = " · ".join(f"<a class='ws-export' href='{export_url(session_id, f)}' download>{f.upper()}</a>"
                       for f in ("json", "html", "zip"))
    return f"<p>Export: {links}</p>"


def video(session_id: str, version: float) -> str:
    url = video_url(session_id, version)
    return (f"<video class='ws-video' controls src='{url}'></video>"
            f"<p><a href='{url}' download>Download MP4</a></p>")


# one rule per line: Gradio scopes custom CSS line by line
CSS = """
.ws-img{image-rendering:pixelated;border:1px solid #8884;border-radius:4px;background:#111;display:block}
.ws-big{width:min(100%,384px);height:auto}
.ws-mid{width:min(100%,256px);height:auto}
.ws-thumb{width:96px;height:auto}
.ws-ref{width:64px;height:auto;display:inline-block;margin-right:4px}
.ws-placeholder{position:relative;width:min(100%,256px);min-height:48px;border:1px dashed #888;border-radius:4px}
.ws-placeholder{background:repeating-linear-gradient(45deg,#8882,#8882 8px,#8881 8px,#8881 16px);overflow:hidden}
.ws-placeholder{display:flex;align-items:center;justify-content:center}
.ws-placeholder.ws-thumb{width:96px;min-height:32px}
.ws-placeholder .ws-bar{position:absolute;left:0;top:0;bottom:0;background:#4a90e244}
.ws-placeholder span{position:relative;font-size:12px;padding:4px;text-align:center}
.ws-current{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start;margin-bottom:12px}
.ws-caption{flex:1;min-width:200px}
.ws-strip{display:flex;gap:8px;overflow-x:auto;padding:4px 0}
.ws-frame{margin:0;flex:0 0 auto;width:100px}
.ws-frame figcaption{font-size:11px;line-height:1.2;word-break:break-word}
.ws-text{white-space:pre-wrap;word-break:break-word;font-size:14px}
.ws-cot{color:#888;font-style:italic}
.ws-beat,.ws-step,.ws-card{margin-bottom:12px}
.ws-images{display:flex;flex-wrap:wrap;gap:12px}
.ws-card{width:260px}
.ws-table td,.ws-table th{border:1px solid #8884;padding:4px 8px;vertical-align:top}
.ws-table{border-collapse:collapse;margin:8px 0}
.ws-warn{color:#c60;font-size:12px}
.ws-empty,.ws-muted{color:#888;padding:16px 0}
.ws-video{width:min(100%,384px)}
.ws-sessions{max-height:560px;overflow-y:auto}
"""
