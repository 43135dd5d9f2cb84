"""Input checks that run before an event is queued (Gradio's `validator=` hook) and again in the
handler (an API client reaches the handler the same way, but the engine's own ValueError is the
last word). Each check returns None or a message naming the field and the limit.

Uploads come in as files (gr.File), never gr.Image: Gradio would decode an image before our code
sees it, so an image bomb would give only a generic error. Here the bytes, the format and the
pixel count are checked by worldsim.media.load_upload, which reads the header before decoding.
"""

from __future__ import annotations

import os

from worldsim.media import MAX_UPLOAD_BYTES, load_upload
from worldsim.modes import MAX_REFERENCE_IMAGES, MAX_TEXT_CHARS

UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".webp", ".bmp"]
MAX_SEED = 2**31 - 1


def text(value, field: str, required: bool = True, limit: int = MAX_TEXT_CHARS) -> str | None:
    if value is None:
        value = ""
    if not isinstance(value, str):
        return f"{field}: must be text"
    if required and not value.strip():
        return f"{field}: must not be empty"
    if len(value) > limit:
        return f"{field}: {len(value):,} characters is over the limit of {limit:,}"
    return None


def upload(path, field: str) -> str | None:
    """One uploaded image file (a path), or None for 'no file'."""
    if path is None:
        return None
    if isinstance(path, dict):  # a FileData-like dict from an API client
        path = path.get("path")
    if not isinstance(path, str) or not os.path.isfile(path):
        return f"{field}: the upload did not arrive; try again"
    size = os.path.getsize(path)
    if size > MAX_UPLOAD_BYTES:
        return f"{field}: {size:,} bytes is over the limit of {MAX_UPLOAD_BYTES:,} bytes"
    try:
        with open(path, "rb") as f:
            load_upload(f.read(), field)
    except ValueError as e:
        return str(e)
    return None


def uploads(paths, field: str, limit: int = MAX_REFERENCE_IMAGES) -> str | None:
    paths = [p for p in (paths or []) if p is not None]
    if len(paths) > limit:
        return f"{field}: at most {limit} images, got {len(paths)}"
    for i, p in enumerate(paths):
        err = upload(p, f"{field}[{i + 1}]")
        if err:
            return err
    return None


def image_size(value) -> str | None:
    try:
        parse_size(value)
    except ValueError as e:
        return str(e)
    return None


def parse_size(value) -> list[int] | None:
    """'auto' (or empty) -> None; 'HxW' in tokens -> [h, w], each 1..99."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    parts = str(value).lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() and 1 <= int(p) <= 99 for p in parts):
        raise ValueError(f"image size: expected 'auto' or HxW in tokens, each side 1 to 99 (e.g. 16x16), "
                         f"got {value!r}")
    return [int(parts[0]), int(parts[1])]


def integer(value, field: str, lo: int, hi: int) -> str | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        return f"{field}: must be a whole number from {lo} to {hi}, got {value!r}"
    return None


def seed(value) -> str | None:
    return integer(value, "seed", 0, MAX_SEED)


def read_file(path) -> bytes:
    if isinstance(path, dict):
        path = path.get("path")
    with open(path, "rb") as f:
        return f.read()
