"""`torchrun --nproc_per_node 2` + FSDP2 (gloo, CPU) gives the same pretraining losses as one process at
the same global batch.

Tolerance: relative 1e-4 on the loss and the gradient norm. The two runs do the same arithmetic except
the order of floating-point reductions (gradients are reduce-scattered across 2 ranks and the loss sums
are all-reduced), which moves fp32 results by ~1e-7 relative per step; 1e-4 leaves room for that drift
over 3 steps of AdamW while a wrong loss scaling (e.g. averaging twice, off by 2x) or a data split error
(each rank seeing the whole batch) is off by far more. About 20-40 s on 2 cores, so it runs by default.
"""

import json
import os
import subprocess
import sys

import pytest

from test_train_lm import _shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(launcher, out, data, tok, steps=3, extra=()):
    args = [*launcher, "-m", "train.pretrain", "--recipe", "debug_cpu", "--data", data, "--tokenizer", tok,
            "--out", out, "--steps", str(steps), "--set", "seq_len=128", "batch_size=4", "warmup_steps=2",
            "save_every=3", "progress=false", 'model_overrides={"dropout": 0.0}', *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_two_process_fsdp2_matches_one_process(tmp_path, bpe):
    data = _shards(tmp_path)
    bpe.save(str(tmp_path / "tok"))
    tok = str(tmp_path / "tok")
    one = _run([sys.executable], str(tmp_path / "one"), data, tok)
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
               str(tmp_path / "two"), data, tok)
    assert [e["step"] for e in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["tokens"] == a["tokens"]  # the two ranks together saw exactly the global batch
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert two[-1]["loss"] < two[0]["loss"]
    # a checkpoint written by 2 processes resumes in 1 and continues the 1-process curve
    one6 = _run([sys.executable], str(tmp_path / "one6"), data, tok, steps=6)
    resumed = _run([sys.executable], str(tmp_path / "two"), data, tok, steps=6)
    for a, b in zip(one6[3:], resumed[3:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def _ibq_one_and_two(tmp_path, flags):
    """2 steps of train.tokenizer_ibq on tmp_path/img with `flags`, in one process (out: tmp_path/one) and
    under torchrun with two (tmp_path/two): the log entries of each."""
    def run(launcher, out):
        args = [*launcher, "-m", "train.tokenizer_ibq", "--images", str(tmp_path / "img"), "--out", out,
                "--steps", "2", *flags]
        r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]

    return (run([sys.executable], str(tmp_path / "one")),
            run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                str(tmp_path / "two")))


def test_two_process_ibq_tokenizer_trains_and_matches_at_step_one(tmp_path):
    """The IBQ trainer under torchrun (FSDP2, gloo): at step 1 (same weights, same global batch) every
    per-image loss equals the 1-process value; the entropy loss is a batch-level statistic (codebook
    usage over each process's share), so it and later steps legitimately differ."""
    from PIL import Image
    import numpy as np

    from model.vision_tokenizer import load_ibq
    from train import common

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for i in range(4):
        a = np.full((64, 80, 3), rng.integers(0, 255, 3), np.uint8)
        Image.fromarray(a).save(tmp_path / "img" / f"{i}.png")

    one, two = _ibq_one_and_two(tmp_path, ["--set", "batch_size=4", "disc_start=0", "save_every=2", "progress=false"])
    for k in ("loss_rec", "loss_quant", "loss_perceptual", "loss_g_adv", "loss_disc"):
        assert two[0][k] == pytest.approx(one[0][k], rel=1e-4), k
    assert all(np.isfinite(e["loss"]) for e in two)
    ibq = load_ibq(common.latest_checkpoint(str(tmp_path / "two")))
    assert ibq.config.codebook_size == 256


def test_two_process_ibq_decoder_only_keeps_the_frozen_parts(tmp_path):
    """Decoder-only fine-tuning under torchrun (FSDP2, gloo): the frozen encoder, codebook and patch-in path
    come out bit-identical, the decoder learns, and step 1 equals the 1-process run (no entropy loss, so
    every loss is a per-image mean)."""
    import torch
    from PIL import Image
    import numpy as np

    from model.vision_tokenizer import IBQ, ibq_preset, load_ibq, save_ibq
    from train import common

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for i in range(4):
        a = rng.integers(0, 255, (64, 80, 3)).astype(np.uint8)
        Image.fromarray(a).save(tmp_path / "img" / f"{i}.png")
    torch.manual_seed(0)
    save_ibq(IBQ(ibq_preset("debug")), str(tmp_path / "start"))

    one, two = _ibq_one_and_two(tmp_path, ["--init-from", str(tmp_path / "start"), "--set", "batch_size=4",
                                           "disc_weight=0.0", "entropy_weight=0.0", "quantizer=cosine",
                                           "decoder_only=true", "save_every=2", "progress=false"])
    for k in ("loss", "loss_rec", "loss_perceptual"):
        assert two[0][k] == pytest.approx(one[0][k], rel=1e-4), k
    sb = load_ibq(str(tmp_path / "start")).state_dict()
    sa = load_ibq(common.latest_checkpoint(str(tmp_path / "two"))).state_dict()
    frozen = ("encoder.", "quant_conv.", "quantize.")
    assert all(torch.equal(sb[k], sa[k]) for k in sb if k.startswith(frozen))
    assert any(not torch.equal(sb[k], sa[k]) for k in sb if k.startswith(("decoder.", "post_quant_conv.")))
