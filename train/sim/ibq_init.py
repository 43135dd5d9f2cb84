"""Write the untrained `demo` tokenizer used by the shipped model: the IBQ `demo` preset's codebook
(2048 x 64) and factor 8, at a CPU-trainable width (base 32, levels 1-2-4-4: about 4.2M parameters,
the size of the issue's calibration run). train.tokenizer_ibq then trains it with `--init-from`.

    python -m train.sim.ibq_init --out runs/ibq-init [--norm-groups 8] [--patch-shortcut]

The defaults (32 GroupNorm groups, no patch shortcut) are the shipped tokenizer's. The better recipe
measured since is `--norm-groups 8 --patch-shortcut`: 32 groups on 32 channels make every norm at full
resolution an instance norm (each channel's mean, i.e. colour, removed per image: the shipped tokenizer
decodes brown walls grey-green), and the linear patch path (model.vision_tokenizer.IBQ) carries the
picture while the deep conv path is still learning (400-step A/B in assets/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch


def demo_small_config(norm_groups: int = 32, patch_shortcut: bool = False):
    from model.vision_tokenizer import ibq_preset

    return dataclasses.replace(ibq_preset("demo"), base_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=1,
                               norm_groups=norm_groups, patch_shortcut=patch_shortcut)


def main(argv=None) -> None:
    from model.vision_tokenizer import IBQ, save_ibq

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--norm-groups", type=int, default=32, help="GroupNorm groups (the shipped tokenizer: 32)")
    p.add_argument("--patch-shortcut", action="store_true", help="add the linear patch path (model.vision_tokenizer.IBQ)")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    m = IBQ(demo_small_config(a.norm_groups, a.patch_shortcut))
    save_ibq(m, a.out)
    print(f"{a.out}: {sum(x.numel() for x in m.parameters()) / 1e6:.2f}M params")


if __name__ == "__main__":
    main()
