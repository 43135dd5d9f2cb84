"""Render a session, or a span of its turns, to MP4 with the video decoder (SPEC §6): the frames between
its keyframes are generated (model/video_decoder.py, sampled by model/video_sampling.py), the keyframes
themselves are the session's images, placed exactly at their timestamps.

`render` is the entry point of the CLI (and meant for the UI): it uses the video decoder when one is found
(`decoder` argument, else $WORLDSIM_VIDEO_DECODER, else assets/video_decoder/) and falls back to the
keyframe slideshow of worldsim/export.py when none is.

Timing: keyframe i sits at t_i = i * seconds_per_image (or the `timestamps` given), i.e. frame
k_i = round((t_i - t_0) * fps); the video runs from the first keyframe to the last one, k_last + 1 frames
(a single keyframe is held for seconds_per_image). Each gap between keyframes is one clip of the decoder:
both keyframes given clean with their IBQ tokens, the text that led to the later keyframe (the turn's
instruction and the narration before the image) as inter-frame text. Gaps of equal length run as one batch.

Sizes: the decoder works at its own small frame size (video_decoder.json frame_size, e.g. 64 x 64; a
non-square keyframe keeps its aspect at the same area); the video is written at the slideshow's size (the
first keyframe upscaled by an integer factor to at least 256 px, even sides). Keyframes are the session
images scaled with nearest neighbour (pixel-exact, as in the slideshow); generated frames are upscaled
bicubically, so they are softer than the keyframes around them.

Cache: the MP4 is kept under `data_dir/videos/<sha256>.mp4`, the hash covering the decoder's files, the
keyframes' image hashes, texts and frame indices, the output size, fps, steps and seed; the same request
again copies the cached file.

Progress: progress(done, total) after each sampling step of each batch and once when the file is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
import uuid

ENV = "WORLDSIM_VIDEO_DECODER"
ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "video_decoder")
CACHE_VERSION = 1  # bump when the rendering itself changes, so old cached files are not reused
_LOADED: dict = {}
_LOAD_LOCK = threading.Lock()


def find_video_decoder(path: str | None = None) -> str | None:
    """The video decoder folder to use: `path` (must be one), else $WORLDSIM_VIDEO_DECODER (must be one),
    else assets/video_decoder/ when it is one, else None (render falls back to the slideshow)."""
    from model.video_sampling import is_video_decoder

    for name, candidate in (("video_decoder", path), (ENV, os.environ.get(ENV))):
        if candidate:
            if not is_video_decoder(candidate):
                raise ValueError(f"{name}: {candidate!r} is not a video decoder folder (no video_decoder.json)")
            return candidate
    return ASSET if is_video_decoder(ASSET) else None


def _fingerprint(path: str) -> str:
    """sha256 over the decoder folder's files (names and bytes), sorted."""
    h = hashlib.sha256()
    for root, _, names in sorted(os.walk(path)):
        for n in sorted(names):
            if n in ("trainer_state.pt", "train_config.json"):
                continue  # a training checkpoint's extras: not what the decoder computes with
            full = os.path.join(root, n)
            h.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def load(path: str, device: str = "cpu"):
    """(model, ibq, settings, fingerprint), loaded once per (folder, device) in this process."""
    from model.video_sampling import load_video_decoder

    key = (os.path.abspath(path), str(device))
    with _LOAD_LOCK:
        if key not in _LOADED:
            model, ibq, settings = load_video_decoder(path, device)
            _LOADED[key] = (model, ibq, settings, _fingerprint(path))
        return _LOADED[key]


def keyframe_track(session: dict, turns: tuple[int, int] | None = None) -> list[dict]:
    """The model's images in order, each with the text that led to it: [{"image", "text", "seq"}].
    turns: (first_seq, last_seq) inclusive, or None for the whole session."""
    if turns is not None:
        if len(turns) != 2 or turns[0] > turns[1]:
            raise ValueError(f"turns: must be (first_seq, last_seq) with first <= last, got {turns!r}")
    out = []
    for t in session["turns"]:
        if turns is not None and not turns[0] <= t["seq"] <= turns[1]:
            continue
        pending = [t["input"].get("text") or ""]
        for seg in t["output"]:
            if seg["type"] == "image":
                text = " ".join(p.strip() for p in pending if p and p.strip())
                out.append({"image": seg["image"], "text": text or None, "seq": t["seq"]})
                pending = []
            elif seg["type"] == "text":
                pending.append(seg.get("text", ""))
    return out


def keyframe_frames(num_keyframes: int, fps: int, seconds_per_image: float,
                    timestamps: list[float] | None = None) -> list[int]:
    """Frame index of each keyframe (the first at 0)."""
    if timestamps is None:
        timestamps = [i * seconds_per_image for i in range(num_keyframes)]
    if len(timestamps) != num_keyframes:
        raise ValueError(f"timestamps: need one per keyframe ({num_keyframes}), got {len(timestamps)}")
    frames = [round((t - timestamps[0]) * fps) for t in timestamps]
    if any(b <= a for a, b in zip(frames, frames[1:])):
        raise ValueError(f"timestamps: keyframes must be at least one frame apart at {fps} fps, got {timestamps}")
    return frames


def _check(fps, seconds_per_image):
    if not (isinstance(fps, int) and 1 <= fps <= 60):
        raise ValueError(f"fps: must be an integer in [1, 60], got {fps!r}")
    if not (isinstance(seconds_per_image, (int, float)) and seconds_per_image > 0):
        raise ValueError(f"seconds_per_image: must be > 0, got {seconds_per_image!r}")


def render(session: dict, png, path: str, *, fps: int = 8, seconds_per_image: float = 1.0, progress=None,
           decoder: str | None = None, data_dir: str | None = None, turns: tuple[int, int] | None = None,
           timestamps: list[float] | None = None, seed: int = 0, device: str = "cpu") -> dict:
    """The session's video: generated in-betweens when a video decoder is found, else the slideshow."""
    found = find_video_decoder(decoder)
    if found is None:
        from worldsim.export import render_slideshow

        if turns is not None:
            session = {**session, "turns": [t for t in session["turns"] if turns[0] <= t["seq"] <= turns[1]]}
        return {**render_slideshow(session, png, path, fps=fps, seconds_per_image=seconds_per_image,
                                   progress=progress), "renderer": "slideshow"}
    return render_video(session, png, path, decoder=found, fps=fps, seconds_per_image=seconds_per_image,
                        progress=progress, data_dir=data_dir, turns=turns, timestamps=timestamps, seed=seed,
                        device=device)


def render_video(session: dict, png, path: str, *, decoder: str, fps: int = 8, seconds_per_image: float = 1.0,
                 progress=None, data_dir: str | None = None, turns: tuple[int, int] | None = None,
                 timestamps: list[float] | None = None, seed: int = 0, num_steps: int | None = None,
                 device: str = "cpu") -> dict:
    """Keyframes -> MP4 at `path` with generated in-between frames. png(hash) -> PNG bytes.
    Returns {"path", "frames", "keyframes", "keyframe_frames", "fps", "renderer", "cached", "num_steps"}."""
    from PIL import Image

    _check(fps, seconds_per_image)
    track = keyframe_track(session, turns)
    if not track:
        raise ValueError("session: it has no images to render" + (f" in turns {turns}" if turns else ""))
    model, ibq, settings, fingerprint = load(decoder, device)
    steps = num_steps or settings.num_steps
    ks = keyframe_frames(len(track), fps, seconds_per_image, timestamps)
    if len(track) == 1:
        ks = [0]
    total = ks[-1] + 1 if len(track) > 1 else max(1, round(fps * seconds_per_image))
    first = Image.open(io.BytesIO(png(track[0]["image"])))
    scale = max(1, -(-256 // max(first.size)))
    size = (first.width * scale + (first.width * scale) % 2, first.height * scale + (first.height * scale) % 2)
    key = hashlib.sha256(json.dumps({
        "v": CACHE_VERSION, "decoder": fingerprint, "images": [k["image"] for k in track],
        "texts": [k["text"] for k in track], "frames": ks, "total": total, "size": size, "fps": fps,
        "steps": steps, "seed": seed}).encode()).hexdigest()
    cache = os.path.join(data_dir, "videos", f"{key}.mp4") if data_dir else None
    result = {"path": path, "frames": total, "keyframes": len(track), "keyframe_frames": ks, "fps": fps,
              "renderer": "video_decoder", "num_steps": steps, "cache_key": key}
    if cache and os.path.isfile(cache):
        shutil.copyfile(cache, path)
        if progress:
            progress(1, 1)
        return {**result, "cached": True}
    images = [Image.open(io.BytesIO(png(k["image"]))).convert("RGB") for k in track]
    frames = _frames(model, ibq, settings, images, [k["text"] for k in track], ks, total, size, steps, seed, progress)
    target = cache or path
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    tmp = f"{target}.{uuid.uuid4().hex}.tmp.mp4"
    try:
        _write(tmp, frames, fps)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if cache:
        shutil.copyfile(cache, path)
    if progress:
        n_groups = len({ks[i + 1] - ks[i] for i in range(len(ks) - 1) if ks[i + 1] - ks[i] > 1})
        progress(n_groups * steps + 1, n_groups * steps + 1)
    return {**result, "cached": False}


def _frames(model, ibq, settings, images, texts, ks, total, size, steps, seed, progress) -> list:
    """All video frames as uint8 (H, W, 3) arrays at `size` (W, H)."""
    import numpy as np
    import torch
    from PIL import Image

    from model.video_sampling import build_conditions, sample_video
    from model.vision_tokenizer import resize_to_area, to_tensor

    keyframes = [np.asarray(im.resize(size, Image.Resampling.NEAREST)) for im in images]
    out: list = [None] * total
    for k, frame in zip(ks, keyframes):
        out[k] = frame
    if len(images) == 1:
        return [keyframes[0]] * total
    H, W = settings.frame_size
    multiple = int(np.lcm(model.config.patch_size, ibq.config.downsample_factor))
    small = [to_tensor(resize_to_area(im, H * W, multiple)) for im in images]
    if len({tuple(s.shape) for s in small}) > 1:  # keyframes of different shapes: use the first one's
        small = [to_tensor(im.resize((small[0].shape[2], small[0].shape[1]), Image.Resampling.BICUBIC))
                 for im in images]
    groups: dict[int, list[int]] = {}
    for i in range(len(ks) - 1):
        if ks[i + 1] - ks[i] > 1:
            groups.setdefault(ks[i + 1] - ks[i] + 1, []).append(i)
    n_groups, done = len(groups), [0]
    device = next(model.parameters()).device
    for g, (n, gaps) in enumerate(sorted(groups.items())):
        keys = torch.stack([torch.stack([small[i], small[i + 1]]) for i in gaps]).to(device)  # (B, 2, 3, h, w)
        cond = build_conditions(keys, [[0, n - 1]] * len(gaps), n, ibq, [[texts[i + 1]] for i in gaps],
                                settings.text_bytes)

        def step_done(i, total_steps, g=g):
            if progress:
                progress(g * steps + i, n_groups * steps + 1)

        video = sample_video(model, cond, num_steps=steps, shift=settings.shift,
                             generator=torch.Generator().manual_seed(seed * 1_000_003 + n), callback=step_done)
        pixels = ((video.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()  # (B, 3, n, h, w)
        for b, i in enumerate(gaps):
            for j in range(1, n - 1):
                im = Image.fromarray(pixels[b, :, j].permute(1, 2, 0).numpy())
                out[ks[i] + j] = np.asarray(im.resize(size, Image.Resampling.BICUBIC))
    assert all(f is not None for f in out)
    return out


def _write(path: str, frames: list, fps: int) -> None:
    import imageio.v2 as imageio

    # quality 9 (of 10): the keyframes must come back close to the session's images
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=9, macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(frame)
