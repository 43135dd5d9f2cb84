"""Simulator data -> training-stack shards (train/data/format.py), reproducible from seeds.

    python -m train.sim.generate --sim doom    --out data/sim/doom    --episodes 200 --seed 0
    python -m train.sim.generate --sim doom    --out OUT --episodes 4 --wad freedoom1.wad --map E1M1 --split heldout
    python -m train.sim.generate --sim panda   --out data/sim/panda   --episodes 200 --seed 0 [--palette wide]
    python -m train.sim.generate --sim crafter --out data/sim/crafter --episodes 200 --seed 0

Episode i uses seed `[seed, i]`-derived simulator seeds; `--split heldout` shifts every seed by the
simulator's HELDOUT_SEED_OFFSET and (panda) switches to the held-out colour set, so held-out data never
shares a seed with training data. Training worlds (doom): every bundled single-player scenario and
freedoom2.wad MAP01-MAP10, cycled over the episodes; `--scenario` / `--wad --map` pin one world
(unseen maps for evaluation); OUT/worlds.json names each ViZDoom episode's world. Frames are PNG files
under OUT/frames/<episode>/ (keyframes, plus `x*.png` mid-motion frames that only the tokenizer trainer
reads); records reference them by relative path (`{"path": ...}`), tokenized at training time by the
trained IBQ (train/lm.py `vision_tokenizer`).
Ends with a one-line JSON summary; a bad input is `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from train import common
from train.sim.common import FrameWriter, check_episodes, check_split, episode_rng

SIMS = ("doom", "panda", "crafter")
WORLDS_FILE = "worlds.json"  # ViZDoom: {episode folder: world name}


def _doom(out, episodes, seed, split, world, steps):
    from train.sim import doom

    worlds = [world] if world else doom.train_worlds()
    if split == "train" and world and (world["kind"] == "wad" and not (
            os.path.basename(world["wad"]) == "freedoom2.wad" and world["map"] in doom.TRAIN_MAPS)):
        raise ValueError(f"split: {world['name']} is a held-out world; generate it with --split heldout")
    offset = doom.HELDOUT_SEED_OFFSET if split == "heldout" else 0
    recs, stats, world_of = [], {"frames": 0}, {}
    for i in range(episodes):
        w = worlds[i % len(worlds)]
        rng = episode_rng(seed + offset, i)
        ep_seed = int(rng.integers(2 ** 31 - 1))
        frames, actions = doom.episode(w, ep_seed, steps, warmup=int(rng.integers(0, 40)))
        write = FrameWriter(out, f"doom-{split}-{seed}-{i:05d}")
        world_of[write.episode] = w["name"]
        rel = [write(f) for f in frames]
        stats["frames"] += len(rel)
        recs += doom.records(rel, actions, w["name"], rng)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, WORLDS_FILE), "w") as f:  # per-episode figures (train.sim.tokenizer_eval)
        json.dump(world_of, f, indent=0, sort_keys=True)
    return recs, stats


def _panda(out, episodes, seed, split, palette):
    from train.sim import panda

    offset = panda.HELDOUT_SEED_OFFSET if split == "heldout" else 0
    recs, stats = [], {"frames": 0, "subtasks": 0, "subtasks_done": 0}
    for i in range(episodes):
        rng = episode_rng(seed + offset, i)
        task = panda.TASKS[i % len(panda.TASKS)]
        ep = panda.episode(task, int(rng.integers(2 ** 31 - 1)), split, palette)
        stats["subtasks"] += len(ep.done)
        stats["subtasks_done"] += sum(ep.done)
        if not all(ep.done):
            continue  # a plan the script could not finish is not a demonstration
        write = FrameWriter(out, f"panda-{split}-{seed}-{i:05d}")
        rel = [write(f) for f in ep.frames]
        for k, f in enumerate(ep.extra_frames):
            write(f, f"x{k:03d}")
        stats["frames"] += len(rel)
        recs += panda.records(ep, rel)
    return recs, stats


def _crafter(out, episodes, seed, split):
    from train.sim import craft

    offset = craft.HELDOUT_SEED_OFFSET if split == "heldout" else 0
    targets = sorted(craft.PLANS)
    recs, stats = [], {"frames": 0, "howto_complete": 0, "stories": 0}
    for i in range(episodes):
        rng = episode_rng(seed + offset, i)
        world_seed = int(rng.integers(craft.HELDOUT_SEED_OFFSET)) + offset
        write = FrameWriter(out, f"crafter-{split}-{seed}-{i:05d}")
        if i % 3 == 2:
            walk = craft.story(world_seed)
            rel = [write(f) for f in walk.frames]
            recs += craft.story_records(walk, rel)
            stats["stories"] += 1
        else:
            target = targets[int(rng.integers(len(targets)))]
            walk = craft.howto(target, world_seed)
            if not craft.completes(walk, target):
                continue
            rel = [write(f) for f in walk.frames]
            recs += craft.howto_records(target, walk, rel)
            stats["howto_complete"] += 1
        for k, f in enumerate(walk.extra_frames):
            write(f, f"x{k:03d}")
        stats["frames"] += len(rel)
    return recs, stats


def generate(sim: str, out: str, episodes: int, seed: int = 0, split: str = "train", scenario: str | None = None,
             wad: str | None = None, map_name: str | None = None, steps: int = 24,
             records_per_shard: int = 500, palette: str = "train") -> dict:
    from train.data import format as fmt

    if sim not in SIMS:
        raise ValueError(f"sim: must be one of {list(SIMS)}, got {sim!r}")
    check_episodes(episodes)
    check_split(split)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
    if (scenario or wad or map_name) and sim != "doom":
        raise ValueError("scenario/wad/map: only for --sim doom")
    if palette != "train" and (sim, split) != ("panda", "train"):
        raise ValueError(f"palette: only panda training data take one (held-out data keep the held-out colours), "
                         f"got {palette!r} for --sim {sim} --split {split}")
    if sim == "doom":
        from train.sim import doom

        world = doom.resolve_world(scenario, wad, map_name) if (scenario or wad or map_name) else None
        if steps <= 0:
            raise ValueError(f"steps: must be > 0, got {steps}")
        recs, stats = _doom(out, episodes, seed, split, world, steps)
    elif sim == "panda":
        recs, stats = _panda(out, episodes, seed, split, palette)
    else:
        recs, stats = _crafter(out, episodes, seed, split)
    if not recs:
        raise ValueError(f"{sim}: no complete episodes were generated; try more --episodes")
    source = f"train.sim.generate --sim {sim} --split {split} --seed {seed} --episodes {episodes}"
    source += f" --palette {palette}" if palette != "train" else ""
    shards = fmt.write_shards(out, recs, codebook_size=None, records_per_shard=records_per_shard, source=source,
                              prefix=f"{sim}-{split}-{seed}")
    return {"sim": sim, "split": split, "seed": seed, "episodes": episodes, "records": len(recs),
            "shards": len(shards), "out": out, **stats}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sim", required=True, choices=SIMS)
    p.add_argument("--out", required=True)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=("train", "heldout"))
    p.add_argument("--scenario")
    p.add_argument("--wad")
    p.add_argument("--map", dest="map_name")
    p.add_argument("--steps", type=int, default=24, help="recorded steps per doom episode")
    p.add_argument("--palette", default="train", help="panda training colours: train (4) or wide (16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (none are needed; keep 1 beside training)")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    return common.print_summary(
        lambda: generate(a.sim, a.out, a.episodes, a.seed, a.split, a.scenario, a.wad, a.map_name, a.steps,
                                palette=a.palette))


if __name__ == "__main__":
    sys.exit(main())
