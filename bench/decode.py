"""Decode speed of the decoder with and without the KV cache, side by side in one run.

    python bench/decode.py [--preset debug] [--prompt 256] [--new 256] [--compile] [--device cpu] [--json]

Both paths decode the same greedy continuation of the same random prompt on the same weights (the
script checks that the tokens agree). Without the cache every step re-runs the whole sequence; with
it each step runs one token against the cached keys. `--compile` adds a third row with the
torch.compile'd one-token step (model.generate.compile_decode); its compile time is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.config import preset  # noqa: E402
from model.generate import compile_decode  # noqa: E402
from model.transformer import Transformer  # noqa: E402


@torch.no_grad()
def decode_full(model, prompt: torch.Tensor, n: int) -> list[int]:
    ids = prompt
    for _ in range(n):
        nxt = model(ids, last_only=True)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        ids = torch.cat([ids, nxt], 1)
    return ids[0, prompt.shape[1]:].tolist()


@torch.no_grad()
def decode_cached(model, prompt: torch.Tensor, n: int, step=None) -> list[int]:
    step = step or (lambda x, c: model(x, cache=c))
    cache = model.new_cache(1, prompt.shape[1] + n)
    nxt = model(prompt, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    out = [int(nxt)]
    for _ in range(n - 1):
        nxt = step(nxt, cache)[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
    return out


def timed(fn, *args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug")
    p.add_argument("--prompt", type=int, default=256, help="prompt length in tokens")
    p.add_argument("--new", type=int, default=256, help="tokens to generate")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode step")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        run(args)
    except ValueError as e:  # the model's ValueErrors name the field at fault: report them as usage errors
        p.error(str(e))


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = Transformer(preset(args.preset)).to(args.device).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), device=args.device)
    decode_cached(model, prompt[:, :16], 4)  # warm-up
    decode_full(model, prompt[:, :16], 4)

    rows = []
    ref, secs = timed(decode_full, model, prompt, args.new)
    rows.append({"path": "no cache", "seconds": secs, "tokens_per_s": args.new / secs})
    out, secs = timed(decode_cached, model, prompt, args.new)
    rows.append({"path": "kv cache", "seconds": secs, "tokens_per_s": args.new / secs, "same_tokens": out == ref})
    if args.compile:
        step = compile_decode(model)
        _, compile_secs = timed(decode_cached, model, prompt, 8, step)
        out, secs = timed(decode_cached, model, prompt, args.new, step)
        rows.append({"path": "kv cache + compile", "seconds": secs, "tokens_per_s": args.new / secs,
                     "same_tokens": out == ref, "compile_seconds": compile_secs})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_no_cache"] = r["tokens_per_s"] / base
    if args.json:
        print(json.dumps({"preset": args.preset, "prompt": args.prompt, "new": args.new,
                          "device": args.device, "rows": rows}, indent=2))
        return
    print(f"preset {args.preset}, device {args.device}, prompt {args.prompt} tokens, {args.new} new tokens, greedy")
    print(f"{'path':<20}{'tokens/s':>10}{'seconds':>10}{'ratio':>8}  same tokens")
    for r in rows:
        print(f"{r['path']:<20}{r['tokens_per_s']:>10.1f}{r['seconds']:>10.2f}{r['speedup_vs_no_cache']:>7.2f}x"
              f"  {r.get('same_tokens', '-')}")
    if args.compile:
        print(f"(compile time {rows[-1]['compile_seconds']:.1f} s, not counted above)")


if __name__ == "__main__":
    main()
