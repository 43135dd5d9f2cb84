"""PyBullet + Franka Panda: scripted subtasks really complete (checked from simulator state), objects are
big enough for the f8 tokenizer, and the same seed gives the same episode."""

import numpy as np
import pytest

pytest.importorskip("pybullet")

from train.sim import panda  # noqa: E402


@pytest.mark.parametrize("task", panda.TASKS)
def test_scripted_plan_completes_in_state(task):
    ep = panda.episode(task, seed=11)
    assert len(ep.done) == len(ep.subtasks) == len(ep.frames) - 1
    assert all(ep.done), list(zip(ep.subtasks, ep.done))


def test_stack_puts_the_cube_on_the_other_cube_in_state():
    # independent of Episode.done: rebuild the world and run the plan, then read positions
    rng = np.random.default_rng([5, panda.TASKS.index("stack")])
    w = panda.PandaWorld(rng, panda.TRAIN_COLOURS)
    try:
        a, b = list(w.cubes)
        for _, fn in panda._pick_steps(w, a) + panda._put_steps(w, a, b):
            fn()
        top, bottom = w.pos(w.cubes[a]), w.pos(w.cubes[b])
        assert abs(top[2] - bottom[2] - panda.CUBE) < 0.01
        assert np.hypot(*(top - bottom)[:2]) < panda.CUBE / 2
    finally:
        w.close()


def test_a_failed_check_is_reported():
    # a plan step whose goal is impossible must come back False, or the checks cannot fail
    rng = np.random.default_rng([1, 0])
    w = panda.PandaWorld(rng, panda.TRAIN_COLOURS)
    try:
        a = list(w.cubes)[0]
        lift = panda._pick_steps(w, a)[2][1]
        assert lift() is False  # lifting without a grasp leaves the cube on the floor
    finally:
        w.close()


def test_every_object_covers_at_least_one_f8_token_at_96px():
    for seed in range(3):
        rng = np.random.default_rng([seed, 0])
        w = panda.PandaWorld(rng, panda.TRAIN_COLOURS)
        try:
            _, _, _, _, seg = w.c.getCameraImage(96, 96, w.c.computeViewMatrix([1.05, 0.0, 0.62], [0.48, 0.0, 0.05],
                                                                             [0, 0, 1]),
                                                 w.c.computeProjectionMatrixFOV(40, 1.0, 0.05, 5.0),
                                                 renderer=w.p.ER_TINY_RENDERER)
            seg = np.asarray(seg).reshape(96, 96)
            for name, body in {**w.cubes, **w.pads}.items():
                assert (seg == body).sum() >= 64, (seed, name, int((seg == body).sum()))
        finally:
            w.close()


def test_same_seed_same_episode_and_heldout_colours():
    a, b = panda.episode("pick", 2), panda.episode("pick", 2)
    assert a.goal == b.goal and all((x == y).all() for x, y in zip(a.frames, b.frames))
    h = panda.episode("pick", 2, split="heldout")
    assert any(c in h.goal for c in panda.HELDOUT_COLOURS)
    assert not any(c in a.goal for c in panda.HELDOUT_COLOURS)


def test_vla_records_start_from_every_step(tmp_path):
    ep = panda.episode("stack", 3)
    recs = panda.records(ep, [f"f{i}.png" for i in range(len(ep.frames))])
    vla = [r for r in recs if r["task"] == "vla"]
    assert len(vla) == len(ep.subtasks)
    assert vla[0]["question"] == (f"Robot Arm Type: Franka Panda. Instruction: {ep.goal}. "
                                  f"Finish the task with {len(ep.subtasks)} steps.")
    assert vla[1]["images"] == [{"path": "f1.png"}]
    assert vla[0]["answer"][0] == {"text": f"Current Step: {ep.subtasks[0]}"}


def test_wide_palette_keeps_the_held_out_colours_out():
    """The wide training palette holds 16 colours; no held-out name is in it, nor a colour near a held-out one."""
    wide = panda.PALETTES["wide"]
    assert len(wide) == 16 and set(panda.TRAIN_COLOURS) <= set(wide)
    assert not set(wide) & set(panda.HELDOUT_COLOURS)
    for name, rgb in wide.items():
        for h, hrgb in panda.HELDOUT_COLOURS.items():
            assert np.linalg.norm(np.subtract(rgb, hrgb)) > 0.2, (name, h)
    ep = panda.episode("stack", 5, palette="wide")
    assert all(ep.done) and not any(c in ep.goal for c in panda.HELDOUT_COLOURS)
    with pytest.raises(ValueError, match="palette"):
        panda.episode("pick", 1, palette="rainbow")


def test_palette_is_only_for_panda_training_data(tmp_path):
    from train.sim.generate import generate

    for sim, split in (("doom", "train"), ("panda", "heldout")):
        with pytest.raises(ValueError, match="palette"):
            generate(sim, str(tmp_path / sim), 1, split=split, palette="wide")
