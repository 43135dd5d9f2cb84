"""The video decoder's few-step sampling against its many-step sampling, on the same decoder, keyframes
and noise, in one run.

    python bench/video.py [--checkpoint DIR] [--frames 8,24] [--steps 4,32] [--rounds 3] [--device cpu] [--json]

For each clip length (frames, first and last given clean, as `train.evaluate --task video` and the
renderer give them) and each step count, the median over --rounds of the seconds to sample one clip,
the generated frames per second, the sequential DiT forwards, and the ratio against the largest step
count. Weights are the checkpoint's (default: the installed decoder, worldsim.video.find_video_decoder)
or, with --preset, random (timing does not depend on them).
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


def build(args):
    from model.video_sampling import DecoderSettings, load_video_decoder

    if args.preset:
        from model.video_decoder import VideoDecoder, video_decoder_preset
        from model.vision_tokenizer import IBQ, ibq_preset

        torch.manual_seed(0)
        ibq = IBQ(ibq_preset("demo")).eval()
        model = VideoDecoder(**video_decoder_preset(args.preset, ibq.config.embed_dim)).eval()
        default = DecoderSettings()  # the frame size and shift a trained decoder gets by default
        return model.to(args.device), ibq.to(args.device), default.frame_size, default.shift, f"random {args.preset}"
    from worldsim.video import find_video_decoder

    path = find_video_decoder(args.checkpoint)
    if path is None:
        raise ValueError("checkpoint: no video decoder installed; pass --checkpoint DIR or --preset small")
    model, ibq, settings = load_video_decoder(path, args.device)
    return model, ibq, tuple(settings.frame_size), settings.shift, path


def main(argv=None) -> int:
    from model.video_sampling import build_conditions, sample_video

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--preset", help="random weights of this model.video_decoder preset instead of a checkpoint")
    p.add_argument("--frames", default="8,24")
    p.add_argument("--steps", default="4,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        model, ibq, (H, W), shift, name = build(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps = sorted({int(s) for s in args.steps.split(",")})
    rows = []
    for n in (int(f) for f in args.frames.split(",")):
        keys = torch.rand(1, 2, 3, H, W, generator=torch.Generator().manual_seed(n)) * 2 - 1
        cond = build_conditions(keys.to(args.device), [[0, n - 1]], n, ibq)
        times = {}
        for k in steps:
            runs = []
            for r in range(args.rounds + 1):  # round 0 warms up
                t0 = time.perf_counter()
                sample_video(model, cond, num_steps=k, shift=shift, generator=torch.Generator().manual_seed(r))
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                runs.append(time.perf_counter() - t0)
            times[k] = statistics.median(runs[1:])
        for k in steps:
            rows.append({"frames": n, "steps": k, "seconds": round(times[k], 4),
                         "frames_per_second": round((n - 2) / times[k], 2), "forwards": k,
                         "speedup_vs_many": round(times[steps[-1]] / times[k], 2)})
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"video decoder: {name}, {H}x{W} px frames, device {args.device}, median of {args.rounds} rounds")
    print(f"{'frames':>6} {'steps':>5} {'s/clip':>8} {'new frames/s':>12} {'forwards':>8} {'vs ' + str(steps[-1]) + ' steps':>12}")
    for r in rows:
        print(f"{r['frames']:>6} {r['steps']:>5} {r['seconds']:>8.3f} {r['frames_per_second']:>12.2f} "
              f"{r['forwards']:>8} {r['speedup_vs_many']:>11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
