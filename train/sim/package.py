"""Package trained checkpoints as the embedded default (assets/demo) in fp16:

    python -m train.sim.package --model runs/sft-sim --vision-tokenizer runs/ibq-sim/checkpoints/step_NNNNNN --out assets/demo

--model: a save_pretrained folder or a run folder (its latest checkpoint). Writes OUT/{config.json,
model.safetensors, tokenizer.json, worldsim.json (the training image area: the engine's default image
size)} and OUT/vision_tokenizer/{config.json, model.safetensors}, checks that
the tokenizer's codebook matches the model's, and that everything together stays within --max-mb
(80 MB: the issue's budget for all shipped checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 2 ** 20


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
    save_pretrained(model, out)
    save_ibq(vq, os.path.join(out, "vision_tokenizer"))
    with open(os.path.join(out, NATIVE_FILE), "w") as f:  # the engine's default image size
        json.dump({"image_area": image_area}, f)
    mb = folder_mb(out)
    if mb > max_mb:
        raise ValueError(f"size: {out} is {mb:.1f} MB, over the {max_mb} MB budget")
    return {"out": out, "mb": round(mb, 2)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--vision-tokenizer", required=True)
    p.add_argument("--out", default="assets/demo")
    p.add_argument("--max-mb", type=float, default=80.0)
    p.add_argument("--image-area", type=int, default=96 * 96, help="pixels per image in the training data")
    a = p.parse_args(argv)
    print(package(a.model, a.vision_tokenizer, a.out, a.max_mb, a.image_area))


if __name__ == "__main__":
    main()
