"""Pretraining and SFT trainers on the debug preset: finite loss, overfitting one batch, checkpoints that
reload exactly, resuming that continues the same curve, and vocabulary mismatches."""

import dataclasses
import json
import os

import pytest
import torch

from train import common, pretrain, sft
from train.data import format as fmt


def _shards(path, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["Turn left.", "Walk to the door.", "The camera pans right.", "Place it on the plate."]
    recs = []
    for i in range(n):
        h, w = (int(x) for x in torch.randint(2, 5, (2,), generator=g))
        codes = torch.randint(0, 256, (h, w), generator=g).tolist()
        recs.append(fmt.record(["explore", "story", "howto"][i % 3],
                               [fmt.text(words[i % 4]), fmt.image_codes(codes), fmt.text(words[(i + 1) % 4])],
                               question=f"Once upon a time {i}"))
    fmt.write_shard(str(path / "data" / "a.jsonl"), recs[: n // 2], codebook_size=256)
    fmt.write_shard(str(path / "data" / "b.jsonl"), recs[n // 2:], codebook_size=256)
    return str(path / "data")


@pytest.fixture
def setup(tmp_path, bpe):
    bpe.save(str(tmp_path / "tok"))
    return {"data": (_shards(tmp_path),), "tokenizer": str(tmp_path / "tok"), "root": tmp_path}


def _cfg(setup, name, recipe=pretrain.debug_cpu, **kw):
    base = dict(out_dir=str(setup["root"] / name), data=setup["data"], tokenizer=setup["tokenizer"], seq_len=128,
                batch_size=4, steps=3, warmup_steps=2, save_every=3, progress=False)
    base.update(kw)
    return dataclasses.replace(recipe(), **base)


def test_pretrain_three_steps_finite_and_logged(setup):
    entries = pretrain.main(_cfg(setup, "p3"))
    assert [e["step"] for e in entries] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in entries)
    assert entries[0]["loss"] == pytest.approx(torch.log(torch.tensor(979.0)).item(), abs=0.5)  # ~uniform at init
    log = [json.loads(line) for line in open(setup["root"] / "p3" / "log.jsonl")]
    assert [e["step"] for e in log] == [1, 2, 3] and "loss_visual" in log[0] and "tokens_per_s" in log[0]
    assert os.path.getsize(setup["root"] / "p3" / "loss.png") > 1000
    ckpt = common.latest_checkpoint(str(setup["root"] / "p3"))
    assert ckpt.endswith("step_000003")
    saved = json.load(open(os.path.join(ckpt, common.CONFIG_FILE)))
    assert saved["config_type"] == "LMConfig" and saved["steps"] == 3 and saved["mode"] == "pretrain"


@pytest.mark.parametrize("main, recipe", [(pretrain.main, pretrain.debug_cpu), (sft.main, sft.debug_cpu)])
def test_overfits_one_batch(setup, main, recipe):
    cfg = _cfg(setup, f"fit-{recipe.__module__}", recipe, steps=40, lr=3e-3, min_lr=3e-3, warmup_steps=0,
               save_every=0, repeat_first_batch=True, model_overrides={"dropout": 0.0})
    losses = [e["loss"] for e in main(cfg)]
    assert losses[-1] < 0.35 * losses[0], losses


def test_checkpoint_reloads_the_trained_weights(setup, bpe):
    """The step-4 loss of a run (computed with the weights after step 3) equals the loss that
    load_pretrained(step-3 checkpoint) gives on the same batch."""
    from model.checkpoint import load_pretrained
    from train.lm import make_mask, make_stream

    cfg = _cfg(setup, "reload", steps=4, model_overrides={"dropout": 0.0})
    entries = pretrain.main(cfg)
    model = load_pretrained(common.checkpoint_dir(cfg.out_dir, 3))
    assert model.tokenizer is not None and model.config.num_text_tokens == 512
    batch = next(make_stream(cfg, bpe, model.config).batches(cfg.batch_size, skip=3))
    with torch.no_grad():
        logits = model(batch.ids, positions=batch.positions, mask=make_mask(batch.doc_ids, "dense"))
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               batch.ids[:, 1:].reshape(-1), reduction="none")
        w = batch.weights[:, 1:].reshape(-1)
        loss = float((ce * w).sum() / w.sum())
    assert loss == pytest.approx(entries[3]["loss"], rel=1e-5)


@pytest.mark.parametrize("main, recipe", [(pretrain.main, pretrain.debug_cpu), (sft.main, sft.debug_cpu)])
def test_resume_continues_the_same_curve(setup, main, recipe):
    """A run interrupted after its step-3 checkpoint and resumed gives the losses of the uninterrupted run
    (dropout on: the RNG state travels with the checkpoint; the data position follows from the step)."""
    cfg = _cfg(setup, f"resume-{recipe.__module__}", recipe, steps=6, save_every=3)
    full = main(cfg)
    # simulate a crash after step 3's checkpoint: drop step 6 and point `latest` back
    ckpts = os.path.join(cfg.out_dir, common.CKPT_DIR)
    import shutil

    shutil.rmtree(os.path.join(ckpts, "step_000006"))
    open(os.path.join(ckpts, common.LATEST), "w").write("step_000003")
    resumed = main(common.load_config(type(cfg), cfg.out_dir))  # the config the checkpoint carries
    assert [e["step"] for e in resumed] == [4, 5, 6]
    for a, b in zip(full[3:], resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
    log = [json.loads(line)["step"] for line in open(os.path.join(cfg.out_dir, "log.jsonl"))]
    assert log == [1, 2, 3, 4, 5, 6]  # the crashed run's later entries were replaced, not duplicated


def test_sft_loss_is_on_answers_only(setup, bpe):
    from train.lm import make_stream
    from model.config import preset

    cfg = _cfg(setup, "sftw", sft.debug_cpu)
    batch = next(make_stream(cfg, bpe, preset("debug")).batches(4))
    v = bpe.vocab
    for i in range(batch.ids.shape[0]):
        ids, w = batch.ids[i].tolist(), batch.weights[i].tolist()
        inside = False
        for t, wt in zip(ids, w):
            if t == v.answer_start:
                inside = True
                assert wt == 0
                continue
            assert (wt == 1.0) == inside, (t, wt)
            if t == v.eos:
                inside = False


def test_tokenizer_with_another_vocabulary_is_rejected(setup, tmp_path):
    from model.text_tokenizer import BPETokenizer, builtin_corpus

    BPETokenizer.train(builtin_corpus(), 400, 256).save(str(tmp_path / "small"))
    with pytest.raises(ValueError, match="has 400 text tokens but the model's num_text_tokens is 512"):
        pretrain.main(_cfg(setup, "bad", tokenizer=str(tmp_path / "small")))
    with pytest.raises(ValueError, match="num_text_tokens"):
        pretrain.main(_cfg(setup, "bad2", model="demo"))  # the 512-id debug BPE against demo's 4096


def test_shards_from_another_codebook_are_rejected(setup, tmp_path):
    fmt.write_shard(str(tmp_path / "big" / "x.jsonl"), [fmt.record("t2i", [fmt.image_codes([[1]])], "q")],
                    codebook_size=2048)
    with pytest.raises(ValueError, match=r"x.jsonl holds codes of a 2048-code IBQ"):
        pretrain.main(_cfg(setup, "bad3", data=(str(tmp_path / "big"),)))


def test_missing_data_and_bad_mode_are_clear(setup):
    with pytest.raises(ValueError, match="nope not found"):
        pretrain.main(_cfg(setup, "m", data=(str(setup["root"] / "nope"),)))
    with pytest.raises(ValueError, match="mode"):
        pretrain.main(_cfg(setup, "m2", sft.debug_cpu))


def test_cosine_schedule_shape():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    lrs = [common.cosine_lr(s, **kw) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55) and common.cosine_lr(110, **kw) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_bf16_autocast_and_flex_mask_paths(setup):
    """The bf16 autocast path (what a GPU run uses) and the FlexAttention BlockMask path both train, and agree
    with the fp32 dense path: exactly for flex (on CPU its backward runs on the same mask_mod densely),
    within bf16 rounding for autocast."""
    kw = dict(steps=2, save_every=0, model_overrides={"dropout": 0.0})
    ref = [e["loss"] for e in pretrain.main(_cfg(setup, "ref", **kw))]
    flex = [e["loss"] for e in pretrain.main(_cfg(setup, "flex", attention="flex", **kw))]
    bf16 = [e["loss"] for e in pretrain.main(_cfg(setup, "bf16", precision="bf16", **kw))]
    assert flex == pytest.approx(ref, rel=1e-5)
    assert bf16 == pytest.approx(ref, rel=2e-2)


def test_cuda_request_without_cuda_is_clear(setup):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        pretrain.main(_cfg(setup, "cuda", device="cuda"))


def test_cli_resume_reads_the_checkpoint_config(setup):
    from train.lm import cli

    cfg = _cfg(setup, "cli", steps=3)
    pretrain.main(cfg)
    back = cli(["--resume", cfg.out_dir, "--steps", "9", "--set", "lr=0.002"], default_recipe="debug_cpu",
               recipes=pretrain.RECIPES, description="")
    assert back == dataclasses.replace(cfg, steps=9, lr=0.002)
    fresh = cli(["--recipe", "demo_cpu", "--data", "x", "--set", "seq_len=64", "betas=[0.8, 0.9]"],
                default_recipe="debug_cpu", recipes=pretrain.RECIPES, description="")
    assert fresh.model == "demo" and fresh.data == ("x",) and fresh.seq_len == 64 and fresh.betas == (0.8, 0.9)


def test_raw_image_shards_are_tokenized_at_training_time(setup, tmp_path):
    """Shards that keep image paths (from_episodes --raw-images) train through the IBQ given as
    vision_tokenizer (here: none, so the debug preset with random weights)."""
    import numpy as np
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((48, 64, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    recs = [fmt.record("x2i", [fmt.image_path(f"{(i + 1) % 3}.png")], "make it brighter",
                       [fmt.image_path(f"{i}.png")]) for i in range(3)]
    fmt.write_shard(str(tmp_path / "raw.jsonl"), recs, codebook_size=None)
    entries = sft.main(_cfg(setup, "raw", sft.debug_cpu, data=(str(tmp_path / "raw.jsonl"),), image_area=32 * 48,
                            steps=2, save_every=0))
    assert all(np.isfinite(e["loss"]) for e in entries) and entries[0]["loss_visual"] > 0


def test_scheduled_sampling_swaps_only_trained_codes_for_the_models_argmax(bpe):
    """_own_codes: with share 1 every loss-bearing visual input becomes the model's argmax (its prediction
    at the position before), text, weight-0 codes and anything after the clean T tokens stay; share 0
    changes nothing."""
    from train.lm import _own_codes

    v = bpe.vocab
    lo = v.visual_start
    ids = torch.tensor([[v.bos, 5, v.img, lo + 1, lo + 2, lo + 3, 7, v.eos, lo + 4]])  # last: a DiDA copy slot
    T = 8
    target = ids[:, 1:T]
    w = torch.tensor([[0., 0., 0., 1., 1., 1., 1.]])  # the first code (index 3) is a prompt code: weight 0

    class Always9:  # predicts visual code 9 everywhere
        def __call__(self, inputs, mask=None, positions=None, score=None, vocab_range=None):
            logits = torch.zeros(*inputs.shape, v.size)
            logits[..., lo + 9] = 1.0
            return logits[:, score, vocab_range[0]:vocab_range[1]]

    out, changed = _own_codes(Always9(), ids, None, None, target, w, 1.0, v)
    assert out.tolist() == [[v.bos, 5, v.img, lo + 1, lo + 9, lo + 9, 7, v.eos, lo + 4]] and changed == 2
    same, changed = _own_codes(Always9(), ids, None, None, target, w, 0.0, v)
    assert torch.equal(same, ids) and changed == 0


def test_scheduled_sampling_trains_and_logs_its_share(setup):
    entries = sft.main(_cfg(setup, "ss", sft.debug_cpu, scheduled_sampling=0.5))
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in entries)
    assert all(0 < e["own_codes"] <= 0.6 for e in entries)  # about half the codes, nearly all wrong at init
    with pytest.raises(ValueError, match="scheduled_sampling"):
        sft.main(_cfg(setup, "ss-bad", sft.debug_cpu, scheduled_sampling=1.5))
