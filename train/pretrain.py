"""Pretraining (SPEC §7): next-token cross-entropy over packed interleaved documents, visual-token loss
weight 0.5, AdamW (0.9, 0.95, eps 1e-8), weight decay 0.1, clip 5.0, cosine LR with warm-up.

    python -m train.pretrain --recipe debug_cpu --data SHARDS --tokenizer TOK --out runs/pre
    torchrun --nproc_per_node 2 -m train.pretrain --recipe debug_cpu --data SHARDS --tokenizer TOK --out runs/pre
    python -m train.pretrain --resume runs/pre --steps 400      # the config comes from the checkpoint

The loop is train/lm.py; recipes are the functions below (each returns a complete LMConfig).
"""

from __future__ import annotations

import dataclasses
import sys

from train.lm import LMConfig, cli, train


def debug_cpu() -> LMConfig:
    """The `debug` preset (about 0.2M params): seconds per hundred steps on a laptop CPU."""
    return LMConfig(out_dir="runs/pretrain-debug", model="debug", seq_len=512, batch_size=8, steps=200,
                    lr=1e-3, min_lr=1e-4, warmup_steps=20, save_every=100, device="cpu")


def demo_cpu() -> LMConfig:
    """The `demo` preset (the shipped small world model) on CPU: SPEC §7's schedule shape, 700 warm-up steps."""
    return LMConfig(out_dir="runs/pretrain-demo", model="demo", seq_len=1024, batch_size=8, micro_batch_size=4,
                    steps=20000, lr=5e-4, min_lr=1e-5, warmup_steps=700, save_every=500, device="cpu")


def demo_cuda() -> LMConfig:
    """`demo` on one or more lent GPUs (bf16 autocast; FSDP2 under torchrun)."""
    return dataclasses.replace(demo_cpu(), out_dir="runs/pretrain-demo-cuda", device="cuda", precision="bf16",
                               batch_size=64, micro_batch_size=16, seq_len=2048)


def paper_34b() -> LMConfig:
    """SPEC §7's stage-1 numbers for the 34B preset (GPU cluster; shown for reference, untested here)."""
    return LMConfig(out_dir="runs/pretrain-34b", model="emu3.5-34b", seq_len=32768, batch_size=256,
                    micro_batch_size=1, steps=100000, lr=5e-4, min_lr=1e-5, warmup_steps=700, device="cuda",
                    precision="bf16", attention="flex", compile=True, save_every=1000)


RECIPES = {f.__name__: f for f in (debug_cpu, demo_cpu, demo_cuda, paper_34b)}


def main(cfg: LMConfig) -> list[dict]:
    if cfg.mode != "pretrain":
        raise ValueError(f"mode: train.pretrain runs mode 'pretrain', got {cfg.mode!r} (use train.sft)")
    return train(cfg)


if __name__ == "__main__":
    main(cli(sys.argv[1:], default_recipe="debug_cpu", recipes=RECIPES, description=__doc__))
