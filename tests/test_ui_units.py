"""The UI's pure parts: identity from cookies, folding engine events into a live view, input checks,
aspect presets, and HTML that escapes whatever the model writes."""

import io

import pytest
from PIL import Image

from app import checks, render
from app.handlers import ASPECTS, aspect_size
from app.identity import COOKIE, NoIdentity, token_from_cookie_header, user_for_token, user_of
from app.stream import Live


class Req:
    def __init__(self, cookie=None):
        self.headers = {"cookie": cookie} if cookie else {}


def test_identity_is_a_hash_of_the_cookie_token():
    token = "A" * 40
    assert user_of(Req(f"other=1; {COOKIE}={token}")) == user_for_token(token)
    assert user_for_token(token) != user_for_token("B" * 40) and token not in user_for_token(token)
    assert user_for_token(token).startswith("b-") and len(user_for_token(token)) == 34
    for bad in (None, "other=1", f"{COOKIE}=short", f"{COOKIE}=" + "x" * 31, f'{COOKIE}="{"a" * 40};"'):
        assert token_from_cookie_header(bad) is None
        with pytest.raises(NoIdentity, match="cookie"):
            user_of(Req(bad))


def job(action="turn", status="queued", steps=None):
    payload = {"steps": steps} if action == "auto" else {"kind": "instruction", "input": {"text": "go left"}}
    return {"id": "j1", "session_id": "s1", "action": action, "status": status, "payload": payload,
            "created_at": 0.0, "updated_at": 0.0, "error": None}


def turn(seq, digest, text="a room"):
    return {"seq": seq, "kind": "instruction", "input": {"text": "go"}, "meta": {},
            "output": [{"type": "text", "text": text}, {"type": "image", "image": digest, "height": 2, "width": 3}]}


def test_live_folds_events_into_a_pending_turn_then_commits_it():
    live = Live(job(), [turn(0, "a" * 64)])
    assert live.status_text().startswith("Waiting")
    assert live.feed({"type": "started"}) is True
    assert live.feed({"type": "text", "text": "a "}) is False
    live.feed({"type": "text", "text": "door"})
    pending = live.turns_for_view()[-1]
    assert pending["seq"] == 1 and pending["input"] == {"text": "go left"}
    assert pending["output"] == [{"type": "text", "text": "a door"}]
    live.feed({"type": "image_started", "height": 2, "width": 3})
    live.feed({"type": "image_progress", "rows_done": 1, "rows_total": 2})
    html = render.explore(live.turns_for_view())
    assert "Decoding image… 1/2 rows" in html and "aspect-ratio:3/2" in html
    assert "decoding an image (1/2 rows)" in live.status_text()
    live.feed({"type": "image", "image": "b" * 64, "height": 2, "width": 3})
    assert "b" * 64 not in render.explore(live.turns_for_view())  # not served before its turn commits
    assert live.feed({"type": "turn", "turn": turn(1, "b" * 64)}) is True
    assert [t["seq"] for t in live.turns_for_view()] == [0, 1]
    live.feed({"type": "done", "status": "done"})
    assert live.status_text().startswith("✓ Done")
    assert "b" * 64 in render.explore(live.turns_for_view())


def test_live_reroll_replaces_the_last_turn_and_auto_counts_turns():
    live = Live(job("reroll"), [turn(0, "a" * 64), turn(1, "c" * 64)])
    assert [t["seq"] for t in live.turns] == [0]
    live.feed({"type": "started"})
    live.feed({"type": "text", "text": "x"})
    assert live.turns_for_view()[-1]["seq"] == 1
    auto = Live(job("auto", steps=3), [turn(0, "a" * 64)])
    auto.feed({"type": "started"})
    auto.feed({"type": "turn", "turn": turn(1, "d" * 64)})
    assert "turn 2 of 3" in auto.status_text()
    auto.feed({"type": "error", "error": "seq: boom"})
    auto.feed({"type": "done", "status": "failed"})
    assert auto.status_text() == "✗ Failed: seq: boom"


def test_model_text_is_escaped():
    evil = "<script>alert(1)</script><|extra_3|>"
    t = turn(0, "a" * 64, text=evil)
    t["input"]["text"] = evil
    for view in (render.explore, render.story, render.guide, render.plan, render.images):
        html = view([t])
        assert "<script>" not in html and "&lt;script&gt;" in html


def test_plan_flags_keyframes_that_do_not_change():
    t = turn(0, "a" * 64, text="Current Step: pick up the cube")
    t["output"] += [{"type": "text", "text": "Current Step: lift it"},
                    {"type": "image", "image": "b" * 64, "height": 2, "width": 3}]
    html = render.plan([t], motion=[None, 0.5])
    assert html.count("no visible change") == 1 and "pick up the cube" in html and "Current Step" not in html
    assert "no visible change" not in render.plan([t], motion=[None, 30.0])


def test_checks(tmp_path):
    assert checks.parse_size("auto") is None and checks.parse_size(" 4 x 6 ") == [4, 6]
    for bad in ("0x4", "4x100", "4", "axb", "4x4x4"):
        assert "image size" in checks.image_size(bad)
    assert checks.text("", "prompt") == "prompt: must not be empty"
    assert checks.text("", "prompt", required=False) is None
    assert "over the limit" in checks.text("x" * 4001, "prompt")
    assert checks.seed(3) is None and checks.seed(3.0) is None and "seed" in checks.seed(-1)
    assert "seed" in checks.seed(True)
    good = tmp_path / "ok.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good)
    assert checks.upload(str(good), "image") is None and checks.upload(None, "image") is None
    gif = tmp_path / "a.gif"
    Image.new("RGB", (8, 8)).save(gif)
    assert "format GIF is not allowed" in checks.upload(str(gif), "image")
    assert "did not arrive" in checks.upload(str(tmp_path / "missing.png"), "image")
    assert "at most 3" in checks.uploads([str(good)] * 4, "refs")
    buf = io.BytesIO()
    Image.new("L", (4097, 4096)).save(buf, "PNG")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(buf.getvalue())
    assert "pixels is over the limit" in checks.upload(str(bomb), "image")


def test_aspect_presets_scale_to_the_model():
    assert aspect_size("1:1", 64) == [64, 64]
    assert {k: aspect_size(k, 64) for k in ASPECTS} == {k: list(v) for k, v in ASPECTS.items()}  # SPEC §3 as is
    assert aspect_size("16:9", 16) == [12, 21] and aspect_size("9:16", 16) == [21, 12]
    assert aspect_size("21:9", 1) == [1, 2]
