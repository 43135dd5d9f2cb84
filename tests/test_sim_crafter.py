"""Crafter: the scripted how-to really completes (from the inventory), and the tech-tree checker."""

import pytest

pytest.importorskip("crafter")

from train.sim import craft  # noqa: E402


def test_wood_pickaxe_howto_completes_in_state():
    walk = craft.howto("wood pickaxe", seed=4)
    assert walk.steps == ["Step 1: Collect 3 wood.", "Step 2: Place a table.", "Step 3: Make a wood pickaxe."]
    assert all(walk.done) and len(walk.frames) == 4
    again = craft.howto("wood pickaxe", seed=4)
    assert all((x == y).all() for x, y in zip(walk.frames, again.frames))


def test_agent_state_has_the_pickaxe():
    rng = __import__("numpy").random.default_rng(0)
    ag = craft.Agent(seed=7)
    for _ in range(3):
        assert ag.interact("tree", "do", rng)
    assert ag.player.inventory["wood"] >= 3
    assert ag.place_table(rng)
    assert ag.interact("table", "make_wood_pickaxe", rng)
    assert ag.player.inventory["wood_pickaxe"] == 1


def test_valid_steps_follows_the_tech_tree():
    good = ["Step 1: Collect 3 wood.", "Step 2: Place a table.", "Step 3: Make a wood pickaxe."]
    assert craft.valid_steps(good, "wood pickaxe")
    assert not craft.valid_steps(good, "stone pickaxe")  # does not end with the target
    assert not craft.valid_steps(["Step 1: Place a table.", "Step 2: Make a wood pickaxe."])  # no wood
    assert not craft.valid_steps(["Step 1: Collect 1 wood.", "Step 2: Place a table."])  # a table needs 2
    assert not craft.valid_steps(["Step 1: Collect 1 stone."])  # stone needs a wood pickaxe
    assert not craft.valid_steps(["Step 2: Collect 3 wood."])  # numbering
    assert not craft.valid_steps(["Step 1: Collect 3 wood", "Step 2: Fly."])
    assert not craft.valid_steps([])


def test_story_beats_are_events():
    walk = craft.story(seed=2)
    assert walk.steps and all(b in craft.EVENT_TEXT.values() for b in walk.steps)
    assert len(walk.frames) == len(walk.steps) + 1
