"""Video -> interleaved pretraining documents (SPEC §7's video-interleaved pipeline), with OpenCV.

    python -m train.data.from_video VIDEO [--transcript FILE.srt|.vtt] --out OUT
        [--keyframe-every T] [--cut-threshold D] [--min-scene S] [--max-keyframes K]
        [--vision-tokenizer IBQ_DIR] [--image-area PX] [--raw-images] [--asr-model NAME]

1. Scene cuts. Each frame is shrunk to 64x36 (area average); a cut is placed before frame i when both
   the mean absolute difference to frame i-1 (RGB in [0, 1]) exceeds `cut_threshold` (0.12) and the
   Bhattacharyya distance of their hue/saturation histograms exceeds `hist_threshold` (0.35): the first
   catches content changes, the second keeps fast motion inside one scene. Scenes shorter than
   `min_scene` seconds merge into the previous one (flashes).
2. Keyframes. A scene no longer than `keyframe_every` T seconds (4 s, about the paper's 0.27 keyframes/s)
   gives its middle frame; a longer scene gives one frame every T seconds, at T/2, 3T/2, ... from its start.
3. Text. Cues of an .srt or .vtt transcript, or ASR through faster-whisper when it is installed and no
   transcript is given (optional; without it the video is written with keyframes only and a message says
   so). Cues are placed at their start time and interleaved with the keyframes in time order (a cue and
   a keyframe at the same instant: the text first); consecutive cues join with a space.
4. Output: `interleaved` records (train/data/format.py) of at most `max_keyframes` keyframes each, in
   OUT/shard-00000.jsonl..., and every keyframe as OUT/keyframes/<video>_<n>_<seconds>s.png. Images are
   tokenized with an IBQ (`--vision-tokenizer`, default the debug preset with random weights and a warning)
   or stored as paths with `--raw-images`.
Ends by printing a one-line JSON summary (scenes, keyframes, text_segments, ...). A file OpenCV cannot
decode is an error naming it, with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass

from train import common
from train.data import format as fmt
from train.data.vision import DEFAULT_IMAGE_AREA


@dataclass
class Cue:
    start: float  # seconds
    end: float
    text: str


# ------------------------------------------------------------------------------------ transcripts

_TIME = re.compile(r"(?:(\d+):)?(\d{1,2}):(\d{2})[.,](\d{1,3})")


def _seconds(stamp: str, where: str) -> float:
    m = _TIME.fullmatch(stamp.strip())
    if not m:
        raise ValueError(f"transcript: {where}: cannot read the time {stamp!r}")
    h, mnt, s, ms = m.groups()
    return int(h or 0) * 3600 + int(mnt) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


def read_transcript(path: str) -> list[Cue]:
    """SubRip (.srt) or WebVTT (.vtt) -> cues sorted by start time; markup tags are removed."""
    if not os.path.isfile(path):
        raise ValueError(f"transcript: {path} not found")
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        lines = f.read().replace("\r\n", "\n").replace("\r", "\n").split("\n")
    cues, i = [], 0
    if path.lower().endswith(".vtt"):
        if not lines or not lines[0].startswith("WEBVTT"):
            raise ValueError(f"transcript: {path} is not WebVTT (first line must start with WEBVTT)")
        i = 1
    while i < len(lines):
        line = lines[i].strip()
        if "-->" not in line:
            if line.startswith(("NOTE", "STYLE", "REGION")):  # VTT blocks without cues
                while i < len(lines) and lines[i].strip():
                    i += 1
            i += 1
            continue
        left, right = line.split("-->", 1)
        where = f"{path} line {i + 1}"
        start, end = _seconds(left, where), _seconds(right.strip().split()[0] if right.strip() else "", where)
        i += 1
        text = []
        while i < len(lines) and lines[i].strip():
            text.append(re.sub(r"<[^>]+>", "", lines[i]).strip())
            i += 1
        if any(text):
            cues.append(Cue(start, end, " ".join(t for t in text if t)))
    if not cues:
        raise ValueError(f"transcript: {path} holds no cues ('start --> end' lines followed by text)")
    return sorted(cues, key=lambda c: c.start)


def asr_cues(video: str, model_name: str) -> list[Cue] | None:
    """Transcribe with faster-whisper when it is importable; None (and a message) when it is not."""
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        print("note: no --transcript given and faster-whisper is not installed, so no speech is transcribed "
              "(pip install faster-whisper, or pass --transcript FILE.srt|.vtt); writing keyframes only",
              file=sys.stderr)
        return None
    model = WhisperModel(model_name, device="cpu", compute_type="int8")
    segments, _ = model.transcribe(video)
    return [Cue(s.start, s.end, s.text.strip()) for s in segments if s.text.strip()]


# ------------------------------------------------------------------------------------ video

def _open(path: str):
    import cv2

    if not os.path.isfile(path):
        raise ValueError(f"video: {path} not found")
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise ValueError(f"video: {path} cannot be decoded (OpenCV could not open it)")
    return cap


def detect_scenes(path: str, cut_threshold: float = 0.12, hist_threshold: float = 0.35,
                  min_scene: float = 0.5) -> tuple[list[tuple[int, int]], float, int]:
    """-> scenes as [start, end) frame ranges, fps, frame count."""
    import cv2
    import numpy as np

    cap = _open(path)
    fps = cap.get(cv2.CAP_PROP_FPS)
    if not fps or not np.isfinite(fps) or fps <= 0:
        cap.release()
        raise ValueError(f"video: {path} reports no frame rate; cannot place keyframes in time")
    cuts, prev_small, prev_hist, n = [0], None, None, 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        small = cv2.resize(frame, (64, 36), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        hsv = cv2.cvtColor(cv2.resize(frame, (64, 36), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2HSV)
        hist = cv2.calcHist([hsv], [0, 1], None, [30, 16], [0, 180, 0, 256])
        cv2.normalize(hist, hist, alpha=1.0, norm_type=cv2.NORM_L1)
        if prev_small is not None:
            mad = float(np.abs(small - prev_small).mean())
            dist = float(cv2.compareHist(prev_hist, hist, cv2.HISTCMP_BHATTACHARYYA))
            if mad > cut_threshold and dist > hist_threshold:
                if (n - cuts[-1]) / fps < min_scene and len(cuts) > 1:
                    cuts[-1] = n  # the previous scene was a flash: merge it into this cut
                elif (n - cuts[-1]) / fps >= min_scene:
                    cuts.append(n)
        prev_small, prev_hist = small, hist
        n += 1
    cap.release()
    if n == 0:
        raise ValueError(f"video: {path} cannot be decoded (no frame could be read)")
    bounds = cuts + [n]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a], float(fps), n


def keyframe_indices(scenes: list[tuple[int, int]], fps: float, every: float) -> list[int]:
    """The middle frame of a scene of at most `every` seconds, else one frame every `every` seconds."""
    if every <= 0:
        raise ValueError(f"keyframe_every: must be > 0 seconds, got {every}")
    out = []
    for a, b in scenes:
        if (b - a) / fps <= every:
            out.append((a + b - 1) // 2)
        else:
            t = every / 2
            while a + t * fps < b:
                out.append(a + int(t * fps))
                t += every
    return out


def read_frames(path: str, indices: list[int]):
    """{index: RGB PIL image} for the given frame indices (one sequential pass: seeking is unreliable)."""
    import cv2
    from PIL import Image

    wanted, out, cap, n = set(indices), {}, _open(path), 0
    while len(out) < len(wanted):
        ok, frame = cap.read()
        if not ok:
            break
        if n in wanted:
            out[n] = Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        n += 1
    cap.release()
    if len(out) != len(wanted):
        raise ValueError(f"video: {path} ended before frame {min(wanted - set(out))} on the second pass")
    return out


def interleave(keyframes: list[tuple[float, object]], cues: list[Cue]) -> list[tuple[str, float, object]]:
    """-> [(kind, time, payload)] in time order, kind "text" or "image"; text first at equal times."""
    events = [("text", c.start, c.text) for c in cues] + [("image", t, im) for t, im in keyframes]
    return sorted(events, key=lambda e: (e[1], 0 if e[0] == "text" else 1))


def convert(video: str, out: str, *, transcript: str | None = None, keyframe_every: float = 4.0,
            cut_threshold: float = 0.12, hist_threshold: float = 0.35, min_scene: float = 0.5,
            max_keyframes: int = 16, vision_tokenizer: str | None = None, image_area: int = DEFAULT_IMAGE_AREA,
            raw_images: bool = False, asr_model: str = "small") -> dict:
    if max_keyframes <= 0:
        raise ValueError(f"max_keyframes: must be > 0, got {max_keyframes}")
    cues = read_transcript(transcript) if transcript else None  # a bad transcript fails before decoding
    scenes, fps, num_frames = detect_scenes(video, cut_threshold, hist_threshold, min_scene)
    indices = keyframe_indices(scenes, fps, keyframe_every)
    frames = read_frames(video, indices)
    asr = "transcript" if transcript else "none"
    if cues is None:
        cues = asr_cues(video, asr_model)
        asr = "faster-whisper" if cues is not None else "none"
        cues = cues or []
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(os.path.basename(video))[0])
    os.makedirs(os.path.join(out, "keyframes"), exist_ok=True)
    ibq = None
    if not raw_images:
        from train.data.vision import image_codes, load_vision_tokenizer

        ibq = load_vision_tokenizer(vision_tokenizer)
    keyframes = []
    for k, idx in enumerate(indices):
        t = idx / fps
        rel = os.path.join("keyframes", f"{stem}_{k:05d}_{t:.2f}s.png")
        frames[idx].save(os.path.join(out, rel))
        keyframes.append((t, {"path": rel} if raw_images else {"codes": image_codes(ibq, frames[idx], image_area)}))
    events = interleave(keyframes, cues)
    records, segs, n_img = [], [], 0
    for kind, _, payload in events:
        if kind == "image":
            if n_img == max_keyframes:
                records.append(fmt.record(fmt.INTERLEAVED, segs))
                segs, n_img = [], 0
            segs.append({"image": payload})
            n_img += 1
        elif segs and "text" in segs[-1]:
            segs[-1] = fmt.text(segs[-1]["text"] + " " + payload)
        else:
            segs.append(fmt.text(payload))
    if segs:
        records.append(fmt.record(fmt.INTERLEAVED, segs))
    shards = fmt.write_shards(out, records, codebook_size=ibq.config.codebook_size if ibq else None,
                              source=f"from_video {video}")
    text_segments = sum("text" in s for r in records for s in r["answer"])
    return {"video": video, "frames": num_frames, "fps": round(fps, 3), "duration_s": round(num_frames / fps, 3),
            "scenes": len(scenes), "cuts_s": [round(a / fps, 3) for a, _ in scenes[1:]],
            "keyframes": len(indices), "keyframe_times_s": [round(i / fps, 3) for i in indices],
            "cues": len(cues), "text_segments": text_segments, "asr": asr, "sequences": len(records),
            "shards": len(shards), "out": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video")
    p.add_argument("--transcript")
    p.add_argument("--out", required=True)
    p.add_argument("--keyframe-every", type=float, default=4.0, metavar="T")
    p.add_argument("--cut-threshold", type=float, default=0.12)
    p.add_argument("--hist-threshold", type=float, default=0.35)
    p.add_argument("--min-scene", type=float, default=0.5)
    p.add_argument("--max-keyframes", type=int, default=16)
    p.add_argument("--vision-tokenizer")
    p.add_argument("--image-area", type=int, default=DEFAULT_IMAGE_AREA)
    p.add_argument("--raw-images", action="store_true")
    p.add_argument("--asr-model", default="small", help="faster-whisper model name (used without --transcript)")
    a = p.parse_args(argv)
    return common.print_summary(lambda: convert(
        a.video, a.out, transcript=a.transcript, keyframe_every=a.keyframe_every, cut_threshold=a.cut_threshold,
        hist_threshold=a.hist_threshold, min_scene=a.min_scene, max_keyframes=a.max_keyframes,
        vision_tokenizer=a.vision_tokenizer, image_area=a.image_area, raw_images=a.raw_images, asr_model=a.asr_model))


if __name__ == "__main__":
    sys.exit(main())
