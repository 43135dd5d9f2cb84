"""DiDA adaptation (train/dida.py): noisy copies at the right positions, the loss falls when
overfitting one batch, and the adapted checkpoint says so (the engine then decodes with DiDA)."""

import dataclasses

import pytest
import torch

from model.dida import add_noisy_copies, mask_id
from test_train_lm import _shards  # the trainers' tiny shards
from train import common, dida


@pytest.fixture
def setup(tmp_path, bpe):
    bpe.save(str(tmp_path / "tok"))
    return {"data": (_shards(tmp_path),), "tokenizer": str(tmp_path / "tok"), "root": tmp_path}


def _cfg(setup, name, **kw):
    base = dict(out_dir=str(setup["root"] / name), data=setup["data"], tokenizer=setup["tokenizer"], seq_len=128,
                batch_size=4, steps=3, warmup_steps=2, save_every=3, progress=False)
    base.update(kw)
    return dataclasses.replace(dida.debug_cpu(), **base)


def test_noisy_copy_layout(bpe):
    v = bpe.vocab
    doc = [v.bos, 5, 6, *v.image_ids([[1, 2], [3, 4]]), 7, *v.image_ids([[9]]), v.eos]
    ids = torch.tensor([doc])
    pos = torch.arange(len(doc))[None]
    ext = add_noisy_copies(ids, pos, torch.ones_like(ids), v, torch.Generator().manual_seed(0))
    T = len(doc)
    img1 = doc.index(v.img)  # the first image's IMG; codes follow, EOL after two
    # copies sit at their codes' positions (the EOL slot skipped) and see the prefix up to their IMG
    assert ext["positions"][0, T:T + 5].tolist() == [img1 + 1, img1 + 2, img1 + 4, img1 + 5,
                                                     len(doc) - 3]
    img2 = len(doc) - 4
    assert ext["limit"][0, T:T + 5].tolist() == [img1 + 1] * 4 + [img2 + 1]
    assert ext["noisy_image"][0, T:T + 5].tolist() == [1, 1, 1, 1, 2]
    clean = [v.visual(c) for c in (1, 2, 3, 4, 9)]
    for k in range(5):  # masked -> target is the clean code; kept -> no target, the clean code shown
        if ext["ids"][0, T + k] == mask_id(v):
            assert ext["targets"][0, k] == clean[k]
        else:
            assert ext["ids"][0, T + k] == clean[k] and ext["targets"][0, k] == -100


def test_dida_adaptation_overfits_and_marks_the_checkpoint(setup):
    from model import load_pretrained

    cfg = _cfg(setup, "fit", steps=40, lr=3e-3, min_lr=3e-3, warmup_steps=0, save_every=40,
               repeat_first_batch=True, model_overrides={"dropout": 0.0}, seed=1)
    entries = dida.main(cfg)
    first, last = entries[0], entries[-1]
    assert torch.isfinite(torch.tensor(last["loss_dida"]))
    assert last["loss_dida"] < 0.5 * first["loss_dida"], (first, last)
    model = load_pretrained(common.latest_checkpoint(cfg.out_dir))
    assert model.config.dida_steps == cfg.dida_steps


def test_dida_needs_a_weight(setup):
    with pytest.raises(ValueError, match="dida_weight"):
        dida.main(_cfg(setup, "bad", dida_weight=0.0))
