"""Bad inputs: each gets a clear error naming the field, and no state is damaged (every row of every
table is unchanged). Engine API and CLI (JSON error on stdout, non-zero exit)."""

import json
import time

import pytest
from engine_helpers import bomb_png, png_image, run_cli, snapshot

from worldsim.store import NotFound

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"image_size": [2, 2]}


@pytest.fixture(scope="module")
def world(engine_runtime, tmp_path_factory):
    """An engine with alice's explore session of two turns (shared by this module's tests: each one
    checks that it changed nothing)."""
    import torch

    from worldsim.engine import Engine
    from worldsim.hot import Hot
    from worldsim.store import Store

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = Engine(Store(f"sqlite:///{tmp_path_factory.mktemp('inputs')}/worldsim.db"), Hot(None), engine_runtime)
    sid = eng.new("alice", "explore", prompt="a library", settings=SMALL)["session_id"]
    eng.step("alice", sid, "open a book")
    torch.set_num_threads(threads)
    yield eng, sid
    eng.close()


def truncated_png() -> bytes:
    data = png_image(64, 64, seed=2)
    return data[: len(data) // 2]


def corrupt_bytes() -> bytes:
    import random

    return bytes(random.Random(0).randrange(256) for _ in range(5000))


BAD_API_CALLS = {
    "unknown mode": (lambda e, s: e.new("alice", "paint", prompt="x"), ValueError, r"^mode: unknown 'paint'"),
    "empty instruction": (lambda e, s: e.step("alice", s, ""), ValueError, r"^instruction: must not be empty"),
    "blank instruction": (lambda e, s: e.step("alice", s, "   \n"), ValueError, r"^instruction: must not be empty"),
    "empty prompt": (lambda e, s: e.new("alice", "explore", prompt=""), ValueError, r"^prompt:"),
    "1 MB prompt": (lambda e, s: e.new("alice", "explore", prompt="a" * 2**20, settings=SMALL), ValueError,
                    r"^prompt: 1,048,576 characters is over the limit"),
    "1 MB instruction": (lambda e, s: e.step("alice", s, "go " * 350_000), ValueError, r"^instruction:.*over the limit"),
    "corrupt image": (lambda e, s: e.new("alice", "explore", prompt="x", images=[corrupt_bytes()]), ValueError,
                      r"^images\[0\]: not a readable image"),
    "truncated png": (lambda e, s: e.new("alice", "story", prompt="x", images=[truncated_png()]), ValueError,
                      r"^images\[0\]: the PNG data is corrupt or truncated"),
    "corrupt image in a step": (lambda e, s: e.step("alice", s, "look", images=[truncated_png()]), ValueError,
                                r"^images\[0\]:"),
    "empty image": (lambda e, s: e.new("alice", "explore", prompt="x", images=[b""]), ValueError, r"^images\[0\]:"),
    "text as image": (lambda e, s: e.new("alice", "explore", prompt="x", images=[b"GIF89a not really"]), ValueError,
                      r"^images\[0\]:"),
    "wrong owner": (lambda e, s: e.step("bob", s, "walk"), NotFound, r"^session_id: no session .* for user 'bob'"),
    "unknown session": (lambda e, s: e.step("alice", "0" * 32, "walk"), NotFound, r"^session_id: no session"),
    "unknown session show": (lambda e, s: e.show("alice", "nope"), NotFound, r"^session_id:"),
    "branch beyond the last turn": (lambda e, s: e.branch("alice", s, 2), ValueError, r"^seq: must be .*\[0, 1\]"),
    "branch at a negative turn": (lambda e, s: e.branch("alice", s, -1), ValueError, r"^seq:"),
    "vla steps 0": (lambda e, s: e.new("alice", "vla", arm="Franka Panda", goal="stack the cubes", steps=0),
                    ValueError, r"^steps: must be an integer in \[1, 12\], got 0"),
    "vla steps 1000": (lambda e, s: e.new("alice", "vla", arm="Franka Panda", goal="stack the cubes", steps=1000),
                       ValueError, r"^steps: must be an integer in \[1, 12\], got 1000"),
    "vla steps missing": (lambda e, s: e.new("alice", "vla", arm="Franka Panda", goal="stack"), ValueError, r"^steps:"),
    "vla no goal": (lambda e, s: e.new("alice", "vla", arm="Franka Panda", goal=" ", steps=3), ValueError, r"^goal:"),
    "auto steps 0": (lambda e, s: e.auto("alice", s, 0), ValueError, r"^steps:"),
    "auto steps 51": (lambda e, s: e.auto("alice", s, 51), ValueError, r"^steps:"),
    "reroll unknown turn": (lambda e, s: e.reroll("alice", s, 9), ValueError, r"^seq:"),
    "unknown setting": (lambda e, s: e.new("alice", "explore", prompt="x", settings={"size": 3}), ValueError,
                        r"^settings:"),
    "bad image size": (lambda e, s: e.new("alice", "explore", prompt="x", settings={"image_size": [0, 4]}),
                       ValueError, r"^settings.image_size:"),
    "bad sampling": (lambda e, s: e.new("alice", "explore", prompt="x", settings={"sampling": {"text_top_p": 2}}),
                     ValueError, r"^text_top_p:"),
    "no user": (lambda e, s: e.list(""), ValueError, r"^user:"),
}


@pytest.mark.parametrize("case", list(BAD_API_CALLS))
def test_bad_input_is_refused_and_changes_nothing(world, case):
    eng, sid = world
    call, error, pattern = BAD_API_CALLS[case]
    before = snapshot(eng.store)
    with pytest.raises(error, match=pattern):
        call(eng, sid)
    assert snapshot(eng.store) == before
    assert [t["seq"] for t in eng.show("alice", sid)["turns"]] == [0, 1]


def png_size(data: bytes) -> tuple[int, int]:
    import struct

    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [20000, 10000])
def test_image_bomb_is_refused_before_decoding(world, side):
    eng, _ = world
    bomb = bomb_png(side, side)
    assert len(bomb) < 2**20 and png_size(bomb) == (side, side)  # small on the wire, huge once decoded
    before = snapshot(eng.store)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"^images\[0\]: ") as refused:
        eng.new("alice", "explore", prompt="a huge picture", images=[bomb])
    assert time.perf_counter() - start < 1.0  # refused from the header; decoding would take seconds
    assert snapshot(eng.store) == before
    if side == 10000:
        assert str(refused.value).startswith("images[0]: 10000x10000 = 100,000,000 pixels is over the limit")


def test_image_bomb_error_names_the_pixel_limit(world):
    eng, _ = world
    with pytest.raises(ValueError, match=r"^images\[0\]: 20000x20000 = 400,000,000 pixels is over the limit"):
        eng.new("alice", "explore", prompt="a huge picture", images=[bomb_png(20000, 20000)])


def test_reference_limits(world):
    eng, sid = world
    before = snapshot(eng.store)
    with pytest.raises(ValueError, match=r"^images: explore takes at most 1"):
        eng.new("alice", "explore", prompt="x", images=[png_image(8, 8), png_image(8, 8, seed=1)])
    with pytest.raises(ValueError, match=r"^images: at most 1"):
        eng.step("alice", sid, "x", images=[png_image(8, 8), png_image(8, 8, seed=1)])
    assert snapshot(eng.store) == before


# ---- CLI ----------------------------------------------------------------------------------------------
def cli(capsys, args):
    """worldsim.cli.main in this process -> (exit code, JSON printed)."""
    from worldsim.cli import main

    rc = main(args)
    out = capsys.readouterr().out.strip().splitlines()
    return rc, json.loads(out[-1])


def test_cli_bad_inputs(world, capsys, tmp_path):
    eng, sid = world
    db = ["--database-url", eng.store.url, "--workers", "0", "--user", "alice"]
    corrupt, trunc, bomb = tmp_path / "noise.png", tmp_path / "half.png", tmp_path / "bomb.png"
    corrupt.write_bytes(corrupt_bytes())
    trunc.write_bytes(truncated_png())
    bomb.write_bytes(bomb_png())
    cases = [
        (["new", "--mode", "paint", "--prompt", "x"], "mode: unknown"),
        (["step", sid, "--instruction", ""], "instruction: must not be empty"),
        (["new", "--mode", "explore", "--prompt", "p" * 2**20], "prompt: 1,048,576 characters"),
        (["new", "--mode", "explore", "--prompt", "x", "--image", str(corrupt)], "images[0]: not a readable image"),
        (["new", "--mode", "explore", "--prompt", "x", "--image", str(trunc)], "images[0]: the PNG data is corrupt"),
        (["new", "--mode", "explore", "--prompt", "x", "--image", str(bomb)], "images[0]: "),
        (["new", "--mode", "explore", "--prompt", "x", "--image", str(tmp_path / "missing.png")], "image: file"),
        (["step", sid, "--instruction", "walk", "--user", "bob"], "session_id: no session"),
        (["show", sid, "--user", "bob"], "session_id: no session"),
        (["show", "f" * 32], "session_id: no session"),
        (["branch", sid, "--seq", "5"], "seq: must be a turn"),
        (["new", "--mode", "vla", "--arm", "Franka Panda", "--goal", "stack", "--steps", "0"], "steps: must be"),
        (["new", "--mode", "vla", "--arm", "Franka Panda", "--goal", "stack", "--steps", "1000"], "steps: must be"),
        (["auto", sid, "--steps", "0"], "steps: must be"),
        (["replan", sid, "--step", "1", "--subtask", "lift it"], "mode: replan edits a vla"),
        (["replan", sid, "--step", "1", "--subtask", "lift it", "--user", "bob"], "session_id: no session"),
        (["export", sid, "--format", "pdf", "--out", str(tmp_path / "x.pdf")], "format: unknown 'pdf'"),
    ]
    before = snapshot(eng.store)
    for args, message in cases:
        rc, out = cli(capsys, args[:1] + db + args[1:])  # a later --user (bob) wins
        assert rc == 1, (args, out)
        assert message in out["error"], (args, out)
        assert out["kind"] in ("ValueError", "not_found"), out
    assert snapshot(eng.store) == before
    with pytest.raises(SystemExit) as usage:  # argparse errors: JSON too, exit code 2
        cli(capsys, ["step"] + db)
    assert usage.value.code == 2
    assert json.loads(capsys.readouterr().out.strip())["kind"] == "usage"


def test_cli_bad_input_in_a_real_process(world):
    """The same errors through `python -m worldsim` as a separate process, with its default in-process
    worker: exit code 1 and one JSON object on stdout."""
    eng, sid = world
    before = snapshot(eng.store)
    for args, message in [
        (["new", "--mode", "vla", "--arm", "Franka Panda", "--goal", "stack", "--steps", "1000"], "steps:"),
        (["branch", sid, "--seq", "2", "--user", "alice"], "seq:"),
    ]:
        rc, out, err = run_cli(args + ["--database-url", eng.store.url])
        assert rc == 1 and message in out["error"], (out, err[-2000:])
    assert snapshot(eng.store) == before


def test_prompt_too_long_for_the_context_leaves_no_session(make_engine):
    import random

    eng = make_engine()
    # under the 4,000-character limit, but thousands of tokens for the debug BPE (context 2,048)
    prompt = " ".join(random.Random(0).choice(["zq", "xv", "kj", "9", "@", "é"]) for _ in range(2000))[:4000]
    with pytest.raises(Exception, match="prompt:"):
        eng.new("alice", "explore", prompt=prompt, settings=SMALL)
    assert eng.list("alice") == []
