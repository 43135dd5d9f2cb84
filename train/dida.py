"""DiDA adaptation (SPEC §5; paper §4.3): fine-tune an autoregressive checkpoint so it can also decode an
image's codes in parallel. Every image of every training sequence gets a noisy copy (codes replaced
by the mask state at a ratio drawn per image); the copy sits at the image's own positions, sees the
clean tokens before the image and, bidirectionally, the rest of its copy (model.dida.training_mask_mod);
each masked code predicts its clean code. The next-token loss on the clean sequence stays, so the
model keeps generating text (and AR images) as before. The saved config carries `dida_steps`, which
makes the engine decode images with model.dida.DiDASampler.

    python -m train.dida --recipe debug_cpu --data SHARDS --init-from runs/sft-debug --out runs/dida-debug

The paper adapts with a few billion tokens of SFT data plus the AR model's own outputs
(self-distillation): `python -m train.self_distill` writes those as shards (the AR model's images for
training records' prompts), given here beside the SFT shards (train/sim/pipeline.sh does this).
"""

from __future__ import annotations

import sys

from train.lm import LMConfig, cli, train


def debug_cpu() -> LMConfig:
    return LMConfig(out_dir="runs/dida-debug", mode="sft", visual_weight=1.0, model="debug", seq_len=512,
                    batch_size=8, steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10, save_every=50,
                    dida_weight=1.0, dida_steps=8)


def demo_cpu() -> LMConfig:
    return LMConfig(out_dir="runs/dida-demo", mode="sft", visual_weight=1.0, model="demo",
                    init_from="runs/sft-demo", seq_len=1024, batch_size=8, micro_batch_size=4, steps=1000,
                    lr=1e-4, min_lr=1e-5, warmup_steps=50, save_every=250, dida_weight=1.0, dida_steps=8)


RECIPES = {f.__name__: f for f in (debug_cpu, demo_cpu)}


def main(cfg: LMConfig) -> list[dict]:
    if cfg.dida_weight <= 0:
        raise ValueError(f"dida_weight: DiDA adaptation needs a weight > 0, got {cfg.dida_weight}")
    return train(cfg)


if __name__ == "__main__":
    main(cli(sys.argv[1:], default_recipe="debug_cpu", recipes=RECIPES, description=__doc__))
