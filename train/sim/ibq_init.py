"""Write the untrained `demo` tokenizer used by the shipped model: the IBQ `demo` preset's codebook
(2048 x 64) and factor 8, at a CPU-trainable width (base 32, levels 1-2-4-4: about 4.2M parameters,
the size of the issue's calibration run). train.tokenizer_ibq then trains it with `--init-from`.

    python -m train.sim.ibq_init --out runs/ibq-init [--norm-groups 8] [--patch-shortcut]
        [--factor 4 --base-channels 40]

The defaults (32 GroupNorm groups, no patch shortcut) are the shipped tokenizer's. The better recipe
measured since is `--norm-groups 8 --patch-shortcut`: 32 groups on 32 channels make every norm at full
resolution an instance norm (each channel's mean, i.e. colour, removed per image: the shipped tokenizer
decodes brown walls grey-green), and the linear patch path (model.vision_tokenizer.IBQ) carries the
picture while the deep conv path is still learning (400-step A/B in assets/README.md). `--factor 4`
(levels 1-2-4; base 40 keeps about 4.5M parameters) gives four times the codes per image and a higher
ceiling (the 500-step A/B in assets/README.md); the world model's sequences grow by the same factor.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch


FACTORS = {8: (1, 2, 4, 4), 4: (1, 2, 4)}  # downsampling factor -> channel multipliers per level


def demo_small_config(norm_groups: int = 32, patch_shortcut: bool = False, factor: int = 8, base_channels: int = 32):
    from model.vision_tokenizer import ibq_preset

    if factor not in FACTORS:
        raise ValueError(f"factor: must be one of {sorted(FACTORS)}, got {factor!r}")
    return dataclasses.replace(ibq_preset("demo"), base_channels=base_channels, channel_mult=FACTORS[factor],
                               num_res_blocks=1, norm_groups=norm_groups, patch_shortcut=patch_shortcut)


def main(argv=None) -> None:
    from model.vision_tokenizer import IBQ, save_ibq

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--norm-groups", type=int, default=32, help="GroupNorm groups (the shipped tokenizer: 32)")
    p.add_argument("--patch-shortcut", action="store_true", help="add the linear patch path (model.vision_tokenizer.IBQ)")
    p.add_argument("--factor", type=int, default=8, help=f"downsampling factor, one of {sorted(FACTORS)} (shipped: 8)")
    p.add_argument("--base-channels", type=int, default=32, help="width of the first level (shipped: 32)")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    try:
        m = IBQ(demo_small_config(a.norm_groups, a.patch_shortcut, a.factor, a.base_channels))
    except ValueError as e:
        p.error(str(e))
    save_ibq(m, a.out)
    print(f"{a.out}: {sum(x.numel() for x in m.parameters()) / 1e6:.2f}M params")


if __name__ == "__main__":
    main()
