"""Package trained checkpoints as the embedded default (assets/demo, assets/video_decoder) in fp16:

    python -m train.sim.package --model runs/sft-sim --vision-tokenizer runs/ibq-sim/checkpoints/step_NNNNNN --out assets/demo
    python -m train.sim.package --video-decoder runs/video-sim-distill/checkpoints/step_NNNNNN --out assets/video_decoder
    python -m train.sim.package --vision-tokenizer runs/ibq-f4/checkpoints/step_NNNNNN --out assets/ibq_f4

--model: a save_pretrained folder or a run folder (its latest checkpoint). Writes OUT/{config.json,
model.safetensors, tokenizer.json, worldsim.json (the training image area: the engine's default image
size)} and OUT/vision_tokenizer/{config.json, model.safetensors}, checks that
the tokenizer's codebook matches the model's, and that everything together stays within --max-mb
(80 MB: the issue's budget for all shipped checkpoints).

--vision-tokenizer alone: that tokenizer in fp16 (a `load_ibq` folder), for a world model still to be trained
on it (train/sim/pipeline.sh takes it as IBQ=OUT); the budget counts it with every other folder under assets/.

--video-decoder: a video decoder folder (train.video_decoder's checkpoints/step_N), rewritten in fp16 with
its own IBQ; the budget then counts it together with every other folder under assets/ it does not replace.
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 2 ** 20


def check_budget(out: str, mb: float, max_mb: float) -> dict:
    """`mb` for `out` plus the folders beside it (the other shipped checkpoints, which share the budget)
    must stay within `max_mb`; returns the summary the CLI prints."""
    parent, me = os.path.dirname(os.path.abspath(out)), os.path.abspath(out)
    others = sum(folder_mb(os.path.join(parent, d)) for d in os.listdir(parent)
                 if os.path.isdir(os.path.join(parent, d)) and os.path.join(parent, d) != me) \
        if os.path.isdir(parent) else 0.0
    if others + mb > max_mb:
        raise ValueError(f"size: {out} is {mb:.1f} MB beside {others:.1f} MB of other assets, "
                         f"over the {max_mb} MB budget")
    return {"out": out, "mb": round(mb, 2), "assets_mb": round(others + mb, 2)}


def package(model_dir: str, vq_dir: str, out: str, max_mb: float = 80.0, image_area: int = 96 * 96) -> dict:
    from model.checkpoint import load_pretrained, save_pretrained
    from model.vision_tokenizer import load_ibq, save_ibq
    from train.lm import resolve_init
    from worldsim.runtime import NATIVE_FILE

    model = load_pretrained(resolve_init(model_dir), dtype=torch.float16)
    vq = load_ibq(vq_dir).half()
    if vq.config.codebook_size != model.config.codebook_size:
        raise ValueError(f"vision tokenizer: codebook_size {vq.config.codebook_size} does not match the model's "
                         f"{model.config.codebook_size}")

    def write(folder: str) -> None:
        save_pretrained(model, folder)
        save_ibq(vq, os.path.join(folder, "vision_tokenizer"))
        with open(os.path.join(folder, NATIVE_FILE), "w") as f:  # the engine's default image size
            json.dump({"image_area": image_area}, f)

    return write_within_budget(out, write, max_mb)


def write_within_budget(out: str, write, max_mb: float) -> dict:
    """`write(folder)` into a scratch folder; refuses, leaving `out` as it was, when that folder and the
    other assets beside `out` would exceed `max_mb` together; else the folder replaces `out`."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        staged = os.path.join(tmp, "staged")
        write(staged)
        summary = check_budget(out, folder_mb(staged), max_mb)
        shutil.rmtree(out, ignore_errors=True)
        shutil.move(staged, out)
    return summary


def package_tokenizer(vq_dir: str, out: str, max_mb: float = 80.0) -> dict:
    from model.vision_tokenizer import load_ibq, save_ibq

    vq = load_ibq(vq_dir).half()
    return write_within_budget(out, lambda folder: save_ibq(vq, folder), max_mb)


def package_video(decoder_dir: str, out: str, max_mb: float = 80.0, num_steps: int | None = None) -> dict:
    """The video decoder folder in fp16 at `out`, sampling with `num_steps` (default: its own count; an
    undistilled decoder only); refuses when the assets folder beside `out` (out's siblings, the shipped
    world model among them) and it would exceed `max_mb` together."""
    import dataclasses

    from model.video_sampling import load_video_decoder, save_video_decoder

    model, ibq, settings = load_video_decoder(decoder_dir)
    if num_steps is not None:
        if not isinstance(num_steps, int) or num_steps <= 0:
            raise ValueError(f"num_steps: must be a positive integer, got {num_steps!r}")
        if settings.teacher_steps is not None and num_steps != settings.num_steps:
            raise ValueError(f"num_steps: {decoder_dir} is distilled for {settings.num_steps} steps, got {num_steps}")
        settings = dataclasses.replace(settings, num_steps=num_steps)
    return write_within_budget(out, lambda folder: save_video_decoder(folder, model.half(), ibq.half(), settings),
                               max_mb)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--vision-tokenizer")
    p.add_argument("--video-decoder", help="package this video decoder folder instead (to --out)")
    p.add_argument("--num-steps", type=int, help="--video-decoder: the sampling steps it ships with")
    p.add_argument("--out", default="assets/demo")
    p.add_argument("--max-mb", type=float, default=80.0)
    p.add_argument("--image-area", type=int, default=96 * 96, help="pixels per image in the training data")
    a = p.parse_args(argv)
    if a.video_decoder:
        print(package_video(a.video_decoder, a.out, a.max_mb, a.num_steps))
    elif a.model and a.vision_tokenizer:
        print(package(a.model, a.vision_tokenizer, a.out, a.max_mb, a.image_area))
    elif a.vision_tokenizer:
        print(package_tokenizer(a.vision_tokenizer, a.out, a.max_mb))
    else:
        p.error("give --model and --vision-tokenizer, --vision-tokenizer alone, or --video-decoder")


if __name__ == "__main__":
    main()
