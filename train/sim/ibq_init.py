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

    python -m train.sim.ibq_init --grow assets/ibq_f4 --decoder-extra-blocks 4 --out runs/ibq-grow

`--grow` copies a trained tokenizer and adds ResBlocks to its decoder at the code grid
(`decoder_extra_blocks`), each with its last conv zeroed so it starts as the identity: the copy encodes to
the same codes and decodes to the same pictures, and `train.tokenizer_ibq ... decoder_only=true` then trains
the larger decoder on codes that never change (a world model trained on them stays valid).
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


def grow_decoder(ibq, extra_blocks: int):
    """A copy of `ibq` with `extra_blocks` more identity-initialised decoder blocks at the code grid."""
    from model.vision_tokenizer import IBQ

    if not (isinstance(extra_blocks, int) and extra_blocks > 0):
        raise ValueError(f"decoder_extra_blocks: must be a positive integer to grow by, got {extra_blocks!r}")
    have = ibq.config.decoder_extra_blocks
    grown = IBQ(dataclasses.replace(ibq.config, decoder_extra_blocks=have + extra_blocks))
    missing, unexpected = grown.load_state_dict(ibq.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("decoder.extra.") for k in missing), (missing, unexpected)
    with torch.no_grad():
        for block in list(grown.decoder.extra)[have:]:
            block.conv2.weight.zero_()
            block.conv2.bias.zero_()
    return grown.eval()


def main(argv=None) -> None:
    from model.vision_tokenizer import IBQ, save_ibq

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--norm-groups", type=int, default=32, help="GroupNorm groups (the shipped tokenizer: 32)")
    p.add_argument("--patch-shortcut", action="store_true", help="add the linear patch path (model.vision_tokenizer.IBQ)")
    p.add_argument("--factor", type=int, default=8, help=f"downsampling factor, one of {sorted(FACTORS)} (shipped: 8)")
    p.add_argument("--base-channels", type=int, default=32, help="width of the first level (shipped: 32)")
    p.add_argument("--grow", metavar="DIR", help="a trained tokenizer folder to copy with a larger decoder")
    p.add_argument("--decoder-extra-blocks", type=int, default=4, help="with --grow: decoder blocks to add")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    try:
        if a.grow:
            from model.vision_tokenizer import load_ibq

            m = grow_decoder(load_ibq(a.grow), a.decoder_extra_blocks)
        else:
            m = IBQ(demo_small_config(a.norm_groups, a.patch_shortcut, a.factor, a.base_channels))
    except ValueError as e:
        p.error(str(e))
    save_ibq(m, a.out)
    print(f"{a.out}: {sum(x.numel() for x in m.parameters()) / 1e6:.2f}M params")


if __name__ == "__main__":
    main()
