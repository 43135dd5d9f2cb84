"""`python -m model.info --preset NAME`: build a preset on the meta device (nothing is allocated)
and print its parameter counts and bf16 size."""

from __future__ import annotations

import argparse

import torch

from model.config import PRESETS, preset
from model.transformer import Transformer


def describe(name: str) -> dict:
    cfg = preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = model.num_parameters()
    return {"preset": name, **counts, "config": cfg.to_dict()}


def human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="debug", help=f"one of {sorted(PRESETS)}")
    args = parser.parse_args(argv)
    try:
        info = describe(args.preset)
    except ValueError as e:
        parser.error(str(e))
    print(f"preset      {info['preset']}")
    for key in ("total", "layers", "embeddings"):
        print(f"{key:<11} {human(info[key]):>7}  ({info[key]:,} parameters)")
    size = info["total"] * 2
    print(f"bf16 size   {size / 1e9:.1f} GB" if size >= 1e9 else f"bf16 size   {size / 1e6:.1f} MB")
    cfg = info["config"]
    print(f"shape       {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, ffn {cfg['intermediate_size']}, "
          f"{cfg['num_heads']} q / {cfg['num_kv_heads']} kv heads x {cfg['head_dim']}, vocab {cfg['vocab_size']:,}, "
          f"context {cfg['max_position_embeddings']:,}")


if __name__ == "__main__":
    main()
