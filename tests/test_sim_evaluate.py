"""train.evaluate on a tiny random checkpoint: every task's keys, and clear errors on bad inputs."""

import dataclasses
import json
import os

import pytest

pytest.importorskip("vizdoom")
pytest.importorskip("pybullet")
pytest.importorskip("crafter")

from train import evaluate  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from model.checkpoint import save_pretrained
    from model.config import preset
    from model.text_tokenizer import BPETokenizer, builtin_corpus
    from model.transformer import Transformer
    from model.vision_tokenizer import IBQ, ibq_preset, save_ibq

    root = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    cfg = preset("debug")
    tok = BPETokenizer.train(builtin_corpus(), cfg.num_text_tokens, cfg.codebook_size)
    model = Transformer(cfg).eval()
    model.vocab, model.tokenizer = tok.vocab, tok
    good, bad = root / "good", root / "bad"
    for d, codebook in ((good, cfg.codebook_size), (bad, cfg.codebook_size // 2)):
        save_pretrained(model, str(d))
        save_ibq(IBQ(dataclasses.replace(ibq_preset("debug"), codebook_size=codebook)), str(d / "vision_tokenizer"))
    return {"good": str(good), "bad": str(bad)}


def _run(capsys, argv):
    rc = evaluate.main(argv + ["--json", "--threads", "1"])
    out = capsys.readouterr()
    return rc, json.loads(out.out.strip().splitlines()[-1]) if out.out.strip() else None, out.err


def test_explore_keys(tiny, capsys):
    rc, out, err = _run(capsys, ["--task", "explore", "--checkpoint", tiny["good"], "--scenario", "basic",
                                 "--episodes", "1", "--steps", "1", "--rollout", "1"])
    assert rc == 0, err
    for k in ("model_psnr", "baseline_psnr", "prev_tokens_psnr", "tokenizer_psnr", "shuffled_instruction_psnr",
              "per_action", "rollout_psnr", "rollout_baseline_psnr"):
        assert k in out, k
    (action, figures), = out["per_action"].items()
    assert set(figures) >= {"model_psnr", "baseline_psnr", "prev_tokens_psnr"}
    assert out["baseline_psnr"] > out["model_psnr"]  # random weights must not look like a world model


def test_manipulate_keys_with_dida(tiny, capsys):
    rc, out, err = _run(capsys, ["--task", "manipulate", "--checkpoint", tiny["good"], "--episodes", "1",
                                 "--sampler", "dida", "--dida-steps", "2"])
    assert rc == 0, err
    for k in ("model_psnr", "baseline_psnr", "model_object_psnr", "baseline_object_psnr", "subtask_exact_match"):
        assert k in out, k
    assert out["num_subtasks"] == 3 and out["subtask_exact_match"] == 0.0


@pytest.mark.slow
def test_guide_and_story_keys(tiny, capsys):
    rc, out, err = _run(capsys, ["--task", "guide", "--checkpoint", tiny["good"], "--episodes", "1",
                                 "--sampler", "dida", "--dida-steps", "2"])
    assert rc == 0, err
    assert 0.0 <= out["valid_fraction"] <= 1.0
    rc, out, err = _run(capsys, ["--task", "story", "--checkpoint", tiny["good"], "--episodes", "1",
                                 "--sampler", "dida", "--dida-steps", "2"])
    assert rc == 0, err
    assert {"event_recall", "beat_precision", "agreement"} <= set(out)


@pytest.mark.parametrize("extra, message", [
    (["--scenario", "/nope/unknown.cfg"], "scenario: /nope/unknown.cfg is not a file"),
    (["--scenario", "not_bundled"], "unknown 'not_bundled'"),
    (["--wad", "freedoom2.wad", "--map", "E1M1"], "has no map 'E1M1'"),
    (["--episodes", "0"], "episodes: must be a positive integer"),
])
def test_bad_inputs(tiny, capsys, extra, message):
    rc, out, err = _run(capsys, ["--task", "explore", "--checkpoint", tiny["good"]] + extra)
    assert rc == 2 and message in err and message in out["error"]


def test_tokenizer_mismatch(tiny, capsys):
    rc, out, err = _run(capsys, ["--task", "explore", "--checkpoint", tiny["bad"], "--episodes", "1"])
    assert rc == 2 and "codebook_size" in err and "does not match" in err


def test_missing_checkpoint(tmp_path, capsys):
    rc, out, err = _run(capsys, ["--task", "guide", "--checkpoint", str(tmp_path / "none")])
    assert rc == 2 and "is not a folder" in err


def test_packaged_checkpoint_loads_in_fp32_at_its_training_image_size(tiny, tmp_path):
    """train.sim.package writes fp16 weights and the training image area; the engine's Runtime computes
    in fp32 on a CPU and defaults to that area's grid (a 96x96-pixel area with the debug IBQ's f16 ->
    6x6 tokens)."""
    import torch

    from train.sim.package import package
    from worldsim.runtime import Runtime

    out = package(tiny["good"], os.path.join(tiny["good"], "vision_tokenizer"), str(tmp_path / "demo"),
                  image_area=96 * 96)
    assert out["mb"] < 80
    rt = Runtime.load(out["out"])
    assert next(rt.model.parameters()).dtype == torch.float32
    assert rt.default_image_size(1024 * 1024) == (6, 6) and rt.default_image_size(32 * 32) == (2, 2)
    assert rt.max_image_side() >= 6
