"""train.evaluate on a tiny random checkpoint: every task's keys, and clear errors on bad inputs."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("vizdoom")
pytest.importorskip("pybullet")
pytest.importorskip("crafter")

from train import evaluate  # noqa: E402


def _run(capsys, argv):
    rc = evaluate.main(argv + ["--json", "--threads", "1"])
    out = capsys.readouterr()
    return rc, json.loads(out.out.strip().splitlines()[-1]) if out.out.strip() else None, out.err


def test_explore_keys(tiny_checkpoints, capsys):
    rc, out, err = _run(capsys, ["--task", "explore", "--checkpoint", tiny_checkpoints["good"], "--scenario", "basic",
                                 "--episodes", "1", "--steps", "1", "--rollout", "1"])
    assert rc == 0, err
    for k in ("model_psnr", "baseline_psnr", "prev_tokens_psnr", "tokenizer_psnr", "shuffled_instruction_psnr",
              "teacher_forced_psnr", "per_action", "rollout_psnr", "rollout_baseline_psnr"):
        assert k in out, k
    (action, figures), = out["per_action"].items()
    assert set(figures) >= {"model_psnr", "baseline_psnr", "prev_tokens_psnr"}
    assert out["baseline_psnr"] > out["model_psnr"]  # random weights must not look like a world model


def test_manipulate_keys_with_dida(tiny_checkpoints, capsys):
    rc, out, err = _run(capsys, ["--task", "manipulate", "--checkpoint", tiny_checkpoints["good"], "--episodes", "1",
                                 "--sampler", "dida", "--dida-steps", "2"])
    assert rc == 0, err
    for k in ("model_psnr", "baseline_psnr", "model_object_psnr", "baseline_object_psnr", "subtask_exact_match"):
        assert k in out, k
    assert out["num_subtasks"] == 3 and out["subtask_exact_match"] == 0.0


def test_text_mistakes_match_a_prefix_by_prefix_reference(tiny_checkpoints):
    """The one-pass teacher-forced text check equals re-running the model on each prefix of the answer."""
    import torch

    from train.data import format as fmt

    ev = evaluate.Evaluator(tiny_checkpoints["good"])
    rec = fmt.record("howto", [fmt.text("Step 1: Collect 2 wood."), {"image": {"codes": [[1, 2, 3], [4, 5, 6]]}},
                               fmt.text("Step 2: Place a table."), {"image": {"codes": [[7, 8, 9], [1, 2, 3]]}}],
                     "How to build a crafting table")
    enc = fmt.encode_record(rec, ev.tok, mode="sft", visual_weight=1.0)
    boi = [p for p, t in enumerate(enc.ids) if t == ev.vocab.boi]
    eoi = [p for p, t in enumerate(enc.ids) if t == ev.vocab.eoi]
    assert len(boi) == len(eoi) == 2
    ref = []
    with torch.no_grad():
        for p in range(*enc.answer_span):
            if not any(b < p <= e for b, e in zip(boi, eoi)):  # an image's layout is forced, its BOI is chosen
                q = int(ev.model(torch.tensor([enc.ids[:p]]))[0, -1].argmax())
                if q != enc.ids[p]:
                    ref.append((ev.tok.decode([enc.ids[p]]), ev.tok.decode([q])))
    got = ev.text_mistakes(rec)
    assert got == ref
    assert got  # random weights get the answer wrong


@pytest.mark.slow
def test_guide_and_story_keys(tiny_checkpoints, capsys):
    rc, out, err = _run(capsys, ["--task", "guide", "--checkpoint", tiny_checkpoints["good"], "--episodes", "1",
                                 "--sampler", "dida", "--dida-steps", "2"])
    assert rc == 0, err
    assert 0.0 <= out["valid_fraction"] <= 1.0
    assert set(out["teacher_forced"]) == {"wood pickaxe", "wood sword", "stone pickaxe", "table"}
    assert out["teacher_forced_valid"] == 0.0  # random weights reproduce no plan
    assert all(f["first_mistake"] for f in out["teacher_forced"].values())
    rc, out, err = _run(capsys, ["--task", "story", "--checkpoint", tiny_checkpoints["good"], "--episodes", "1",
                                 "--sampler", "dida", "--dida-steps", "2"])
    assert rc == 0, err
    assert {"event_recall", "beat_precision", "agreement"} <= set(out)


@pytest.mark.parametrize("extra, message", [
    (["--scenario", "/nope/unknown.cfg"], "scenario: /nope/unknown.cfg is not a file"),
    (["--scenario", "not_bundled"], "unknown 'not_bundled'"),
    (["--wad", "freedoom2.wad", "--map", "E1M1"], "has no map 'E1M1'"),
    (["--episodes", "0"], "episodes: must be a positive integer"),
])
def test_bad_inputs(tiny_checkpoints, capsys, extra, message):
    rc, out, err = _run(capsys, ["--task", "explore", "--checkpoint", tiny_checkpoints["good"]] + extra)
    assert rc == 2 and message in err and message in out["error"]


def test_score_area_compares_models_of_different_areas_on_the_same_pixels(tiny_checkpoints, capsys):
    """--score-area: every figure on one frame size whatever the model's area, so copy-last (which does not
    depend on the model) comes out identical for a model read at 48x80 and at 80x112; without it, each
    area scores on its own frames."""
    base = ["--task", "explore", "--checkpoint", tiny_checkpoints["good"], "--scenario", "basic", "--episodes", "1",
            "--steps", "2", "--rollout", "1"]
    figures = {}
    for area in (64 * 64, 96 * 96):
        for score in ([], ["--score-area", str(96 * 96)]):
            rc, out, err = _run(capsys, base + ["--image-area", str(area)] + score)
            assert rc == 0, err
            figures[area, bool(score)] = out
    assert figures[4096, True]["baseline_psnr"] == figures[9216, True]["baseline_psnr"]
    assert figures[4096, False]["baseline_psnr"] != figures[9216, False]["baseline_psnr"]
    # the factor-16 debug tokenizer at 96x96 reads 80x112 frames, the score frame itself: nothing moves
    assert figures[9216, True]["tokenizer_psnr"] == figures[9216, False]["tokenizer_psnr"]
    ev = evaluate.Evaluator(tiny_checkpoints["good"], image_area=64 * 64, score_area=96 * 96)
    frame = np.zeros((120, 160, 3), np.uint8)
    assert ev.resize(frame).shape == (48, 80, 3) and ev.truth(frame, ev.resize(frame)).shape == (80, 112, 3)
    assert ev.pixels(ev.encode(ev.resize(frame)), ev.truth(frame, ev.resize(frame))).shape == (80, 112, 3)


@pytest.mark.parametrize("extra, message", [
    (["--task", "explore", "--score-area", "10"], "score_area: must be an integer of at least 64 px, got 10"),
    (["--task", "guide", "--score-area", "9216"], "score_area: only for --task explore or manipulate"),
])
def test_bad_score_area(tiny_checkpoints, capsys, extra, message):
    rc, out, err = _run(capsys, ["--checkpoint", tiny_checkpoints["good"], "--episodes", "1"] + extra)
    assert rc == 2 and message in err


def test_tokenizer_mismatch(tiny_checkpoints, capsys):
    rc, out, err = _run(capsys, ["--task", "explore", "--checkpoint", tiny_checkpoints["bad"], "--episodes", "1"])
    assert rc == 2 and "codebook_size" in err and "does not match" in err


def test_missing_checkpoint(tmp_path, capsys):
    rc, out, err = _run(capsys, ["--task", "guide", "--checkpoint", str(tmp_path / "none")])
    assert rc == 2 and "is not a folder" in err


def test_packaged_checkpoint_loads_in_fp32_at_its_training_image_size(tiny_checkpoints, tmp_path):
    """train.sim.package writes fp16 weights and the training image area; the engine's Runtime computes
    in fp32 on a CPU and defaults to that area's grid (a 96x96-pixel area with the debug IBQ's f16 ->
    6x6 tokens)."""
    import torch

    from train.sim.package import package
    from worldsim.runtime import Runtime

    good = tiny_checkpoints["good"]
    out = package(good, os.path.join(good, "vision_tokenizer"), str(tmp_path / "demo"), image_area=96 * 96)
    assert out["mb"] < 80
    rt = Runtime.load(out["out"])
    assert next(rt.model.parameters()).dtype == torch.float32
    assert rt.default_image_size(1024 * 1024) == (6, 6) and rt.default_image_size(32 * 32) == (2, 2)
    assert rt.max_image_side() >= 6
    # the evaluation compares at the area the checkpoint was trained at unless --image-area says otherwise
    assert evaluate.Evaluator(out["out"]).image_area == 96 * 96
    small = package(good, os.path.join(good, "vision_tokenizer"), str(tmp_path / "small"), image_area=64 * 64)
    assert evaluate.Evaluator(small["out"]).image_area == 64 * 64
    assert evaluate.Evaluator(small["out"], image_area=32 * 32).image_area == 32 * 32
    with pytest.raises(ValueError, match="size:.*budget"):  # over budget: refused, the folder left as it was
        package(good, os.path.join(good, "vision_tokenizer"), small["out"], max_mb=small["mb"] * 1.5)
    assert evaluate.Evaluator(small["out"]).image_area == 64 * 64


def test_tokenizer_eval_splits_vizdoom_by_world(tmp_path):
    """train.sim.tokenizer_eval: frames evenly spaced over every episode, and ViZDoom's bundled scenarios
    reported apart from the wad maps (generate's worlds.json)."""
    import numpy as np
    from PIL import Image

    from model.vision_tokenizer import IBQ, ibq_preset
    from train.sim import tokenizer_eval

    rng = np.random.default_rng(0)
    folder = tmp_path / "doom-heldout"
    worlds = {"ep0": "basic", "ep1": "freedoom2.wad:MAP01", "ep2": "freedoom2.wad:MAP02"}
    for ep in worlds:
        (folder / "frames" / ep).mkdir(parents=True)
        for k in range(4):
            frame = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
            Image.fromarray(frame).save(folder / "frames" / ep / f"{k:03d}.png")
        Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(folder / "frames" / ep / "x000.png")  # not a keyframe
    (folder / "worlds.json").write_text(json.dumps(worlds))
    ibq = IBQ(ibq_preset("debug")).eval()
    out = tokenizer_eval.evaluate(ibq, str(tmp_path), panda_episodes=1, max_frames=6)
    doom = out["doom-heldout"]
    assert doom["frames"] == 6 and set(doom["per_world"]) == set(worlds.values())  # every episode sampled
    assert doom["scenarios_psnr"] == doom["per_world"]["basic"]
    assert min(doom["per_world"]["freedoom2.wad:MAP01"], doom["per_world"]["freedoom2.wad:MAP02"]) <= doom["maps_psnr"]
    assert {"psnr", "object_psnr"} <= set(out["panda-heldout"]) and 0 < out["codebook_use"] <= 1


def test_tokenizer_eval_next_frame_ceiling(tmp_path):
    """--areas: per ViZDoom folder, the explore evaluation's next-frame figures at the world model's image
    area, over consecutive keyframes. A still episode: copying the last frame is exact, and the last
    frame's codes are the next frame's, so prev_tokens = tokenizer."""
    import numpy as np
    from PIL import Image

    from model.vision_tokenizer import IBQ, ibq_preset
    from train.sim import tokenizer_eval

    frame = np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    for ep in ("ep0", "ep1"):
        (tmp_path / "doom-heldout" / "frames" / ep).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(frame).save(tmp_path / "doom-heldout" / "frames" / ep / f"{k:03d}.png")
    ibq = IBQ(ibq_preset("debug")).eval()
    out = tokenizer_eval.evaluate(ibq, str(tmp_path), panda_episodes=1, areas=(32 * 48, 64 * 96))
    nf = out["doom-heldout"]["next_frame"]
    assert set(nf) == {"1536", "6144"}
    for figures in nf.values():
        assert figures["pairs"] == 6 and figures["baseline_psnr"] == 100.0
        assert figures["prev_tokens_psnr"] == figures["tokenizer_psnr"] < 100
        assert figures["ceiling_margin"] == round(figures["tokenizer_psnr"] - 100.0, 2)
    with pytest.raises(ValueError, match="area"):
        tokenizer_eval.evaluate(ibq, str(tmp_path), panda_episodes=1, areas=(100,))


def test_package_tokenizer_alone(tmp_path):
    """train.sim.package --vision-tokenizer alone: the tokenizer in fp16, encoding as the fp32 original
    rounded to fp16 does; the budget counts the other assets, and a refusal writes nothing."""
    import torch
    from safetensors import safe_open

    from model.vision_tokenizer import IBQ, ibq_preset, load_ibq, save_ibq
    from train.sim.package import main, package_tokenizer

    torch.manual_seed(0)
    src, assets = tmp_path / "ibq", tmp_path / "assets"
    ibq = IBQ(ibq_preset("debug")).eval()
    save_ibq(ibq, str(src))
    (assets / "demo").mkdir(parents=True)
    (assets / "demo" / "weights.bin").write_bytes(b"0" * 2 ** 20)
    out = package_tokenizer(str(src), str(assets / "ibq_f4"))
    assert out["assets_mb"] == pytest.approx(out["mb"] + 1.0, abs=0.01)
    with safe_open(str(assets / "ibq_f4" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    half = IBQ(ibq.config).eval()
    half.load_state_dict({k: v.half().float() for k, v in ibq.state_dict().items()})
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(load_ibq(str(assets / "ibq_f4")).encode(x), half.encode(x))
    with pytest.raises(ValueError, match="size:.*budget"):
        package_tokenizer(str(src), str(assets / "other"), max_mb=out["assets_mb"] + 0.1)
    assert not (assets / "other").exists()
    with pytest.raises(SystemExit):
        main(["--out", str(assets / "x")])  # neither a model, a tokenizer nor a video decoder
