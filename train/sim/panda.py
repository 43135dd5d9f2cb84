"""PyBullet + Franka Panda scripted manipulation for embodied-manipulation data (SPEC §2 vla form; issue 5).

Tasks, each an ordered plan of subtasks with a keyframe at the end of each:
    pick  : "pick up the {A}"                  -> reach above A, grasp A, lift A
    place : "put the {A} on the {P} pad"       -> reach, grasp, lift, carry above P, put A down on P
    stack : "stack the {A} on the {B}"         -> reach, grasp, lift, carry above B, put A down on B
    push  : "push the {A} to the {dir}"        -> move behind A, lower to the table, push A
Motions are real physics: IK targets followed by position-controlled joints (`p.stepSimulation`);
a grasp closes the fingers and adds a fixed constraint (a common simplification of friction grasps).
Every subtask's completion is checked from simulator state (positions, the constraint), never from
images; `Episode.done[i]` holds the check of subtask i.

Camera and sizes (the issue's measurement: 5 cm cubes from 1.3 m at 128 px cover ~6x6 px and an f8
tokenizer erases them): 7 cm cubes and 9 cm pads, seen from about 0.8 m with a 40 degree field of view.
At 96x96 px (the world model's image size, 12x12 tokens at f8) a cube covers about 9x9 px, at least one
token; tests/test_sim_panda.py measures it from the segmentation mask.

Splits by object set and by seed: train colours `TRAIN_COLOURS`, held out `HELDOUT_COLOURS`; held-out
episodes use seeds offset by HELDOUT_SEED_OFFSET. The `wide` palette (`PALETTES`) adds 12 more training
colours, none named or coloured like a held-out one. The aim: with 16 names, copying the name from the
instruction into the plan (what a held-out name needs) should pay more than learning 4 by heart. A
150-step fine-tune of the demo on it did not learn to copy (assets/README.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np

TRAIN_COLOURS = {"red": (0.85, 0.1, 0.1), "green": (0.1, 0.7, 0.15), "blue": (0.1, 0.25, 0.9),
                 "yellow": (0.95, 0.85, 0.1)}
HELDOUT_COLOURS = {"orange": (1.0, 0.5, 0.05), "purple": (0.55, 0.15, 0.75), "cyan": (0.1, 0.85, 0.9),
                   "white": (0.95, 0.95, 0.95)}
WIDE_COLOURS = {**TRAIN_COLOURS, "pink": (1.0, 0.55, 0.7), "brown": (0.45, 0.25, 0.1), "grey": (0.5, 0.5, 0.5),
                "black": (0.08, 0.08, 0.08), "lime": (0.6, 0.95, 0.1), "navy": (0.05, 0.1, 0.45),
                "olive": (0.45, 0.45, 0.1), "maroon": (0.45, 0.05, 0.1), "crimson": (0.7, 0.0, 0.25),
                "khaki": (0.75, 0.7, 0.45), "emerald": (0.1, 0.6, 0.35), "charcoal": (0.2, 0.2, 0.22)}
PALETTES = {"train": TRAIN_COLOURS, "wide": WIDE_COLOURS}  # training colour sets; held-out data use HELDOUT_COLOURS
TASKS = ("pick", "place", "stack", "push")
HELDOUT_SEED_OFFSET = 100_000
CUBE = 0.07  # m, side
PAD = 0.09  # m, side of a flat target pad
SIZE = 128  # px, rendered frames (square)
EE_LINK = 11  # panda_grasptarget in pybullet_data's franka_panda/panda.urdf
ARM_JOINTS = tuple(range(7))
FINGERS = (9, 10)
HOME = (0.0, -0.6, 0.0, -2.4, 0.0, 1.9, 0.785)
DOWN = (math.pi, 0.0, 0.0)
ARM = "Franka Panda"


@dataclass
class Episode:
    goal: str
    task: str
    subtasks: list[str]
    frames: list[np.ndarray]  # initial scene, then one keyframe per subtask, (SIZE, SIZE, 3) uint8
    masks: list[np.ndarray]  # object + arm pixels of each frame, (SIZE, SIZE) bool
    done: list[bool]  # state check of each subtask
    extra_frames: list[np.ndarray] = field(default_factory=list)  # mid-motion frames (tokenizer data)
    scene: str = ""


@contextlib.contextmanager
def _quiet_stdout():
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class PandaWorld:
    def __init__(self, rng: np.random.Generator, colours: dict, num_cubes: int = 2, num_pads: int = 1):
        import pybullet as p
        import pybullet_data
        from pybullet_utils import bullet_client

        self.p = p
        with _quiet_stdout():  # the C library prints "argv[0]=" on connect, into our JSON summaries
            self.c = bullet_client.BulletClient(connection_mode=p.DIRECT)
        c = self.c
        c.setAdditionalSearchPath(pybullet_data.getDataPath())
        c.setGravity(0, 0, -9.81)
        c.setPhysicsEngineParameter(deterministicOverlappingPairs=1)
        self.plane = c.loadURDF("plane.urdf")
        self.arm = c.loadURDF("franka_panda/panda.urdf", [0, 0, 0], useFixedBase=True)
        for j, q in zip(ARM_JOINTS, HOME):
            c.resetJointState(self.arm, j, q)
        for j in FINGERS:
            c.resetJointState(self.arm, j, 0.04)
        names = list(colours)
        picked = rng.choice(len(names), size=num_cubes + num_pads, replace=False)
        spots = self._spots(rng, num_cubes + num_pads)
        self.cubes, self.pads = {}, {}
        for i, k in enumerate(picked[:num_cubes]):
            name = f"{names[k]} cube"
            self.cubes[name] = self._box(CUBE / 2, colours[names[k]], spots[i], mass=0.1,
                                         yaw=float(rng.uniform(-0.5, 0.5)))
        for i, k in enumerate(picked[num_cubes:]):
            name = f"{names[k]} pad"
            self.pads[name] = self._box(0.002, colours[names[k]], spots[num_cubes + i], mass=0.0, half_xy=PAD / 2,
                                        collide=False)
        self.grasp = None
        self.extra: list[np.ndarray] = []
        for _ in range(60):
            c.stepSimulation()

    @staticmethod
    def _spots(rng, n):
        out = []
        while len(out) < n:
            xy = (float(rng.uniform(0.38, 0.62)), float(rng.uniform(-0.2, 0.2)))
            if all(math.dist(xy, o) > 0.13 for o in out):
                out.append(xy)
        return out

    def _box(self, half, rgb, xy, mass, yaw=0.0, half_xy=None, collide=True):
        c = self.c
        ext = [half_xy or half, half_xy or half, half]
        col = c.createCollisionShape(self.p.GEOM_BOX, halfExtents=ext) if collide else -1
        vis = c.createVisualShape(self.p.GEOM_BOX, halfExtents=ext, rgbaColor=[*rgb, 1.0])
        body = c.createMultiBody(baseMass=mass, baseCollisionShapeIndex=col, baseVisualShapeIndex=vis,
                                 basePosition=[xy[0], xy[1], half + 0.001],
                                 baseOrientation=self.p.getQuaternionFromEuler([0, 0, yaw]))
        if collide:
            c.changeDynamics(body, -1, lateralFriction=0.8)
        return body

    # ---- state -------------------------------------------------------------------------------
    def pos(self, body) -> np.ndarray:
        return np.array(self.c.getBasePositionAndOrientation(body)[0])

    def ee(self) -> np.ndarray:
        return np.array(self.c.getLinkState(self.arm, EE_LINK, computeForwardKinematics=True)[4])

    # ---- camera ------------------------------------------------------------------------------
    def render(self, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
        c = self.c
        view = c.computeViewMatrix([1.05, 0.0, 0.62], [0.48, 0.0, 0.05], [0, 0, 1])
        proj = c.computeProjectionMatrixFOV(40, 1.0, 0.05, 5.0)
        _, _, rgba, _, seg = c.getCameraImage(size, size, view, proj, renderer=self.p.ER_TINY_RENDERER)
        rgb = np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)[..., :3].copy()
        seg = np.asarray(seg).reshape(size, size)
        mask = np.isin(seg, [self.arm, *self.cubes.values()])
        return rgb, mask

    # ---- motion ------------------------------------------------------------------------------
    def _drive(self, target, steps: int, fingers: float | None = None):
        c = self.c
        q = c.calculateInverseKinematics(self.arm, EE_LINK, list(target), c.getQuaternionFromEuler(DOWN),
                                         maxNumIterations=100, residualThreshold=1e-4)
        c.setJointMotorControlArray(self.arm, list(ARM_JOINTS), self.p.POSITION_CONTROL,
                                    targetPositions=list(q[:7]), forces=[200.0] * 7)
        if fingers is not None:
            c.setJointMotorControlArray(self.arm, list(FINGERS), self.p.POSITION_CONTROL,
                                        targetPositions=[fingers, fingers], forces=[40.0, 40.0])
        for _ in range(steps):
            c.stepSimulation()

    def move(self, target, steps: int = 240, pieces: int = 4, fingers: float | None = None, record: bool = True):
        start, target = self.ee(), np.asarray(target, dtype=float)
        for i in range(1, pieces + 1):
            self._drive(start + (target - start) * i / pieces, steps // pieces, fingers)
        for _ in range(3):  # settle: re-solve IK at the goal
            self._drive(target, 40, fingers)
        if record:
            self.extra.append(self.render()[0])

    def close_on(self, body):
        self._drive(self.ee(), 60, fingers=CUBE / 2 - 0.004)
        c = self.c
        ee_pos, ee_orn = c.getLinkState(self.arm, EE_LINK)[4:6]
        ob_pos, ob_orn = c.getBasePositionAndOrientation(body)
        inv_pos, inv_orn = c.invertTransform(ee_pos, ee_orn)
        rel_pos, rel_orn = c.multiplyTransforms(inv_pos, inv_orn, ob_pos, ob_orn)
        self.grasp = (body, c.createConstraint(self.arm, EE_LINK, body, -1, self.p.JOINT_FIXED, [0, 0, 0],
                                               rel_pos, [0, 0, 0], rel_orn))
        c.changeConstraint(self.grasp[1], maxForce=500)
        self._drive(self.ee(), 30, fingers=CUBE / 2 - 0.004)

    def release(self):
        if self.grasp:
            self.c.removeConstraint(self.grasp[1])
            self.grasp = None
        self._drive(self.ee(), 120, fingers=0.04)

    def close(self):
        self.c.disconnect()


# ------------------------------------------------------------------------------------ plans

def _pick_steps(w: PandaWorld, a: str):
    cube = w.cubes[a]
    hover = lambda b, dz: w.pos(b) + [0, 0, dz]  # noqa: E731

    def reach():
        w.move(hover(cube, 0.12), fingers=0.04)
        d = w.ee() - w.pos(cube)
        return bool(np.hypot(d[0], d[1]) < 0.02 and 0.08 < d[2] < 0.16)

    def grasp():
        w.move(hover(cube, 0.0), steps=160, fingers=0.04)
        w.close_on(cube)
        return bool(w.grasp is not None and np.linalg.norm(w.ee() - w.pos(cube)) < 0.03)

    def lift():
        w.move(w.ee() + [0, 0, 0.15], steps=160)
        return bool(w.grasp is not None and w.pos(cube)[2] > CUBE / 2 + 0.1)

    return [(f"move the gripper above the {a}", reach), (f"grasp the {a}", grasp), (f"lift the {a}", lift)]


def _put_steps(w: PandaWorld, a: str, target: str):
    cube = w.cubes[a]
    body = w.cubes.get(target, w.pads.get(target))
    on_cube = target in w.cubes
    top = CUBE if on_cube else 0.004

    def carry():
        goal = w.pos(body)
        w.move([goal[0], goal[1], top + CUBE / 2 + 0.12])
        d = w.pos(cube) - goal
        return bool(np.hypot(d[0], d[1]) < 0.02)

    def put():
        goal = w.pos(body)
        w.move([goal[0], goal[1], top + CUBE / 2 + 0.006], steps=200)
        w.release()
        w.move(w.ee() + [0, 0, 0.12], steps=120, fingers=0.04, record=False)
        for _ in range(120):
            w.c.stepSimulation()
        d = w.pos(cube) - w.pos(body)
        z_ok = abs(w.pos(cube)[2] - (w.pos(body)[2] + (CUBE if on_cube else CUBE / 2))) < 0.015
        return bool(np.hypot(d[0], d[1]) < (CUBE / 2 if on_cube else PAD / 2) and z_ok and w.grasp is None)

    return [(f"move the {a} above the {target}", carry), (f"put the {a} down on the {target}", put)]


PUSH_DIRS = {"left": (0.0, 1.0), "right": (0.0, -1.0), "back": (1.0, 0.0)}  # as seen by the camera (x is away)


def _push_steps(w: PandaWorld, a: str, direction: str):
    cube = w.cubes[a]
    u = np.array([*PUSH_DIRS[direction], 0.0])
    start = {}

    def behind():
        start["p"] = w.pos(cube)
        w.move(start["p"] - u * (CUBE / 2 + 0.05) + [0, 0, 0.12], fingers=0.0)
        d = w.ee() - (start["p"] - u * (CUBE / 2 + 0.05))
        return bool(np.hypot(d[0], d[1]) < 0.02)

    def lower():
        w.move(start["p"] - u * (CUBE / 2 + 0.05) + [0, 0, 0.02], steps=160, fingers=0.0)
        return bool(w.ee()[2] < 0.09)

    def push():
        w.move(start["p"] + u * 0.08 - u * (CUBE / 2 + 0.01) + [0, 0, 0.02], steps=320, pieces=8, fingers=0.0)
        w.move(w.ee() + [0, 0, 0.12], steps=120, fingers=0.0, record=False)
        moved = float(np.dot(w.pos(cube) - start["p"], u))
        return bool(moved > 0.05)

    return [(f"move the gripper behind the {a}", behind), ("lower the gripper to the table", lower),
            (f"push the {a} to the {direction}", push)]


def episode(task: str, seed: int, split: str = "train", palette: str = "train") -> Episode:
    """One scripted episode of `task` with objects, colours and positions drawn from `seed`; training
    episodes draw their colours from PALETTES[palette], held-out ones from HELDOUT_COLOURS."""
    from train.sim.common import check_split

    if task not in TASKS:
        raise ValueError(f"task: must be one of {list(TASKS)}, got {task!r}")
    if palette not in PALETTES:
        raise ValueError(f"palette: must be one of {list(PALETTES)}, got {palette!r}")
    colours = PALETTES[palette] if check_split(split) == "train" else HELDOUT_COLOURS
    rng = np.random.default_rng([seed, TASKS.index(task)])
    w = PandaWorld(rng, colours)
    try:
        a, b = list(w.cubes)
        pad = list(w.pads)[0]
        if task == "pick":
            goal, steps = f"pick up the {a}", _pick_steps(w, a)
        elif task == "place":
            goal, steps = f"put the {a} on the {pad}", _pick_steps(w, a) + _put_steps(w, a, pad)
        elif task == "stack":
            goal, steps = f"stack the {a} on the {b}", _pick_steps(w, a) + _put_steps(w, a, b)
        else:
            direction = list(PUSH_DIRS)[int(rng.integers(len(PUSH_DIRS)))]
            goal, steps = f"push the {a} to the {direction}", _push_steps(w, a, direction)
        scene = f"A {ARM} arm on the floor beside a {a}, a {b} and a {pad}."
        frame, mask = w.render()
        frames, masks, done = [frame], [mask], []
        for _, fn in steps:
            done.append(fn())
            frame, mask = w.render()
            frames.append(frame)
            masks.append(mask)
        return Episode(goal, task, [s for s, _ in steps], frames, masks, done, list(w.extra), scene)
    finally:
        w.close()


def records(ep: Episode, rel: list[str]) -> list[dict]:
    """vla records from every starting step (scene image = the frame before it), plus t2i of the
    scene and an x2i edit (initial frame + goal -> final frame). `rel`: frame paths, same order as ep.frames."""
    from train.data import format as fmt

    out = []
    n = len(ep.subtasks)
    for k in range(n):
        q = f"Robot Arm Type: {ARM}. Instruction: {ep.goal}. Finish the task with {n - k} steps."
        answer = [seg for i in range(k, n) for seg in (fmt.text(f"Current Step: {ep.subtasks[i]}"),
                                                         {"image": {"path": rel[i + 1]}})]
        out.append(fmt.record("vla", answer, q, [{"path": rel[k]}]))
    out.append(fmt.record("t2i", [{"image": {"path": rel[0]}}], ep.scene))
    out.append(fmt.record("x2i", [{"image": {"path": rel[-1]}}], ep.goal, [{"path": rel[0]}]))
    return out
