"""Pretraining throughput (tokens/s) of the `debug` and `demo` presets on this machine, side by side.

    python bench/train_throughput.py [--steps 12] [--device cpu] [--presets debug demo]

Runs the real trainer (train/pretrain.py: packing, document masks, weighted CE, AdamW, clipping) on
synthetic shards written to a temporary folder: interleaved documents of random text and random code
grids (16x16 for demo, a 256x256 px image at factor 16; 8x8 for debug's 512-token rows), and a BPE trained to each preset's text size on random
pseudo-words. Tokens/s counts the real (non-padding) tokens of each step; the first 2 steps (warm-up)
are left out and the median of the rest is reported. Numbers are for comparison on one machine only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.config import preset  # noqa: E402
from model.text_tokenizer import BPETokenizer  # noqa: E402
from train import pretrain  # noqa: E402
from train.data import format as fmt  # noqa: E402

SETTINGS = {"debug": dict(seq_len=512, batch_size=8, micro_batch_size=8),
            "demo": dict(seq_len=1024, batch_size=8, micro_batch_size=4)}


def synthetic(root: str, name: str, num_docs: int = 64) -> tuple[str, str]:
    cfg = preset(name)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(20000)]
    corpus = [" ".join(rng.choice(words) for _ in range(400)) for _ in range(400)]
    tok = BPETokenizer.train(corpus, cfg.num_text_tokens, cfg.codebook_size)
    if len(tok.ranks()) != cfg.num_text_tokens:
        raise SystemExit(f"synthetic corpus too small for {cfg.num_text_tokens} tokens")
    tok.save(os.path.join(root, f"tok-{name}"))
    side = 16 if name == "demo" else 8  # demo: 256x256 px images at factor 16; debug: 8x8 grids fit 512
    recs = []
    for _ in range(num_docs):
        segs = []
        for _ in range(2):
            segs.append(fmt.text(" ".join(rng.choice(words) for _ in range(40 if name == "demo" else 15))))
            segs.append(fmt.image_codes([[rng.randrange(cfg.codebook_size) for _ in range(side)] for _ in range(side)]))
        recs.append(fmt.record(fmt.INTERLEAVED, segs))
    data = os.path.join(root, f"data-{name}")
    fmt.write_shard(os.path.join(data, "s.jsonl"), recs, codebook_size=cfg.codebook_size)
    return data, os.path.join(root, f"tok-{name}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--presets", nargs="+", default=["debug", "demo"], choices=sorted(SETTINGS))
    a = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for name in a.presets:
            data, tok = synthetic(root, name)
            recipe = pretrain.debug_cpu() if name == "debug" else pretrain.demo_cpu()
            cfg = dataclasses.replace(recipe, out_dir=os.path.join(root, f"run-{name}"), data=(data,), tokenizer=tok,
                                      steps=a.steps, save_every=0, progress=False, device=a.device,
                                      warmup_steps=2, **SETTINGS[name])
            t0 = time.perf_counter()
            entries = pretrain.main(cfg)
            wall = time.perf_counter() - t0
            rates = [e["tokens_per_s"] for e in entries[2:]]
            params = sum(v for k, v in _params(name).items() if k == "total")
            results[name] = {"preset": name, "params_m": round(params / 1e6, 2), "seq_len": cfg.seq_len,
                             "batch_size": cfg.batch_size, "steps": a.steps, "device": a.device,
                             "tokens_per_s_median": round(statistics.median(rates), 1),
                             "tokens_per_s_min": round(min(rates), 1), "tokens_per_s_max": round(max(rates), 1),
                             "tokens_per_step": entries[-1]["tokens"], "wall_s": round(wall, 1)}
            print(json.dumps(results[name]), flush=True)
    if "debug" in results and "demo" in results:
        r = results["debug"]["tokens_per_s_median"] / results["demo"]["tokens_per_s_median"]
        print(f"debug / demo tokens/s: {r:.1f}x")


def _params(name: str) -> dict:
    import torch

    from model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(preset(name)).num_parameters()


if __name__ == "__main__":
    main()
