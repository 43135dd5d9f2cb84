"""Images in and out of the engine: validation of uploads, PNG encoding, content hashes.

Uploads are checked before anything is decoded: size in bytes, format, and pixel count read from the
header (a decompression bomb is refused before Pillow allocates it), then a full decode that catches
truncated or corrupt files. Errors are ValueError naming the field and the limit.
"""

from __future__ import annotations

import hashlib
import io
import threading

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOAD_PIXELS = 4096 * 4096
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
_PROBE_LOCK = threading.Lock()


def probe(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) of image bytes from the header alone, nothing decoded; Pillow's own
    errors propagate. Pillow's bomb check is off here so that load_upload can name the size itself."""
    from PIL import Image

    with _PROBE_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.format, *image.size
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def load_upload(data: bytes, field: str = "image"):
    """Bytes of an uploaded image -> RGB PIL image, or ValueError naming `field`."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ValueError(f"{field}: empty or not bytes")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValueError(f"{field}: {len(data):,} bytes is over the limit of {MAX_UPLOAD_BYTES:,} bytes")
    try:
        fmt, w, h = probe(data)
    except Exception as e:  # Pillow raises many types for unreadable data
        raise ValueError(f"{field}: not a readable image ({type(e).__name__}); allowed formats: "
                         f"{', '.join(ALLOWED_FORMATS)}") from None
    if fmt not in ALLOWED_FORMATS:
        raise ValueError(f"{field}: format {fmt} is not allowed; allowed: {', '.join(ALLOWED_FORMATS)}")
    if w * h > MAX_UPLOAD_PIXELS:
        raise ValueError(f"{field}: {w}x{h} = {w * h:,} pixels is over the limit of {MAX_UPLOAD_PIXELS:,}")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:
        raise ValueError(f"{field}: the {fmt} data is corrupt or truncated ({type(e).__name__})") from None
    return image.convert("RGB")


def read_upload(path: str, field: str = "image"):
    """An image file -> RGB PIL image (see load_upload)."""
    import os

    if not os.path.isfile(path):
        raise ValueError(f"{field}: file {path} not found")
    if os.path.getsize(path) > MAX_UPLOAD_BYTES:
        raise ValueError(f"{field}: {os.path.getsize(path):,} bytes is over the limit of {MAX_UPLOAD_BYTES:,} bytes")
    with open(path, "rb") as f:
        return load_upload(f.read(), field)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
