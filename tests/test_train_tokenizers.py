"""IBQ tokenizer trainer and text BPE trainer on the debug presets."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

from train import common, text_bpe, tokenizer_ibq
from train.ibq_losses import entropy_loss, structure_loss


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        a = np.zeros((72, 88, 3), np.uint8)
        a[:] = rng.integers(0, 255, 3)
        y, x = rng.integers(0, 40, 2)
        a[y:y + 30, x:x + 40] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(root / f"{i}.png")
    return str(root)


def _cfg(tmp_path, images, name, **kw):
    base = dict(out_dir=str(tmp_path / name), images=(images,), batch_size=4, steps=3, warmup_steps=1,
                save_every=3, disc_start=1, progress=False)
    base.update(kw)
    return dataclasses.replace(tokenizer_ibq.debug_cpu(), **base)


def test_ibq_three_steps_all_losses_finite(tmp_path, images):
    entries = tokenizer_ibq.main(_cfg(tmp_path, images, "a"))
    assert [e["step"] for e in entries] == [1, 2, 3]
    for e in entries:
        for k in ("loss", "loss_rec", "loss_quant", "loss_perceptual", "loss_entropy", "loss_disc"):
            assert np.isfinite(e[k]), (k, e)
    assert "loss_g_adv" not in entries[0] and "loss_g_adv" in entries[1]  # the GAN switches on after disc_start
    assert os.path.getsize(tmp_path / "a" / "loss.png") > 1000


def test_ibq_overfits_one_batch(tmp_path, images):
    """30 steps on one batch: the training loss halves; the L1 reconstruction error alone falls more slowly
    (the 4x4-code bottleneck of the debug preset, from random init) but steadily."""
    cfg = _cfg(tmp_path, images, "fit", steps=30, batch_size=2, lr=2e-3, min_lr=2e-3, warmup_steps=0,
               save_every=0, disc_start=1000, repeat_first_batch=True)
    entries = tokenizer_ibq.main(cfg)
    rec, total = [e["loss_rec"] for e in entries], [e["loss"] for e in entries]
    assert total[-1] < 0.5 * total[0], total
    assert rec[-1] < 0.85 * rec[0] and max(rec[-5:]) < min(rec[:5]), rec


def test_ibq_cosine_quantizer_trains_the_same_rule_inference_uses(tmp_path, images):
    """The cosine quantizer: rows stay unit-length, unused rows are re-seeded at each restart, the loss
    falls on a repeated batch, and the saved tokenizer's encode -> decode equals the training forward."""
    from model.vision_tokenizer import load_ibq

    cfg = _cfg(tmp_path, images, "cos", steps=30, batch_size=2, lr=2e-3, min_lr=2e-3, warmup_steps=0,
               save_every=30, disc_weight=0.0, entropy_weight=0.0, quantizer="cosine", restart_every=10,
               repeat_first_batch=True)
    entries = tokenizer_ibq.main(cfg)
    assert entries[9]["restarted"] > 0  # most of the 512 debug codes are unused after 10 steps
    assert entries[-1]["loss"] < 0.7 * entries[0]["loss"]
    ibq = load_ibq(common.latest_checkpoint(cfg.out_dir))
    norms = ibq.quantize.embedding.weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    x = tokenizer_ibq.batch_for_step(tokenizer_ibq.image_files([images]), 1, cfg, __import__(
        "train.distributed", fromlist=["DistInfo"]).DistInfo())
    with torch.no_grad():
        recon, _, _, codes, _ = tokenizer_ibq.TrainForward(ibq, 0.01, "cosine")(x)
    assert torch.equal(ibq.encode(x), codes)
    assert torch.allclose(ibq.decode(codes), recon.clamp(-1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="quantizer"):
        tokenizer_ibq.main(dataclasses.replace(cfg, quantizer="nearest", out_dir=str(tmp_path / "bad")))


def test_ibq_decoder_only_keeps_every_code_and_improves_the_pixels(tmp_path, images):
    """Fine-tuning the decoder of a trained tokenizer: encoder, codebook and patch-in path are bit-identical
    afterwards, so every image keeps its codes (a world model on them stays valid), while the decoder
    changes and the reconstruction of a repeated batch improves. Without a tokenizer to start from it is
    refused by name."""
    from model.vision_tokenizer import load_ibq

    base = _cfg(tmp_path, images, "base", steps=10, batch_size=2, lr=2e-3, min_lr=2e-3, warmup_steps=0,
                save_every=10, disc_weight=0.0, entropy_weight=0.0, quantizer="cosine", restart_every=5)
    tokenizer_ibq.main(base)
    start = common.latest_checkpoint(base.out_dir)
    cfg = _cfg(tmp_path, images, "dec", steps=40, batch_size=2, lr=1e-3, min_lr=1e-3, warmup_steps=0,
               save_every=40, disc_weight=0.0, entropy_weight=0.0, quantizer="cosine", init_from=start,
               decoder_only=True, repeat_first_batch=True)
    entries = tokenizer_ibq.main(cfg)
    rec = [e["loss_rec"] for e in entries]
    assert np.mean(rec[-5:]) < 0.93 * np.mean(rec[:5]), rec  # CI: 0.490 against 0.561
    assert all(e["loss_quant"] == 0 and "restarted" not in e for e in entries)
    before, after = load_ibq(start), load_ibq(common.latest_checkpoint(cfg.out_dir))
    sb, sa = before.state_dict(), after.state_dict()
    frozen = ("encoder.", "quant_conv.", "quantize.")
    assert all(torch.equal(sb[k], sa[k]) for k in sb if k.startswith(frozen))
    assert any(not torch.equal(sb[k], sa[k]) for k in sb if k.startswith(("decoder.", "post_quant_conv.")))
    x = torch.stack([tokenizer_ibq.load_crop(f, 64, torch.Generator().manual_seed(i))
                     for i, f in enumerate(tokenizer_ibq.image_files([images]))])
    assert torch.equal(before.encode(x), after.encode(x))
    with pytest.raises(ValueError, match="decoder_only"):
        tokenizer_ibq.main(dataclasses.replace(cfg, init_from=None, out_dir=str(tmp_path / "bad")))


def test_ibq_checkpoint_reloads_and_resume_continues(tmp_path, images):
    from model.vision_tokenizer import load_ibq

    cfg = _cfg(tmp_path, images, "r", steps=6, save_every=3)
    full = tokenizer_ibq.main(cfg)
    ckpts = os.path.join(cfg.out_dir, common.CKPT_DIR)
    shutil.rmtree(os.path.join(ckpts, "step_000006"))
    open(os.path.join(ckpts, common.LATEST), "w").write("step_000003")
    resumed = tokenizer_ibq.main(common.load_config(tokenizer_ibq.IBQTrainConfig, cfg.out_dir))
    assert [e["step"] for e in resumed] == [4, 5, 6]
    for a, b in zip(full[3:], resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["loss_disc"] == pytest.approx(a["loss_disc"], rel=1e-5)
    ibq = load_ibq(common.latest_checkpoint(cfg.out_dir))
    x = tokenizer_ibq.batch_for_step(tokenizer_ibq.image_files([images]), 1, cfg, __import__(
        "train.distributed", fromlist=["DistInfo"]).DistInfo())
    codes = ibq.encode(x)
    assert codes.shape == (4, 4, 4) and int(codes.max()) < 256


def test_structure_loss_prefers_sharp_to_blurred():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    noisy = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert structure_loss(x, x).abs() < 1e-5
    assert structure_loss(noisy, x) < structure_loss(blurred, x)


def test_entropy_loss_rewards_confident_and_diverse_codes():
    N = 16
    confident_diverse = torch.eye(N)[None, None] * 100  # (1, 1, N, N): each position its own code
    confident_collapsed = torch.zeros(1, 1, N, N)
    confident_collapsed[..., 0] = 100
    uniform = torch.zeros(1, 1, N, N)
    values = [float(entropy_loss(t, temperature=1.0)) for t in (confident_diverse, confident_collapsed, uniform)]
    assert values[0] == pytest.approx(-np.log(N), abs=1e-4)
    assert values[1] == pytest.approx(0.0, abs=1e-4) and values[2] == pytest.approx(0.0, abs=1e-4)


def test_missing_images_is_clear(tmp_path):
    with pytest.raises(ValueError, match="nothing-here not found"):
        tokenizer_ibq.main(_cfg(tmp_path, str(tmp_path / "nothing-here"), "x"))


def test_text_bpe_trains_reloads_and_fits_the_pretrainer(tmp_path, capsys):
    from train.data import format as fmt
    from train.lm import load_text_tokenizer

    fmt.write_shard(str(tmp_path / "d" / "s.jsonl"),
                    [fmt.record("story", [fmt.text("The lantern glowed in the forest.")], "a fox")], codebook_size=None)
    summary = text_bpe.main(dataclasses.replace(text_bpe.debug(), out_dir=str(tmp_path / "tok"),
                                                shards=(str(tmp_path / "d"),)))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert summary["num_text_tokens"] == 512 and summary["bytes_per_token"] > 1.5
    tok = load_text_tokenizer(str(tmp_path / "tok"), 512, 256)
    assert tok.vocab.digit_ids == tuple(range(15, 25)) and tok.vocab.star_id == 9  # SPEC §2
    text = "Once upon a time a fox found a lantern. 64*64"
    assert tok.decode(tok.encode(text)) == text
    again = text_bpe.main(dataclasses.replace(text_bpe.debug(), out_dir=str(tmp_path / "tok2"),
                                              shards=(str(tmp_path / "d"),)))
    assert open(tmp_path / "tok" / "tokenizer.json").read() == open(tmp_path / "tok2" / "tokenizer.json").read()
    assert again["bytes_per_token"] == summary["bytes_per_token"]


def test_text_bpe_too_small_corpus_is_clear(tmp_path):
    with pytest.raises(ValueError, match="yields only .* tokens, not 4096"):
        text_bpe.main(dataclasses.replace(text_bpe.demo(), out_dir=str(tmp_path / "t")))
