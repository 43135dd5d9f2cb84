"""Shards with path images -> the same shards with IBQ code grids, tokenized once and in batches.

    python -m train.data.pretokenize --vision-tokenizer DIR --image-area 9216 --data runs/simdata/doom-train \
        --out runs/simcodes/doom-train

A trainer given path-image shards encodes each image the first time it meets it, one at a time, inside
its step loop; on the demo data (~7,800 frames) that is most of a short CPU run. Pretokenized shards
skip it (and a run no longer needs `vision_tokenizer`). Each shard keeps its file name; the header's
codebook_size is the IBQ's. Codes equal train.data.vision.image_codes at the same image area.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def pretokenize(ibq, data: str, out: str, image_area: int, batch_size: int = 32) -> dict:
    from train.data.format import map_images, read_shard, record_images, shard_paths, write_shard
    from train.data.vision import many_image_codes

    shards = {p: list(read_shard(p)) for p in shard_paths([data])}
    paths = sorted({im["path"] for recs in shards.values() for r in recs for im in record_images(r) if "path" in im})
    codes = dict(zip(paths, many_image_codes(ibq, paths, image_area, batch_size)))
    for p, recs in shards.items():
        write_shard(os.path.join(out, os.path.basename(p)),
                    [map_images(r, lambda im: {"codes": codes[im["path"]]} if "path" in im else im) for r in recs],
                    codebook_size=ibq.config.codebook_size, source=f"pretokenized {p} at image_area {image_area}")
    return {"shards": len(shards), "records": sum(map(len, shards.values())), "images": len(paths), "out": out}


def main(argv=None) -> dict:
    import torch

    from train.data.vision import load_vision_tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vision-tokenizer", required=True)
    p.add_argument("--image-area", type=int, required=True, help="px per image (the trainers' image_area)")
    p.add_argument("--data", required=True, help="a shard file or a folder of shards")
    p.add_argument("--out", required=True, help="folder for the pretokenized shards")
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args(argv)
    t0 = time.time()
    try:
        if a.image_area <= 0 or a.batch_size <= 0:
            raise ValueError(f"image_area, batch_size: must be positive, got {a.image_area}, {a.batch_size}")
        if os.path.abspath(a.out) == os.path.abspath(a.data):
            raise ValueError("out: must differ from --data (the path-image shards are kept)")
        ibq = load_vision_tokenizer(a.vision_tokenizer).float().eval()
        with torch.no_grad():
            summary = pretokenize(ibq, a.data, a.out, a.image_area, a.batch_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    summary["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
