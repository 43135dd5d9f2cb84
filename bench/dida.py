"""DiDA against autoregressive image decoding on the same model and prompts, in one run.

    python bench/dida.py [--preset demo] [--sizes 8,16,32,64] [--steps 4,8,16] [--device cpu] [--json]

For each image size (h = w tokens) the AR path (KV cache; the compiled one-token step too, when
--compile is given and it is faster) decodes one image token by token, and DiDA decodes it with K
parallel steps, both with guidance (two rows per forward) from the same prompt and seed, the same
sampler (inverse-CDF) and the same narrow head (visual codes only, inside the grid). Printed per size
and K: seconds per image (the median of --rounds runs; each round times every path once, so a machine
that slows down mid-run slows all of them), sequential forward passes per image, and the ratios.
Weights are random unless --checkpoint is given (timing does not depend on them); `native` marks the
checkpoint's trained image size. DiDA's block forward runs eager: it is matmul-bound, and compiling it
measured 0.35 s per 12x12 image against 0.33 s eager on the demo model. `--device cuda` runs a
mid-size random configuration (~1.3B parameters) at 64x64.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.dida import DiDASampler  # noqa: E402
from model.generate import ARImageSampler, ImageDone, compile_decode, generate  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402

MID_SIZE = dict(hidden_size=2048, intermediate_size=5632, num_layers=24, num_heads=16, num_kv_heads=4,
                head_dim=128)  # ~1.3B with the demo vocabulary: the lent-GPU check


def build(args):
    from model.config import preset
    from model.text_tokenizer import BPETokenizer, builtin_corpus
    from model.transformer import Transformer

    if args.checkpoint:
        from model import load_pretrained

        cpu = args.device == "cpu"  # shipped fp16 weights compute in fp32 on a CPU, as the engine does
        return load_pretrained(args.checkpoint, device=args.device, dtype=torch.float32 if cpu else None)
    cfg = preset(args.preset)
    if args.device.startswith("cuda"):
        cfg = cfg.replace(**MID_SIZE)
    biggest = max(args.sizes)
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, biggest * (biggest + 1) + 256))
    torch.manual_seed(0)
    model = Transformer(cfg).to(args.device).eval()
    if args.device.startswith("cuda"):
        model = model.to(torch.bfloat16)
    tok = BPETokenizer.train(builtin_corpus(), cfg.num_text_tokens, cfg.codebook_size)
    model.vocab, model.tokenizer = tok.vocab, tok
    return model


def decode_once(model, size: int, sampler, step=None) -> tuple[float, object]:
    v = model.vocab
    prompt = [v.bos, *model.tokenizer.encode("You are a helpful assistant for t2i task. USER: a red cube on "
                                             "a blue table ASSISTANT: ", allow_special=False), v.answer_start]
    uncond = [v.bos, *model.tokenizer.encode("You are a helpful assistant. USER:  ASSISTANT: ",
                                             allow_special=False), v.answer_start]
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    events = list(generate(model, prompt, uncond_ids=uncond, params=SamplingParams(max_new_tokens=16),
                           image_size=(size, size), start_with_image=True, image_sampler=sampler,
                           stop_ids=(v.answer_end,), min_images=1, max_images=1, generator=gen,
                           decode_step=step))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    assert any(isinstance(e, ImageDone) for e in events)
    return time.perf_counter() - t, events


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--checkpoint")
    p.add_argument("--native", type=int, default=None, help="the checkpoint's trained image side in tokens")
    p.add_argument("--sizes", default="8,16,32,64")
    p.add_argument("--steps", default="4,8,16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="also try the compiled AR decode step")
    p.add_argument("--rounds", type=int, default=3, help="timed runs per measurement; the median is reported")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(x) for x in args.sizes.split(",")]
        ks = [int(x) for x in args.steps.split(",")]
        if args.device.startswith("cuda") and args.sizes == [8, 16, 32, 64]:
            args.sizes = [64]
        model = build(args)
    except ValueError as e:
        p.error(str(e))
    decode_once(model, 4, ARImageSampler())  # warm-up
    decode_once(model, 4, DiDASampler(2))
    step = None
    if args.compile:
        step = compile_decode(model)
        decode_once(model, 4, ARImageSampler(), step)

    rows = []
    for size in args.sizes:
        n = size * size
        samplers = {k: DiDASampler(k) for k in ks}
        ar_paths = ["ar"] + (["ar-compiled"] if step is not None else [])
        times = {path: [] for path in [*ar_paths, *ks]}
        for _ in range(max(1, args.rounds)):  # rounds interleave the paths, so machine drift hits all alike
            for path in times:
                sampler = samplers[path] if path in samplers else ARImageSampler()
                times[path].append(decode_once(model, size, sampler, step if path == "ar-compiled" else None)[0])
        ar_s = min(statistics.median(times[path]) for path in ar_paths)
        ar_passes = n + size  # one forward per code, per EOL and for EOI
        for k in ks:
            dida_s = statistics.median(times[k])
            rows.append({"tokens": n, "k": k, "ar_seconds": ar_s, "dida_seconds": dida_s, "speedup": ar_s / dida_s,
                         "ar_passes": ar_passes, "dida_passes": samplers[k].forwards + 1,  # + the span's one chunk
                         "native": args.native == size})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    params = sum(q.numel() for q in model.parameters())
    print(f"{params / 1e6:.1f}M parameters ({'checkpoint' if args.checkpoint else 'random weights'}), "
          f"device {args.device}, guidance on (2 rows per forward)")
    print(f"{'tokens':>7}{'K':>4}{'AR s/img':>10}{'DiDA s/img':>12}{'speedup':>9}{'AR passes':>11}{'DiDA passes':>13}"
          f"{'pass ratio':>12}  native")
    for r in rows:
        print(f"{r['tokens']:>7}{r['k']:>4}{r['ar_seconds']:>10.3f}{r['dida_seconds']:>12.3f}{r['speedup']:>8.1f}x"
              f"{r['ar_passes']:>11}{r['dida_passes']:>13}{r['ar_passes'] / r['dida_passes']:>11.1f}x  {r['native']}")


if __name__ == "__main__":
    main()
