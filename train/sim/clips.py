"""Continuous simulator clips for the video decoder (issue 8): its training data and its held-out
evaluation (`train.evaluate --task video`) come from the same generators, split by seed (and, for
PyBullet, by colour set) like the rest of train/sim.

    python -m train.sim.clips --sim vizdoom --split train --num 400 --num-frames 24 --seed 0 --out runs/video-clips

writes `out/{sim}/{i:05d}/{k:03d}.png` (the clip folders `train.video_decoder --clips` reads) and prints
{"sim", "split", "clips", "frames", "redrawn_clips"} as JSON.

The clips:
- vizdoom: doom.policy's random walk (`doom.TICS` tics a frame, i.e. a world step; `doom_tics=1` records
  every tic, the frames a renderer in-betweens two world steps with) after 0-39 unrecorded steps; training
  clips run in doom.train_worlds() (the bundled scenarios and freedoom2 MAP01-MAP10) with seeds below
  doom.HELDOUT_SEED_OFFSET, held-out ones in the training scenarios (or the given world) with seeds above
  it. A clip in which the player dies or the episode restarts is a cut, not a trajectory, so it is
  redrawn with the next seed (`redrawn_clips`). Training clips are cut short at a death instead when at
  least 8 frames remain (in deadly_corridor few walks of 24 frames survive).
- crafter: the player walking in runs of 2-4 moves one way (one tile a frame; a blocked move only turns
  it) after 0-19 unrecorded moves; a death redraws as above.
- pybullet: panda.episode keeps only the frame at each subtask's end (and one per arm move), too far
  apart for in-betweening, so the clip drives PandaWorld itself: the arm grasps a cube (not recorded),
  then carries it to above the pad along a straight line of IK targets (PANDA_CARRY_FRAMES frames for
  the whole carry: a shorter clip is its start), each reached with physics steps and rendered (real
  frames of one continuous motion, nothing interpolated).
  Training scenes use panda.TRAIN_COLOURS, held-out ones panda.HELDOUT_COLOURS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from train.sim.common import check_split

SIMS = ("vizdoom", "crafter", "pybullet")


def doom_clip(world: dict, seed: int, warmup: int, num_frames: int, min_frames: int | None = None,
              tics: int | None = None) -> np.ndarray | None:
    """(num_frames, H, W, 3) uint8 of doom.episode's walk (same policy and seeding), a frame every `tics`
    tics (default doom.TICS: one world step a frame; 1 records every tic, the engine's 35 fps, so a world
    step spans TICS frames). When the player dies or the episode ends inside the recorded frames (the
    engine restarts: a cut), the frames before the cut if there are at least `min_frames` (default
    num_frames: the whole clip), else None."""
    from train.sim import doom

    tics = tics or doom.TICS
    if not 1 <= tics <= doom.TICS or doom.TICS % tics:
        raise ValueError(f"tics: must divide {doom.TICS} (tics per world step), got {tics}")
    per_step = doom.TICS // tics
    steps = -(-(num_frames - 1) // per_step)
    acts = doom.policy(np.random.default_rng([seed, 7]), warmup + steps)
    w = doom.DoomWorld(world, seed)
    try:
        for a in acts[:warmup]:
            w.step(a)
        frames, t = [w.frame()], w.game.get_episode_time()
        for a in [a for a in acts[warmup:] for _ in range(per_step)][:num_frames - 1]:
            frames.append(w.step(a, tics))
            if w.game.get_episode_time() <= t:  # restarted
                frames.pop()
                return np.stack(frames) if len(frames) >= (min_frames or num_frames) else None
            t = w.game.get_episode_time()
        return np.stack(frames)
    finally:
        w.close()


def crafter_clip(seed: int, warmup: int, num_frames: int) -> np.ndarray | None:
    """(num_frames, 128, 128, 3) uint8 of the player walking in runs of 2-4 moves one way, after `warmup`
    moves; None when the player died."""
    from train.sim import craft

    rng = np.random.default_rng([seed, 17])
    moves = []
    while len(moves) < warmup + num_frames - 1:
        moves += [list(craft.MOVES)[int(rng.integers(len(craft.MOVES)))]] * int(rng.integers(2, 5))
    ag = craft.Agent(seed)
    for m in moves[:warmup]:
        ag.act(m)
    frames = [ag.obs.copy()]
    for m in moves[warmup:warmup + num_frames - 1]:
        ag.act(m)
        frames.append(ag.obs.copy())
    return None if ag.dead else np.stack(frames)


PANDA_CARRY_FRAMES = 16  # a carry's frames: the arm's speed, whatever the clip's length


def panda_clip(seed: int, num_frames: int, split: str = "heldout") -> np.ndarray:
    """(num_frames, 128, 128, 3) uint8: the arm carries a grasped cube towards 12 cm above the pad through
    evenly spaced IK targets, rendered at each (colours of `split`). The carry takes PANDA_CARRY_FRAMES
    frames (more when num_frames is larger), so a short clip is the carry's start at the same speed."""
    from train.sim import panda

    colours = panda.TRAIN_COLOURS if check_split(split) == "train" else panda.HELDOUT_COLOURS
    w = panda.PandaWorld(np.random.default_rng([seed, 23]), colours)
    try:
        cube, pad = w.cubes[list(w.cubes)[0]], w.pads[list(w.pads)[0]]
        w.move(w.pos(cube) + [0, 0, 0.12], fingers=0.04, record=False)
        w.move(w.pos(cube), steps=160, fingers=0.04, record=False)
        w.close_on(cube)
        start, goal = w.ee(), w.pos(pad) + [0, 0, panda.CUBE / 2 + 0.12]
        frames, n = [w.render()[0]], max(num_frames, PANDA_CARRY_FRAMES) - 1
        for i in range(1, num_frames):
            w.move(start + (goal - start) * i / n, steps=60, pieces=1, record=False)
            frames.append(w.render()[0])
        return np.stack(frames)
    finally:
        w.close()


def video_clips(sim: str, world: dict | None, episodes: int, seed: int, num_frames: int,
                split: str = "heldout", max_tries: int = 8,
                doom_tics: int | None = None) -> tuple[list[np.ndarray], dict]:
    """`episodes` clips of `sim` from `split` (see the module docstring) and facts about them."""
    from train.sim import craft, doom, panda

    if sim not in SIMS:
        raise ValueError(f"sim: must be one of {', '.join(SIMS)}, got {sim!r}")
    train = check_split(split) == "train"
    if world:
        worlds = [world]
    else:
        worlds = doom.train_worlds() if train else [doom.resolve_world(s) for s in doom.TRAIN_SCENARIOS]
    module = {"vizdoom": doom, "crafter": craft, "pybullet": panda}[sim]
    offset = 0 if train else module.HELDOUT_SEED_OFFSET
    clips, redrawn = [], 0
    for i in range(episodes):
        rng = np.random.default_rng([seed + offset, i])
        for _ in range(max_tries):
            s = int(rng.integers(2 ** 31 - 1))
            if sim == "vizdoom":
                s = s % doom.HELDOUT_SEED_OFFSET if train else s
                clip = doom_clip(worlds[i % len(worlds)], s, int(rng.integers(0, 40)), num_frames,
                                 min(num_frames, 8) if train else None, doom_tics)
            elif sim == "crafter":
                clip = crafter_clip(offset + s % craft.HELDOUT_SEED_OFFSET, int(rng.integers(0, 20)), num_frames)
            else:
                clip = panda_clip(s % panda.HELDOUT_SEED_OFFSET if train else s, num_frames, split)
            if clip is not None:
                break
            redrawn += 1
        else:
            raise ValueError(f"{sim}: {max_tries} clips in a row were cut by a death or restart"
                             + (f" in {worlds[i % len(worlds)]['name']}" if sim == "vizdoom" else ""))
        clips.append(clip)
    facts = {"redrawn_clips": redrawn}
    if sim == "vizdoom":
        facts["worlds"] = sorted({w["name"] for w in worlds[:episodes]})
        facts["doom_tics"] = doom_tics or doom.TICS
    return clips, facts


def write_clips(out: str, sim: str, split: str, num: int, num_frames: int, seed: int,
                doom_tics: int | None = None) -> dict:
    """Write `num` clips as out/{sim}/{i:05d}/{k:03d}.png; returns the summary the CLI prints."""
    from PIL import Image

    clips, facts = video_clips(sim, None, num, seed, num_frames, split, doom_tics=doom_tics)
    for i, clip in enumerate(clips):
        d = os.path.join(out, sim, f"{i:05d}")
        os.makedirs(d, exist_ok=True)
        for k, frame in enumerate(clip):
            Image.fromarray(frame).save(os.path.join(d, f"{k:03d}.png"))
    return {"sim": sim, "split": split, "clips": len(clips), "frames": sum(len(c) for c in clips), **facts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sim", required=True, help=f"one of {', '.join(SIMS)}")
    p.add_argument("--split", default="train")
    p.add_argument("--num", type=int, default=100, help="clips")
    p.add_argument("--num-frames", type=int, default=24, help="frames per clip (>= 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doom-tics", type=int, help="vizdoom: tics a frame (default: one world step; 1: every tic)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        if a.num <= 0:
            raise ValueError(f"num: must be a positive integer, got {a.num}")
        if a.num_frames < 2:
            raise ValueError(f"num-frames: must be at least 2, got {a.num_frames}")
        print(json.dumps(write_clips(a.out, a.sim, a.split, a.num, a.num_frames, a.seed, a.doom_tics)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
