"""Reconstruction PSNR of an IBQ tokenizer on held-out simulator frames, per simulator, plus codebook use.

    python -m train.sim.tokenizer_eval --vision-tokenizer DIR --data-root runs/simdata [--panda-episodes 12]

Frames are the keyframes (`NNN.png`, not the tokenizer-only `x*.png`) of every `*-heldout` / `*-unseen-*`
folder under --data-root, encoded and decoded at their native size (ViZDoom 160x120, Crafter and
PyBullet 128x128; all multiples of 8); at most `max_frames` a folder, evenly spaced over its episodes.
ViZDoom folders with several worlds (train.sim.generate's worlds.json) also get `per_world`,
`scenarios_psnr` (the bundled scenarios) and `maps_psnr` (the wad maps). PyBullet is re-simulated from
the held-out seeds so the object and arm pixels come from PyBullet's segmentation mask (`object_psnr`).
Codebook use = distinct codes over all these frames / codebook size.

`--areas A [A ...]` adds, for every ViZDoom held-out folder, the next-frame figures the explore evaluation
(train.evaluate) reports, at each world-model image area A (px; frames resized as the world model sees
them): `baseline_psnr` (copy the last frame), `prev_tokens_psnr` (the last frame's decoded codes) and
`tokenizer_psnr` (the true next frame's decoded codes: what a perfect world model would score), over
consecutive keyframes of every episode. `ceiling_margin` = tokenizer_psnr - baseline_psnr: the explore
gate asks the model for copy-last + 1.5 dB, which no model reaches when this margin is below 1.5.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

import numpy as np
import torch


def reconstruct(ibq, frame: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    from model.vision_tokenizer import to_tensor

    with torch.no_grad():
        x = to_tensor(frame)[None].to(next(ibq.parameters()).dtype)
        codes = ibq.encode(x)
        y = ibq.decode(codes)[0].float()
    return ((y + 1) * 127.5).clamp(0, 255).round().byte().permute(1, 2, 0).numpy(), codes


def next_frame(ibq, episodes: list[list[str]], area: int) -> dict:
    """Next-frame PSNR figures at the world model's image `area` over consecutive keyframes of each
    episode (`episodes`: lists of frame files in order)."""
    from PIL import Image

    from model.vision_tokenizer import resize_to_area
    from train.sim.common import psnr

    rows = []
    for files in episodes:
        small, rec = [], []
        for f in files:
            with Image.open(f) as im:
                small.append(np.asarray(resize_to_area(im.convert("RGB"), area, ibq.config.downsample_factor)))
            rec.append(reconstruct(ibq, small[-1])[0])
        rows += [(psnr(small[k], small[k - 1]), psnr(small[k], rec[k - 1]), psnr(small[k], rec[k]))
                 for k in range(1, len(files))]
    if not rows:
        raise ValueError("areas: the ViZDoom folders hold no episode of two or more keyframes")
    base, prev, ceil = (round(float(np.mean(c)), 2) for c in zip(*rows))
    return {"baseline_psnr": base, "prev_tokens_psnr": prev, "tokenizer_psnr": ceil,
            "ceiling_margin": round(ceil - base, 2), "pairs": len(rows)}


def _keyframes(folder: str) -> list[str]:
    return sorted(f for f in glob.glob(os.path.join(folder, "frames", "*", "*.png"))
                  if re.fullmatch(r"\d+\.png", os.path.basename(f)))


def _worlds(folder: str) -> dict:
    """{episode folder: world name} from train.sim.generate's worlds.json ({} when there is none)."""
    from train.sim.generate import WORLDS_FILE

    path = os.path.join(folder, WORLDS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def evaluate(ibq, data_root: str, panda_episodes: int = 12, max_frames: int = 300, areas=()) -> dict:
    from PIL import Image

    from train.sim.common import psnr

    used = torch.zeros(ibq.config.codebook_size, dtype=torch.bool)
    out = {}
    for folder in sorted(glob.glob(os.path.join(data_root, "*"))):
        name = os.path.basename(folder)
        if not os.path.isdir(folder) or not ("heldout" in name or "unseen" in name) or name.startswith("panda"):
            continue
        keyframes = _keyframes(folder)
        files = keyframes[::-(-len(keyframes) // max_frames)] if keyframes else keyframes  # evenly spaced, every episode
        vals, by_world = [], {}
        world_of = _worlds(folder)
        for f in files:
            with Image.open(f) as im:
                a = np.asarray(im.convert("RGB"))
            rec, codes = reconstruct(ibq, a)
            used[codes.flatten()] = True
            vals.append(psnr(a, rec))
            world = world_of.get(os.path.basename(os.path.dirname(f)))
            if world:
                by_world.setdefault(world, []).append(vals[-1])
        if vals:
            out[name] = {"psnr": round(float(np.mean(vals)), 2), "frames": len(vals)}
        if len(by_world) > 1:  # ViZDoom's cycled training worlds: bundled scenarios apart from wad maps
            from train.sim.doom import TRAIN_SCENARIOS

            out[name]["per_world"] = {w: round(float(np.mean(v)), 2) for w, v in sorted(by_world.items())}
            for key, keep in (("scenarios_psnr", True), ("maps_psnr", False)):
                v = [x for w, xs in by_world.items() if (w in TRAIN_SCENARIOS) == keep for x in xs]
                if v:
                    out[name][key] = round(float(np.mean(v)), 2)
        if vals and areas and name.startswith("doom"):
            episodes = {}
            for f in keyframes:
                episodes.setdefault(os.path.dirname(f), []).append(f)
            out[name]["next_frame"] = {str(a): next_frame(ibq, list(episodes.values()), a) for a in areas}
    from train.sim import panda

    whole, obj = [], []
    for i in range(panda_episodes):
        ep = panda.episode(panda.TASKS[i % 4], panda.HELDOUT_SEED_OFFSET + 1000 + i, "heldout")
        for f, m in zip(ep.frames, ep.masks):
            rec, codes = reconstruct(ibq, f)
            used[codes.flatten()] = True
            whole.append(psnr(f, rec))
            obj.append(psnr(f, rec, m))
    out["panda-heldout"] = {"psnr": round(float(np.mean(whole)), 2),
                            "object_psnr": round(float(np.nanmean(obj)), 2), "frames": len(whole)}
    out["codebook_use"] = round(float(used.float().mean()), 4)
    return out


def main(argv=None) -> None:
    from model.vision_tokenizer import load_ibq

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vision-tokenizer", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--panda-episodes", type=int, default=12)
    p.add_argument("--areas", type=int, nargs="*", default=[], metavar="PX",
                   help="world-model image areas for the ViZDoom next-frame figures (e.g. 9216 for 96x96)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    ibq = load_ibq(a.vision_tokenizer).float().eval()
    try:
        out = evaluate(ibq, a.data_root, a.panda_episodes, areas=a.areas)
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
