"""ViZDoom generator: reproducible shards, the sentence layout, and clear errors on bad worlds."""

import filecmp
import json
import os

import pytest

pytest.importorskip("vizdoom")

from train.data import format as fmt  # noqa: E402
from train.sim import doom, generate  # noqa: E402


def _gen(out, **kw):
    args = dict(sim="doom", out=str(out), episodes=1, seed=3, steps=3)
    args.update(kw)
    return generate.generate(**args)


def test_same_seed_same_shard_and_frames(tmp_path):
    a, b = _gen(tmp_path / "a"), _gen(tmp_path / "b")
    assert a["records"] == b["records"] > 0
    shard = "doom-train-3-00000.jsonl"
    assert filecmp.cmp(tmp_path / "a" / shard, tmp_path / "b" / shard, shallow=False)
    frames = sorted(os.listdir(tmp_path / "a" / "frames" / "doom-train-3-00000"))
    assert len(frames) == 4
    for f in frames:
        assert filecmp.cmp(tmp_path / "a/frames/doom-train-3-00000" / f, tmp_path / "b/frames/doom-train-3-00000" / f,
                           shallow=False)
    c = _gen(tmp_path / "c", seed=4)
    assert not filecmp.cmp(tmp_path / "a" / shard, tmp_path / "c" / "doom-train-4-00000.jsonl", shallow=False)
    with open(tmp_path / "a" / generate.WORLDS_FILE) as f:  # episode -> world, for per-world figures
        assert json.load(f) == {"doom-train-3-00000": doom.train_worlds()[0]["name"]}


def test_records_use_canonical_sentences_and_valid_format(tmp_path):
    _gen(tmp_path)
    recs = list(fmt.read_shard(str(tmp_path / "doom-train-3-00000.jsonl")))
    explore = [r for r in recs if r["task"] == "explore"]
    interactive = [r for r in explore if r["question"] in doom.ACTIONS and "turns" not in r]
    assert len(interactive) == 3
    for r in interactive:  # instruction + view -> the action's narration, then the next view
        assert r["answer"][0]["text"] == doom.NARRATION[r["question"]]
        assert os.path.isfile(r["images"][0]["path"]) and os.path.isfile(r["answer"][1]["image"]["path"])
    # the same 3 steps as one step-by-step session: first instruction + view, then one instruction per turn
    [session] = [r for r in explore if "turns" in r]
    steps = [session] + session["turns"]
    assert [t["question"] for t in steps] == [r["question"] for r in interactive]
    assert [t["answer"] for t in steps] == [r["answer"] for r in interactive]
    assert session["images"] == interactive[0]["images"] and all(t["images"] == [] for t in session["turns"])
    free = [r for r in explore if r["question"] == "Explore this place."]
    assert free and all(s["text"] in doom.NARRATION.values() for r in free for s in r["answer"] if "text" in s)


def test_action_changes_the_view_and_rollouts_replay():
    world = doom.resolve_world("my_way_home")
    frames = doom.rollout(world, 5, ["turn left", "turn left"])
    assert frames[0].shape == (doom.HEIGHT, doom.WIDTH, 3)
    assert (frames[0] != frames[1]).mean() > 0.1  # turning moves the picture
    again = doom.rollout(world, 5, ["turn left", "turn left"])
    assert all((x == y).all() for x, y in zip(frames, again))


def test_splits_keep_unseen_maps_out_of_training():
    names = {w["name"] for w in doom.train_worlds()}
    assert "freedoom2.wad:MAP10" in names and "freedoom2.wad:MAP11" not in names
    assert not any(n.startswith("freedoom1") for n in names)
    with pytest.raises(ValueError, match="held-out world"):
        generate.generate("doom", "/tmp/unused", 1, wad="freedoom2.wad", map_name="MAP15")


@pytest.mark.parametrize("argv, message", [
    (["--scenario", "no_such_scenario"], "unknown 'no_such_scenario'"),
    (["--scenario", "/nonexistent/x.cfg"], "is not a file"),
    (["--wad", "freedoom2.wad", "--map", "MAP77"], "has no map 'MAP77'"),
    (["--wad", "freedoom1.wad", "--map", "MAP01"], "has no map 'MAP01'"),
    (["--episodes", "0"], "episodes: must be a positive integer"),
])
def test_bad_inputs_give_clear_errors(tmp_path, capsys, argv, message):
    rc = generate.main(["--sim", "doom", "--out", str(tmp_path / "x")] + argv)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists() or not any(n.endswith(".jsonl") for n in os.listdir(tmp_path / "x"))


def test_not_a_wad(tmp_path):
    bad = tmp_path / "bad.wad"
    bad.write_bytes(b"hello world, not a wad")
    with pytest.raises(ValueError, match="not a WAD"):
        doom.resolve_world(wad=str(bad), map_name="MAP01")


def test_summary_line(tmp_path, capsys):
    assert generate.main(["--sim", "doom", "--out", str(tmp_path), "--episodes", "1", "--steps", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames"] == 3 and summary["shards"] == 1
