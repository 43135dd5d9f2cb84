"""Rendering sessions to MP4 with the video decoder (worldsim/video.py): frame count, keyframes exactly at
their timestamps and equal to the session's images, progress, the cache, the slideshow fallback, the CLI."""

import hashlib
import io
import json
import os
import time

import numpy as np
import pytest
import torch

from worldsim import video

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def png_bytes(seed: int, size=(32, 32)) -> bytes:
    """A picture that no other seed's resembles: random 4 x 4 blocks of colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    im = Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def session():
    """Three turns of a walk, one picture each (the second turn also narrates), and the PNG store."""
    store, turns = {}, []
    for seq, text in enumerate(["a harbour", "walk to the pier", "turn left"]):
        data = png_bytes(seq + 10)
        digest = hashlib.sha256(data).hexdigest()
        store[digest] = data
        output = [{"type": "image", "image": digest}]
        if seq == 1:
            output.insert(0, {"type": "text", "text": "You walk along the quay."})
        turns.append({"seq": seq, "kind": "new" if seq == 0 else "step", "input": {"text": text}, "output": output})
    return {"session_id": "s1", "title": "", "mode": "explore", "turns": turns}, store.__getitem__


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """A debug video decoder folder with random weights (its in-betweens are noise, unlike any keyframe)."""
    from model.video_decoder import VideoDecoder, video_decoder_preset
    from model.video_sampling import DecoderSettings, save_video_decoder
    from model.vision_tokenizer import IBQ, ibq_preset

    torch.manual_seed(0)
    model = VideoDecoder(**video_decoder_preset("debug", 32))
    path = str(tmp_path_factory.mktemp("vd") / "decoder")
    save_video_decoder(path, model, IBQ(ibq_preset("debug")), DecoderSettings(frame_size=(32, 32), num_steps=2))
    return path


def read_video(path):
    import imageio.v2 as imageio

    with imageio.get_reader(path) as reader:
        return [np.asarray(f) for f in reader]


def picture(png, digest, size):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png(digest))).convert("RGB").resize(size, Image.Resampling.NEAREST))


def test_keyframe_track(session):
    s, _ = session
    track = video.keyframe_track(s)
    assert [k["text"] for k in track] == ["a harbour", "walk to the pier You walk along the quay.", "turn left"]
    assert [k["seq"] for k in video.keyframe_track(s, (1, 2))] == [1, 2]
    assert video.keyframe_frames(3, 4, 1.0) == [0, 4, 8]
    assert video.keyframe_frames(3, 10, 0.5, timestamps=[2.0, 2.3, 3.0]) == [0, 3, 10]
    with pytest.raises(ValueError, match="^timestamps:"):
        video.keyframe_frames(2, 2, 1.0, timestamps=[0.0, 0.1])


def test_render_puts_the_keyframes_at_their_timestamps(session, decoder, tmp_path):
    s, png = session
    calls = []
    out = video.render_video(s, png, str(tmp_path / "walk.mp4"), decoder=decoder, fps=4, seconds_per_image=1.5,
                             progress=lambda d, n: calls.append((d, n)))
    ks = [0, 6, 12]  # round(i * 1.5 * 4)
    assert out["keyframe_frames"] == ks and out["frames"] == 13 and out["keyframes"] == 3 and not out["cached"]
    frames = read_video(out["path"])
    assert len(frames) == 13 and frames[0].shape == (256, 256, 3)  # 32 px upscaled 8x, as the slideshow
    pictures = [picture(png, k["image"], (256, 256)) for k in video.keyframe_track(s)]
    for i, frame in enumerate(frames):
        err = [np.abs(frame.astype(float) - p.astype(float)).mean() for p in pictures]
        if i in ks:
            own = ks.index(i)
            assert err[own] < 6, f"frame {i}: mean abs error {err[own]:.1f} against keyframe {own}"
            assert err[own] < min(e for k, e in enumerate(err) if k != own) / 4
        else:
            assert min(err) > 12, f"frame {i} is a copy of a keyframe, not a generated in-between"
    assert calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) == 2 * 1 + 1  # one batch (both gaps are 7 frames) of 2 steps, then the file


def test_second_render_is_served_from_the_cache(session, decoder, tmp_path):
    s, png = session
    data_dir = str(tmp_path / "data")
    kw = dict(decoder=decoder, fps=3, seconds_per_image=1.0, data_dir=data_dir)
    first = video.render_video(s, png, str(tmp_path / "a.mp4"), **kw)
    assert not first["cached"] and os.path.isfile(os.path.join(data_dir, "videos", first["cache_key"] + ".mp4"))
    t0 = time.perf_counter()
    second = video.render_video(s, png, str(tmp_path / "b.mp4"), **kw)
    assert second["cached"] and second["cache_key"] == first["cache_key"]
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    assert time.perf_counter() - t0 < 1.0
    other = video.render_video(s, png, str(tmp_path / "c.mp4"), **{**kw, "fps": 4})
    assert not other["cached"] and other["cache_key"] != first["cache_key"]
    span = video.render_video(s, png, str(tmp_path / "d.mp4"), turns=(1, 2), **kw)
    assert not span["cached"] and span["keyframes"] == 2 and len(read_video(span["path"])) == 4


def test_render_routes_to_the_slideshow_without_a_decoder(session, decoder, tmp_path, monkeypatch):
    s, png = session
    monkeypatch.delenv(video.ENV, raising=False)
    monkeypatch.setattr(video, "ASSET", str(tmp_path / "none"))
    out = video.render(s, png, str(tmp_path / "slides.mp4"), fps=2, seconds_per_image=1.0)
    assert out["renderer"] == "slideshow" and out["frames"] == 6 and len(read_video(out["path"])) == 6
    monkeypatch.setenv(video.ENV, decoder)
    out = video.render(s, png, str(tmp_path / "video.mp4"), fps=2, seconds_per_image=1.0)
    assert out["renderer"] == "video_decoder" and out["frames"] == 5
    monkeypatch.setenv(video.ENV, str(tmp_path))
    with pytest.raises(ValueError, match=f"^{video.ENV}:"):
        video.render(s, png, str(tmp_path / "x.mp4"))
    with pytest.raises(ValueError, match="^fps:"):
        video.render_video(s, png, str(tmp_path / "x.mp4"), decoder=decoder, fps=0)
    with pytest.raises(ValueError, match="^session:"):
        video.render_video({**s, "turns": []}, png, str(tmp_path / "x.mp4"), decoder=decoder)


def test_cli_render_uses_the_video_decoder(engine_runtime, decoder, tmp_path, capsys, monkeypatch):
    from engine_helpers import png_image

    from worldsim.cli import main
    from worldsim.engine import Engine
    from worldsim.hot import Hot
    from worldsim.store import Store

    monkeypatch.delenv(video.ENV, raising=False)
    url = f"sqlite:///{tmp_path}/worldsim.db"
    eng = Engine(Store(url), Hot(None), engine_runtime)
    try:
        sid = eng.new("alice", "explore", prompt="a harbour", images=[png_image(32, 32, seed=7)],
                      settings={"image_size": [2, 2]})["session_id"]
        eng.step("alice", sid, "walk to the pier")
    finally:
        eng.close()
    common = ["--database-url", url, "--user", "alice", "--workers", "0", "--data-dir", str(tmp_path / "data")]
    out = str(tmp_path / "walk.mp4")
    assert main(["render", sid, "--out", out, "--fps", "4", "--video-decoder", decoder, *common]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["renderer"] == "video_decoder" and got["keyframes"] == 2 and got["frames"] == 5
    assert len(read_video(out)) == 5 and os.listdir(tmp_path / "data" / "videos")
