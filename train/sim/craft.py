"""Crafter worlds for visual guidance (how to make X: ordered steps with keyframes) and visual narrative
(an episode's events as story beats with keyframes); issue 5.

A scripted agent reads Crafter's own world state (materials around the player, the inventory) to walk
to a material by breadth-first search, face it and act. Each how-to step is one canonical sentence
(`STEP_FORMS`), and its keyframe is the observation when the step is complete (checked from the
inventory / achievements, not from images). `valid_steps` checks a step list against Crafter's tech
tree (crafter.constants: what each collect, place and make requires), which is what
`train.evaluate --task guide` scores.

Splits by seed: training worlds use seeds below HELDOUT_SEED_OFFSET, held-out worlds at or above it.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

import numpy as np

SIZE = 128  # px, square observations
HELDOUT_SEED_OFFSET = 100_000
MOVES = {"move_left": (-1, 0), "move_right": (1, 0), "move_up": (0, -1), "move_down": (0, 1)}
WALKABLE = ("grass", "sand", "path")

# how-to targets -> their plans as (kind, argument, count) steps
PLANS = {
    "wood pickaxe": [("collect", "wood", 3), ("place", "table", 1), ("make", "wood pickaxe", 1)],
    "wood sword": [("collect", "wood", 3), ("place", "table", 1), ("make", "wood sword", 1)],
    "stone pickaxe": [("collect", "wood", 4), ("place", "table", 1), ("make", "wood pickaxe", 1),
                      ("collect", "stone", 1), ("make", "stone pickaxe", 1)],
    "table": [("collect", "wood", 2), ("place", "table", 1)],
}
QUESTIONS = {"wood pickaxe": "How to make a wood pickaxe", "wood sword": "How to make a wood sword",
             "stone pickaxe": "How to make a stone pickaxe", "table": "How to build a crafting table"}


def step_text(kind: str, arg: str, count: int, number: int) -> str:
    """The canonical sentence of one how-to step (see STEP_FORMS)."""
    if kind == "collect":
        return f"Step {number}: Collect {count} {arg}."
    if kind == "place":
        return f"Step {number}: Place a {arg}."
    return f"Step {number}: Make a {arg}."


STEP_FORMS = re.compile(r"^\s*Step (\d+): (Collect (\d+) (wood|stone)|Place a (table)|Make a (wood pickaxe|wood sword|"
                        r"stone pickaxe|stone sword))\.\s*$")


def valid_steps(steps: list[str], target: str | None = None) -> bool:
    """True when every step is a canonical sentence, numbered 1, 2, ..., and affordable in order under
    Crafter's tech tree (crafter.constants), and (given `target`) the last step makes `target`."""
    import crafter.constants as C

    if not steps:
        return False
    inv = {"wood": 0, "stone": 0, "wood_pickaxe": 0, "stone_pickaxe": 0, "wood_sword": 0, "stone_sword": 0}
    table = False
    last = None
    for i, s in enumerate(steps):
        m = STEP_FORMS.match(s)
        if not m or int(m.group(1)) != i + 1:
            return False
        if m.group(3):
            n, item = int(m.group(3)), m.group(4)
            need = C.collect["tree" if item == "wood" else item]["require"]
            if n <= 0 or any(inv.get(k, 0) < v for k, v in need.items()):
                return False
            inv[item] += n
            last = None
        elif m.group(5):
            uses = C.place["table"]["uses"]
            if any(inv.get(k, 0) < v for k, v in uses.items()):
                return False
            for k, v in uses.items():
                inv[k] -= v
            table, last = True, "table"
        else:
            name = m.group(6).replace(" ", "_")
            info = C.make[name]
            if not table or any(inv.get(k, 0) < v for k, v in info["uses"].items()):
                return False
            for k, v in info["uses"].items():
                inv[k] -= v
            inv[name] += 1
            last = m.group(6)
    return target is None or last == target


@dataclass
class Walk:
    steps: list[str]
    frames: list[np.ndarray]  # first observation, then one keyframe per step (SIZE, SIZE, 3) uint8
    done: list[bool]
    extra_frames: list[np.ndarray] = field(default_factory=list)


class Agent:
    """Scripted Crafter player over one seeded world."""

    def __init__(self, seed: int, length: int = 3000):
        import crafter

        self.env = crafter.Env(area=(64, 64), view=(9, 9), size=(SIZE, SIZE), seed=int(seed), length=length)
        self.obs = self.env.reset()
        self.info = {"inventory": dict(self.env._player.inventory), "achievements": dict(self.env._player.achievements)}
        self.names = self.env.action_names
        self.frames_seen: list[np.ndarray] = []
        self.dead = False

    @property
    def player(self):
        return self.env._player

    def act(self, name: str) -> None:
        self.obs, _, done, self.info = self.env.step(self.names.index(name))
        self.frames_seen.append(self.obs)
        self.dead = self.dead or done

    def mat(self, pos) -> str | None:
        w = self.env._world
        if not (0 <= pos[0] < w.area[0] and 0 <= pos[1] < w.area[1]):
            return None
        return w[pos][0]

    def free(self, pos) -> bool:
        w = self.env._world
        return self.mat(pos) in WALKABLE and w[pos][1] is None

    def path_to(self, material: str, limit: int = 40):
        """BFS over free tiles to a tile adjacent to `material`: (first move name, direction to face) or None."""
        start = tuple(self.player.pos)
        seen = {start: None}
        q = deque([start])
        while q:
            cur = q.popleft()
            for d in MOVES.values():
                if self.mat((cur[0] + d[0], cur[1] + d[1])) == material:
                    first = cur
                    while seen[first] is not None and seen[first] != start:
                        first = seen[first]
                    if cur == start:
                        return None, d
                    return (first[0] - start[0], first[1] - start[1]), None
            if abs(cur[0] - start[0]) + abs(cur[1] - start[1]) >= limit:
                continue
            for d in MOVES.values():
                nxt = (cur[0] + d[0], cur[1] + d[1])
                if nxt not in seen and self.free(nxt):
                    seen[nxt] = cur
                    q.append(nxt)
        return False

    def _move_name(self, d) -> str:
        return next(k for k, v in MOVES.items() if v == tuple(d))

    def wander(self, rng) -> None:
        self.act(list(MOVES)[int(rng.integers(4))])

    def interact(self, material: str, action: str, rng, budget: int = 200) -> bool:
        """Walk next to `material`, face it and do `action` once. False when the budget runs out."""
        for _ in range(budget):
            if self.dead:
                return False
            r = self.path_to(material)
            if r is False:
                self.wander(rng)
                continue
            move, face = r
            if move is not None:
                self.act(self._move_name(move))
                continue
            if tuple(self.player.facing) != tuple(face):
                self.act(self._move_name(face))  # turns only: that tile is not walkable
                continue
            self.act(action)
            return True
        return False

    def place_table(self, rng, budget: int = 60) -> bool:
        before = self.player.achievements["place_table"]
        for _ in range(budget):
            self.act("place_table")
            if self.player.achievements["place_table"] > before:
                return True
            self.wander(rng)
        return False


def howto(target: str, seed: int) -> Walk:
    """A scripted walk through PLANS[target] in the world of `seed`."""
    if target not in PLANS:
        raise ValueError(f"target: must be one of {sorted(PLANS)}, got {target!r}")
    rng = np.random.default_rng([seed, 11])
    ag = Agent(seed)
    steps, frames, done = [], [ag.obs.copy()], []
    for i, (kind, arg, count) in enumerate(PLANS[target]):
        ok = True
        if kind == "collect":
            item = arg
            goal = ag.player.inventory[item] + count
            for _ in range(count * 8):
                if ag.player.inventory[item] >= goal:
                    break
                ok = ag.interact("tree" if item == "wood" else item, "do", rng)
                if not ok:
                    break
            ok = ag.player.inventory[item] >= goal
        elif kind == "place":
            ok = ag.place_table(rng)
        else:
            name = arg.replace(" ", "_")
            before = ag.player.inventory[name]
            if not ag.interact("table", f"make_{name}", rng):
                ok = False
            ok = ok and ag.player.inventory[name] > before
        steps.append(step_text(kind, arg, count, i + 1))
        frames.append(ag.obs.copy())
        done.append(bool(ok))
        if not ok:
            break
    extra = ag.frames_seen[:: max(1, len(ag.frames_seen) // 8)]
    return Walk(steps, frames, done, extra)


EVENT_TEXT = {
    "collect_wood": "The player chops a tree and collects wood.",
    "place_table": "The player builds a crafting table.",
    "make_wood_pickaxe": "The player crafts a wood pickaxe.",
    "make_wood_sword": "The player crafts a wood sword.",
    "collect_stone": "The player mines stone.",
    "make_stone_pickaxe": "The player crafts a stone pickaxe.",
    "collect_drink": "The player drinks from the water.",
    "collect_sapling": "The player picks up a sapling.",
    "place_plant": "The player plants a sapling.",
    "eat_cow": "The player hunts a cow and eats.",
    "defeat_zombie": "The player fights off a zombie.",
    "wake_up": "The player wakes up after a rest.",
    "place_stone": "The player places a stone block.",
    "collect_coal": "The player mines coal.",
}


def story(seed: int, max_beats: int = 5) -> Walk:
    """An episode of the scripted agent pursuing a seeded list of goals; every newly unlocked
    achievement is a beat (EVENT_TEXT) with the observation at that moment as its keyframe."""
    rng = np.random.default_rng([seed, 13])
    ag = Agent(seed)
    frames, beats, done = [ag.obs.copy()], [], []
    goals = [("tree", "do")] * int(rng.integers(1, 3)) + [("water", "do")]
    if rng.random() < 0.5:
        goals += [("tree", "do"), ("tree", "do"), ("table", "place")]
    goals += [("grass", "do")] * 4
    rng.shuffle(goals[:2])
    seen = {k for k, v in ag.player.achievements.items() if v > 0}
    for material, action in goals:
        if len(beats) >= max_beats or ag.dead:
            break
        if action == "place":
            if ag.player.inventory["wood"] >= 2:
                ag.place_table(rng)
        else:
            ag.interact(material, action, rng)
        new = [k for k, v in ag.player.achievements.items() if v > 0 and k not in seen]
        for k in new:
            seen.add(k)
            if k in EVENT_TEXT and len(beats) < max_beats:
                beats.append(EVENT_TEXT[k])
                frames.append(ag.obs.copy())
                done.append(True)
    return Walk(beats, frames, done, ag.frames_seen[:: max(1, len(ag.frames_seen) // 6)])


def completes(walk: Walk, target: str) -> bool:
    """True when the scripted walk carried out every step of PLANS[target]."""
    return all(walk.done) and len(walk.done) == len(PLANS[target])


def first_complete_howto(target: str, seed: int, tries: int = 20) -> Walk:
    """The walk of the first of seeds seed, seed + 1, ... that completes PLANS[target]."""
    for k in range(tries):
        walk = howto(target, seed + k)
        if completes(walk, target):
            return walk
    raise RuntimeError(f"howto: no scripted walk to {target!r} completed in seeds {seed}..{seed + tries - 1}")


def answer(steps: list[str], images: list[dict]) -> list[dict]:
    """An interleaved answer: each step's sentence, then its keyframe (an IMAGE dict: path or codes)."""
    from train.data import format as fmt

    return [seg for s, im in zip(steps, images) for seg in (fmt.text(s), {"image": im})]


def howto_records(target: str, walk: Walk, rel: list[str]) -> list[dict]:
    from train.data import format as fmt

    out = [fmt.record("howto", answer(walk.steps, [{"path": r} for r in rel[1:]]), QUESTIONS[target])]
    for i, s in enumerate(walk.steps):  # x2i: the world before the step + the step -> after it
        out.append(fmt.record("x2i", [{"image": {"path": rel[i + 1]}}], s.split(": ", 1)[1], [{"path": rel[i]}]))
    out.append(fmt.record("t2i", [{"image": {"path": rel[0]}}], "A top-down view of a Crafter world."))
    return out


STORY_PROMPT = "Tell the story of the player's day in this Crafter world."


def story_records(walk: Walk, rel: list[str]) -> list[dict]:
    from train.data import format as fmt

    beats = answer(walk.steps, [{"path": r} for r in rel[1:]])
    return [fmt.record("story", beats, STORY_PROMPT, [{"path": rel[0]}])] if beats else []
