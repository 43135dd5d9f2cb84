"""Self-distillation data for DiDA adaptation (SPEC §5; paper §4.3: "SFT data plus the AR model's own
outputs"): training records whose answer images are replaced by the images the AR model draws for them.

    python -m train.self_distill --checkpoint runs/sft-sim --data runs/simdata/panda-train \
        runs/simdata/doom-train --records 200 --out runs/self-distill

For each record, in order, every answer image (the answers of follow-up turns included) is generated
token by token from the record's ids up to that image, at the ground truth's size. Text is kept as
written (forced), and an image drawn earlier in the record stands in for the ground truth in the
prefix of later ones, so each record is one sequence the AR model itself could have produced with that
text. Prompt images stay real. The shards store code grids, so the DiDA trainer reads the teacher's
exact codes (no re-encoding).

Decoding is greedy by default (`--temperature 0`, no guidance): the DiDA student then learns the AR
model's most likely image, the one `train.evaluate` scores. `--records` is per `--data` argument
(records drawn at random with `--seed`, the same every run); `--max-images` caps the answer images
per record by dropping whole follow-up turns (a first answer is always kept whole); `--tasks` keeps only
records of those tasks (`--tasks howto`: a model's own keyframes for its how-to answers, assets/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def answer_images(rec: dict) -> list[dict]:
    """The IMAGE dicts of a record's answers, in sequence order (first answer, then each turn's)."""
    return [s["image"] for t in [rec, *rec.get("turns", [])] for s in t["answer"] if "image" in s]


def cap_images(rec: dict, max_images: int) -> dict:
    """rec without the follow-up turns that would take its answer images past max_images."""
    keep, n = [], sum("image" in s for s in rec["answer"])
    for t in rec.get("turns", []):
        n += sum("image" in s for s in t["answer"])
        if n > max_images:
            break
        keep.append(t)
    out = {k: v for k, v in rec.items() if k != "turns"}
    if keep:
        out["turns"] = keep
    return out


def distill_record(rec: dict, tokenizer, next_image) -> int:
    """Replace rec's answer images (codes records, in place) by next_image(prefix_ids, (h, w)); returns
    how many were drawn. An answer image starts at a loss-bearing BOI in the record's SFT ids."""
    from train.data.format import encode_record

    vocab = tokenizer.vocab
    enc = encode_record(rec, tokenizer, mode="sft", visual_weight=1.0)
    ids = list(enc.ids)
    starts = [i for i, (t, w) in enumerate(zip(ids, enc.weights)) if t == vocab.boi and w > 0]
    targets = answer_images(rec)
    if len(starts) != len(targets):
        raise RuntimeError(f"record: found {len(starts)} answer images in its ids, expected {len(targets)}")
    for at, im in zip(starts, targets):
        h, w = len(im["codes"]), len(im["codes"][0])
        drawn = [list(map(int, r)) for r in next_image(ids[:at], (h, w))]
        span = vocab.image_ids(drawn)
        if len(vocab.image_ids(im["codes"])) != len(span):
            raise RuntimeError("record: the drawn image's span does not match the ground truth's")
        ids[at:at + len(span)] = span
        im["codes"] = drawn
    return len(starts)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the AR teacher: a packaged model folder with its "
                                                       "vision_tokenizer/ (train.sim.package writes one)")
    p.add_argument("--data", nargs="+", required=True, help="shard files or folders; --records are drawn from each")
    p.add_argument("--out", required=True)
    p.add_argument("--records", type=int, default=100, help="records per --data argument")
    p.add_argument("--max-images", type=int, default=4, help="answer images per record at most")
    p.add_argument("--image-area", type=int, default=96 * 96, help="px area path images are tokenized at "
                                                                   "(the trainers' image_area)")
    p.add_argument("--tasks", nargs="+", default=None, help="only records of these tasks (train/data/format.py "
                                                             "TASKS, e.g. howto); default: every task")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    for name in ("records", "max_images", "image_area"):
        if getattr(a, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')}: must be a positive integer, got {getattr(a, name)}")
    import torch

    from train.data.format import TASKS, map_images, read_shard, shard_paths, write_shards
    from train.data.vision import image_codes
    from train.evaluate import Evaluator

    unknown = sorted(set(a.tasks or ()) - set(TASKS))
    if unknown:
        raise SystemExit(f"error: --tasks: unknown {unknown}; allowed: {sorted(TASKS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        ev = Evaluator(a.checkpoint, "ar", image_area=a.image_area, seed=a.seed, temperature=a.temperature)
        sources = [shard_paths([d]) for d in a.data]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    cache: dict[str, list] = {}

    def codes_of(im: dict) -> dict:  # path images -> codes (distill_record replaces, never edits, a grid)
        if "codes" in im:
            return {"codes": im["codes"]}
        if im["path"] not in cache:
            cache[im["path"]] = image_codes(ev.vq, im["path"], a.image_area)
        return {"codes": cache[im["path"]]}

    rng = np.random.default_rng(a.seed)
    out, drawn, t0 = [], 0, time.time()
    for d, paths in zip(a.data, sources):
        recs = [rec for path in paths for rec in read_shard(path)  # image paths come back absolute
                if rec["task"] != "interleaved" and answer_images(rec)
                and (a.tasks is None or rec["task"] in a.tasks)]
        pick = rng.permutation(len(recs))[:a.records]
        for n, i in enumerate(sorted(pick.tolist()), start=1):
            rec = map_images(cap_images(recs[i], a.max_images), codes_of)
            drawn += distill_record(rec, ev.tok, ev.next_image)
            out.append(rec)
            if n % 25 == 0:
                print(f"[self-distill] {d}: {n}/{len(pick)} records, {time.time() - t0:.0f} s", file=sys.stderr,
                      flush=True)
        print(f"[self-distill] {d}: {len(pick)} of {len(recs)} records, {drawn} images so far, "
              f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    write_shards(a.out, out, codebook_size=ev.vocab.codebook_size, source=f"self-distill of {a.checkpoint}")
    summary = {"records": len(out), "images": drawn, "seconds": round(time.time() - t0, 1),
               "teacher": a.checkpoint, "temperature": a.temperature, "out": a.out}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
