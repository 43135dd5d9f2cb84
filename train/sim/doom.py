"""ViZDoom worlds for world exploration (DESIGN "embedded default"; issue 5).

Actions are the six movement buttons, each held for `TICS` tics. Each has a user instruction (what a
person types) and the canonical narration the model writes (NOTES: "map keys onto canonical sentences"):

    move forward  -> "The camera pushes forward."     move backward -> "The camera pulls back."
    turn left     -> "The camera pans left."          turn right    -> "The camera pans right."
    strafe left   -> "The camera slides left."        strafe right  -> "The camera slides right."

Splits (by map/scenario and by seed):
- train: every single-player scenario bundled with ViZDoom (`TRAIN_SCENARIOS`) and freedoom2.wad
  MAP01-MAP10, episode seeds `seed` as given;
- held out: the same training scenarios with new seeds (evaluation uses seed + HELDOUT_SEED_OFFSET),
  freedoom2.wad MAP11-MAP32 and all of freedoom1.wad (never generated for training).

A world is a bundled scenario name (`my_way_home`), a .cfg path, or (wad file, map name). A wad is
checked for the map by reading its lump directory before the engine starts, so a missing map is a
clear ValueError instead of an engine error.
"""

from __future__ import annotations

import os
import struct

import numpy as np

ACTIONS = ("move forward", "move backward", "turn left", "turn right", "strafe left", "strafe right")
NARRATION = {
    "move forward": "The camera pushes forward.", "move backward": "The camera pulls back.",
    "turn left": "The camera pans left.", "turn right": "The camera pans right.",
    "strafe left": "The camera slides left.", "strafe right": "The camera slides right.",
}
EDIT = {  # x2i edit phrasing of each action
    "move forward": "move the camera forward", "move backward": "move the camera back",
    "turn left": "turn the camera left", "turn right": "turn the camera right",
    "strafe left": "slide the camera left", "strafe right": "slide the camera right",
}
TICS = 4
WIDTH, HEIGHT = 160, 120
# single-player scenarios shipped with vizdoom 1.3.2 (multiplayer, audio and whole-game configs excluded)
TRAIN_SCENARIOS = ("basic", "simpler_basic", "rocket_basic", "my_way_home", "deadly_corridor",
                   "defend_the_center", "defend_the_line", "health_gathering", "health_gathering_supreme",
                   "predict_position", "take_cover", "deathmatch")
TRAIN_MAPS = tuple(f"MAP{i:02d}" for i in range(1, 11))
HELDOUT_MAPS = tuple(f"MAP{i:02d}" for i in range(11, 33))
HELDOUT_SEED_OFFSET = 100_000


def _vzd():
    import vizdoom

    return vizdoom


def wad_path(name: str) -> str:
    """'freedoom1.wad' / 'freedoom2.wad' (bundled) or a path."""
    if os.path.isfile(name):
        return os.path.abspath(name)
    bundled = os.path.join(os.path.dirname(_vzd().__file__), name)
    if os.path.isfile(bundled):
        return bundled
    raise ValueError(f"wad: {name} not found (give a path, or freedoom1.wad / freedoom2.wad)")


def wad_maps(path: str) -> list[str]:
    """Map names (MAPxx / ExMy markers) in a WAD's lump directory."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) != 12 or head[:4] not in (b"IWAD", b"PWAD"):
            raise ValueError(f"wad: {path} is not a WAD file (no IWAD/PWAD header)")
        num, offset = struct.unpack("<ii", head[4:])
        f.seek(offset)
        table = f.read(16 * num)
    names = [table[i * 16 + 8:i * 16 + 16].rstrip(b"\0").decode("ascii", "replace").upper() for i in range(num)]
    return [n for n in names if (len(n) == 5 and n.startswith("MAP") and n[3:].isdigit())
            or (len(n) == 4 and n[0] == "E" and n[2] == "M" and n[1].isdigit() and n[3].isdigit())]


def resolve_world(scenario: str | None = None, wad: str | None = None, map_name: str | None = None) -> dict:
    """-> {"kind": "scenario", "cfg": path, "name": str} or {"kind": "wad", "wad": path, "map": str, "name": str}."""
    vzd = _vzd()
    if scenario and (wad or map_name):
        raise ValueError("scenario: give either --scenario or --wad with --map, not both")
    if scenario:
        if scenario.endswith(".cfg") or os.sep in scenario:
            if not os.path.isfile(scenario):
                raise ValueError(f"scenario: {scenario} is not a file; give a bundled scenario name "
                                 f"({', '.join(TRAIN_SCENARIOS)}) or a .cfg path")
            return {"kind": "scenario", "cfg": os.path.abspath(scenario),
                    "name": os.path.splitext(os.path.basename(scenario))[0]}
        cfg = os.path.join(vzd.scenarios_path, f"{scenario}.cfg")
        if scenario not in TRAIN_SCENARIOS or not os.path.isfile(cfg):
            raise ValueError(f"scenario: unknown {scenario!r}; bundled: {', '.join(TRAIN_SCENARIOS)} "
                             "(or the path of a .cfg file)")
        return {"kind": "scenario", "cfg": cfg, "name": scenario}
    if wad or map_name:
        if not (wad and map_name):
            raise ValueError("wad/map: --wad and --map go together")
        path = wad_path(wad)
        maps = wad_maps(path)
        if map_name.upper() not in maps:
            raise ValueError(f"map: {path} has no map {map_name!r}; it has {', '.join(maps) or 'none'}")
        return {"kind": "wad", "wad": path, "map": map_name.upper(),
                "name": f"{os.path.basename(path)}:{map_name.upper()}"}
    raise ValueError("world: give --scenario NAME_OR_CFG or --wad FILE --map MAP")


def train_worlds() -> list[dict]:
    return [resolve_world(s) for s in TRAIN_SCENARIOS] + \
        [resolve_world(wad="freedoom2.wad", map_name=m) for m in TRAIN_MAPS]


class DoomWorld:
    """One headless ViZDoom game on a world; frames are uint8 (HEIGHT, WIDTH, 3)."""

    def __init__(self, world: dict, seed: int):
        vzd = _vzd()
        g = vzd.DoomGame()
        if world["kind"] == "scenario":
            g.load_config(world["cfg"])
            if not g.get_doom_scenario_path() and not g.get_doom_game_path():
                raise ValueError(f"scenario: {world['cfg']} names no wad")
        else:
            maps_iwad = open(world["wad"], "rb").read(4) == b"IWAD"
            if maps_iwad:
                g.set_doom_game_path(world["wad"])
            else:
                g.set_doom_game_path(wad_path("freedoom2.wad"))
                g.set_doom_scenario_path(world["wad"])
            g.set_doom_map(world["map"])
            g.set_doom_skill(1)
            g.set_episode_start_time(1)
        g.set_screen_resolution(vzd.ScreenResolution.RES_160X120)
        g.set_screen_format(vzd.ScreenFormat.RGB24)
        g.set_window_visible(False)
        g.set_sound_enabled(False)
        g.set_audio_buffer_enabled(False)
        g.set_automap_buffer_enabled(False)
        g.set_depth_buffer_enabled(False)
        g.set_labels_buffer_enabled(False)
        g.set_render_hud(False)
        g.set_render_messages(False)
        g.set_render_crosshair(False)
        g.set_episode_timeout(100_000)
        g.set_mode(vzd.Mode.PLAYER)
        B = vzd.Button
        g.set_available_buttons([B.MOVE_FORWARD, B.MOVE_BACKWARD, B.TURN_LEFT, B.TURN_RIGHT, B.MOVE_LEFT,
                                 B.MOVE_RIGHT])
        g.set_seed(int(seed) % (2 ** 31))
        try:
            g.init()
        except Exception as e:  # the engine's own error types; name the world
            raise ValueError(f"world: ViZDoom could not start {world['name']}: {e}") from None
        self.game, self.world = g, world
        self.game.new_episode()

    def frame(self) -> np.ndarray:
        st = self.game.get_state()
        if st is None:
            self.game.new_episode()
            st = self.game.get_state()
        return np.asarray(st.screen_buffer, dtype=np.uint8).reshape(HEIGHT, WIDTH, 3).copy()

    def step(self, action: str, tics: int = TICS) -> np.ndarray:
        """Hold `action` for `tics` tics (a world step is TICS; video clips record single tics)."""
        vec = [0.0] * len(ACTIONS)
        vec[ACTIONS.index(action)] = 1.0
        self.game.make_action(vec, tics)
        if self.game.is_episode_finished() or self.game.is_player_dead():
            self.game.new_episode()  # died or timed out: continue from a fresh start
        return self.frame()

    def close(self) -> None:
        self.game.close()


def policy(rng: np.random.Generator, n: int) -> list[str]:
    """Sticky random exploration: mostly forward, turns in short runs, some strafes and backs."""
    probs = np.array([0.40, 0.06, 0.19, 0.19, 0.08, 0.08])
    out: list[str] = []
    while len(out) < n:
        a = ACTIONS[int(rng.choice(len(ACTIONS), p=probs))]
        out += [a] * int(rng.integers(1, 4))
    return out[:n]


def rollout(world: dict, seed: int, actions: list[str]) -> list[np.ndarray]:
    """Frames [start, after action 1, ...] of `actions` from a fresh episode seeded with `seed`."""
    w = DoomWorld(world, seed)
    try:
        frames = [w.frame()]
        frames += [w.step(a) for a in actions]
        return frames
    finally:
        w.close()


def episode(world: dict, seed: int, num_steps: int, warmup: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """A seeded episode: `warmup` unrecorded random steps (to start away from the spawn point), then
    `num_steps` recorded ones. Returns (num_steps + 1 frames, num_steps actions)."""
    rng = np.random.default_rng([seed, 7])
    acts = policy(rng, warmup + num_steps)
    frames = rollout(world, seed, acts)
    return frames[warmup:], acts[warmup:]


def records(frames_rel: list[str], actions: list[str], world_name: str, rng: np.random.Generator,
            chunk: int = 4) -> list[dict]:
    """Shard records of one recorded episode (see module docstring for the sentences):
    free exploration in chunks of `chunk` steps (start image -> narration, frame, ...), the same chunks
    as multi-turn sessions (current view + first instruction, then one instruction per follow-up turn,
    each answered with narration and the next view), single interactive steps (instruction + current
    view -> narration, next view), and a few t2i/x2i."""
    from train.data import format as fmt

    img = lambda rel: {"path": rel}  # noqa: E731
    out = []
    for s in range(0, len(actions), chunk):
        acts = actions[s:s + chunk]
        answer = []
        for k, a in enumerate(acts):
            answer += [fmt.text(NARRATION[a]), {"image": img(frames_rel[s + k + 1])}]
        out.append(fmt.record("explore", answer, "Explore this place.", [img(frames_rel[s])]))
    for s in range(0, len(actions), chunk):  # the engine's step-by-step layout: one instruction per turn
        step = lambda k: [fmt.text(NARRATION[actions[k]]), {"image": img(frames_rel[k + 1])}]  # noqa: E731
        follow = [(actions[k], [], step(k)) for k in range(s + 1, min(s + chunk, len(actions)))]
        out.append(fmt.record("explore", step(s), actions[s], [img(frames_rel[s])], turns=follow))
    for k, a in enumerate(actions):
        out.append(fmt.record("explore", [fmt.text(NARRATION[a]), {"image": img(frames_rel[k + 1])}], a,
                              [img(frames_rel[k])]))
        if rng.random() < 0.25:
            out.append(fmt.record("x2i", [{"image": img(frames_rel[k + 1])}], EDIT[a], [img(frames_rel[k])]))
    scene = world_name.split(":")[-1].replace("_", " ")
    out.append(fmt.record("t2i", [{"image": img(frames_rel[0])}],
                          f"A first-person view inside a Doom level ({scene})."))
    return out
