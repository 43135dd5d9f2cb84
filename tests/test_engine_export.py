"""Export (JSON, one self-contained HTML page, ZIP with PNGs) and the slideshow MP4, through the API
functions and the CLI."""

import base64
import hashlib
import io
import json
import re
import zipfile

import numpy as np
import pytest

from worldsim import export as ex

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"image_size": [2, 2]}


@pytest.fixture(scope="module")
def session(engine_runtime, tmp_path_factory):
    """alice's explore session (an uploaded image, 4 turns) and a vla plan of 3 keyframes."""
    import torch
    from engine_helpers import png_image

    from worldsim.engine import Engine
    from worldsim.hot import Hot
    from worldsim.store import Store

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = Engine(Store(f"sqlite:///{tmp_path_factory.mktemp('export')}/worldsim.db"), Hot(None), engine_runtime)
    sid = eng.new("alice", "explore", prompt="a <b>bold</b> harbour & boats", images=[png_image(32, 32, seed=7)],
                  settings=SMALL)["session_id"]
    eng.step("alice", sid, "walk to the pier")
    eng.auto("alice", sid, 2)
    plan = eng.new("alice", "vla", arm="Franka Panda", goal="put the red cube in the bowl", steps=3,
                   settings=SMALL)["session_id"]
    torch.set_num_threads(threads)
    yield eng, sid, plan
    eng.close()


def png_of(eng):
    return lambda h: eng.store.get_image(h)["png"]


def all_images(shown):
    inputs = [h for t in shown["turns"] for h in t["input"].get("images", [])]
    outputs = [s["image"] for t in shown["turns"] for s in t["output"] if s["type"] == "image"]
    return inputs, outputs


def test_json_export(session):
    eng, sid, _ = session
    shown = eng.show("alice", sid)
    data = json.loads(ex.export(shown, "json", png_of(eng)))
    assert data["session_id"] == sid and data["mode"] == "explore"
    assert [t["seq"] for t in data["turns"]] == [0, 1, 2, 3]
    assert [t["output"] for t in data["turns"]] == [t["output"] for t in shown["turns"]]
    assert data["turns"][1]["input"]["text"] == "walk to the pier"


def test_html_is_one_self_contained_page(session):
    eng, sid, _ = session
    shown = eng.show("alice", sid)
    page = ex.export(shown, "html", png_of(eng)).decode()
    srcs = re.findall(r"""\bsrc\s*=\s*['"]([^'"]*)['"]""", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"""\b(href|src)\s*=\s*['"]?(https?:|//|file:)""", page)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    embedded = [hashlib.sha256(base64.b64decode(s.split(",", 1)[1])).hexdigest() for s in srcs]
    in_order = [h for t in shown["turns"]
                for h in t["input"].get("images", []) + [s["image"] for s in t["output"] if s["type"] == "image"]]
    assert embedded == in_order and len(embedded) == 5  # the upload, then each turn's picture
    assert "walk to the pier" in page
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page  # user text is escaped


def test_zip_export(session, tmp_path):
    eng, sid, _ = session
    shown = eng.show("alice", sid)
    with zipfile.ZipFile(io.BytesIO(ex.export(shown, "zip", png_of(eng)))) as z:
        names = set(z.namelist())
        inputs, outputs = all_images(shown)
        assert names == {"session.json", "session.html"} | {f"images/{h}.png" for h in inputs + outputs}
        for h in inputs + outputs:
            assert hashlib.sha256(z.read(f"images/{h}.png")).hexdigest() == h
        assert [t["seq"] for t in json.loads(z.read("session.json"))["turns"]] == [0, 1, 2, 3]


def test_vla_plan_export(session):
    eng, _, plan = session
    shown = eng.show("alice", plan)
    data = json.loads(ex.export(shown, "json", png_of(eng)))
    assert len(data["plan"]) == 3 and [p["step"] for p in data["plan"]] == [1, 2, 3]
    page = ex.export(shown, "html", png_of(eng)).decode()
    assert "<h2>Plan</h2>" in page and page.count("<tr><td>") == 3


def read_video(path):
    import imageio.v2 as imageio

    with imageio.get_reader(path) as reader:
        return [np.asarray(f) for f in reader]


def test_render_slideshow_matches_the_keyframes(session, tmp_path):
    from PIL import Image

    eng, sid, _ = session
    shown = eng.show("alice", sid)
    _, keyframes = all_images(shown)
    fps, seconds = 4, 0.5
    out = ex.render_slideshow(shown, png_of(eng), str(tmp_path / "walk.mp4"), fps=fps, seconds_per_image=seconds)
    hold = round(fps * seconds)
    assert out["keyframes"] == len(keyframes) == 4 and out["frames"] == hold * 4
    frames = read_video(out["path"])
    assert len(frames) == len(keyframes) * hold
    pictures = []
    for h in keyframes:
        im = Image.open(io.BytesIO(eng.store.get_image(h)["png"])).convert("RGB")
        scale = -(-256 // max(im.size))
        pictures.append(np.asarray(im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)))
    assert frames[0].shape == pictures[0].shape
    for i, frame in enumerate(frames):
        err = [np.abs(frame.astype(float) - p.astype(float)).mean() for p in pictures]
        own = i // hold
        assert err[own] < 12, f"frame {i}: mean abs error {err[own]:.1f} against its keyframe"
        assert err[own] < min(e for k, e in enumerate(err) if k != own) / 2, f"frame {i} looks like another keyframe"


def test_cli_export_and_render(session, tmp_path, capsys, monkeypatch):
    import worldsim.video
    from worldsim.cli import main

    monkeypatch.delenv(worldsim.video.ENV, raising=False)  # the slideshow (tests/test_video_render.py: decoder)
    monkeypatch.setattr(worldsim.video, "ASSET", str(tmp_path / "no_video_decoder"))

    eng, sid, plan = session
    common = ["--database-url", eng.store.url, "--user", "alice", "--workers", "0"]
    for fmt in ("json", "html", "zip"):
        assert main(["export", sid, "--format", fmt, "--out", str(tmp_path / f"s.{fmt}"), *common]) == 0
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert got["format"] == fmt and got["bytes"] == (tmp_path / f"s.{fmt}").stat().st_size > 0
    assert json.loads((tmp_path / "s.json").read_text())["session_id"] == sid
    assert main(["render", plan, "--out", str(tmp_path / "plan.mp4"), "--fps", "2", *common]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["keyframes"] == 3 and got["frames"] == 6 and got["renderer"] == "slideshow"
    assert len(read_video(str(tmp_path / "plan.mp4"))) == 6
    # bob cannot export alice's session
    assert main(["export", sid, "--format", "json", "--out", str(tmp_path / "b.json"),
                 *common[:2], "--user", "bob"]) == 1
    assert json.loads(capsys.readouterr().out.strip())["kind"] == "not_found"
    assert not (tmp_path / "b.json").exists()


def test_render_refuses_bad_requests(session, tmp_path):
    eng, sid, _ = session
    shown = eng.show("alice", sid)
    with pytest.raises(ValueError, match="^fps:"):
        ex.render_slideshow(shown, png_of(eng), str(tmp_path / "x.mp4"), fps=0)
    empty = {**shown, "turns": []}
    with pytest.raises(ValueError, match="^session:"):
        ex.render_slideshow(empty, png_of(eng), str(tmp_path / "x.mp4"))
    with pytest.raises(ValueError, match="^format:"):
        ex.export(shown, "docx", png_of(eng))
