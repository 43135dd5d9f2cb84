"""Supervised fine-tuning on the task formats (SPEC §7): the loss covers the answer only (its text,
images, `<extra_101>` and EOS; the system prompt, question and prompt images have weight 0), visual
tokens weigh 1.0. Same loop as pretraining (train/lm.py), usually started from a pretrained checkpoint.

    python -m train.sft --recipe debug_cpu --data SHARDS --init-from runs/pretrain-debug --out runs/sft
    python -m train.sft --resume runs/sft

SPEC §7's SFT learning rate (6e-6, batch 1024) is for the 34B model (`paper_34b`); the small CPU recipes
use larger rates, which small models need.
"""

from __future__ import annotations

import sys

from train.lm import LMConfig, cli, train


def debug_cpu() -> LMConfig:
    return LMConfig(out_dir="runs/sft-debug", mode="sft", visual_weight=1.0, model="debug", seq_len=512,
                    batch_size=8, steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10, save_every=50)


def demo_cpu() -> LMConfig:
    return LMConfig(out_dir="runs/sft-demo", mode="sft", visual_weight=1.0, model="demo",
                    init_from="runs/pretrain-demo", seq_len=1024, batch_size=8, micro_batch_size=4, steps=2000,
                    lr=1e-4, min_lr=1e-5, warmup_steps=100, save_every=250)


def paper_34b() -> LMConfig:
    """SPEC §7's SFT numbers (16k rows, LR 6e-6, batch 1024) for the 34B preset; reference only, untested."""
    return LMConfig(out_dir="runs/sft-34b", mode="sft", visual_weight=1.0, model="emu3.5-34b",
                    init_from="runs/pretrain-34b", seq_len=16384, batch_size=1024, micro_batch_size=1,
                    steps=10000, lr=6e-6, min_lr=6e-7, warmup_steps=100, device="cuda", precision="bf16",
                    attention="flex", compile=True, save_every=500)


RECIPES = {f.__name__: f for f in (debug_cpu, demo_cpu, paper_34b)}


def main(cfg: LMConfig) -> list[dict]:
    if cfg.mode != "sft":
        raise ValueError(f"mode: train.sft runs mode 'sft', got {cfg.mode!r} (use train.pretrain)")
    return train(cfg)


if __name__ == "__main__":
    main(cli(sys.argv[1:], default_recipe="debug_cpu", recipes=RECIPES, description=__doc__))
