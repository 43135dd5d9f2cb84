"""Write the untrained `demo` tokenizer used by the shipped model: the IBQ `demo` preset's codebook
(2048 x 64) and factor 8, at a CPU-trainable width (base 32, levels 1-2-4-4: about 4.2M parameters,
the size of the issue's calibration run). train.tokenizer_ibq then trains it with `--init-from`.

    python -m train.sim.ibq_init --out runs/ibq-init
"""

from __future__ import annotations

import argparse
import dataclasses

import torch


def demo_small_config():
    from model.vision_tokenizer import ibq_preset

    return dataclasses.replace(ibq_preset("demo"), base_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=1)


def main(argv=None) -> None:
    from model.vision_tokenizer import IBQ, save_ibq

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    m = IBQ(demo_small_config())
    save_ibq(m, a.out)
    print(f"{a.out}: {sum(x.numel() for x in m.parameters()) / 1e6:.2f}M params")


if __name__ == "__main__":
    main()
