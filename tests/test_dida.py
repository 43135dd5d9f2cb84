"""DiDA parallel decoding (model/dida.py): schedule, sampler oracles, structure, and the training mask."""

import math

import pytest
import torch

from model.attention import block_from_mask_mod, dense_from_mask_mod
from model.dida import DiDASampler, code_positions, mask_schedule, training_mask_mod
from model.generate import Finished, ImageDone, ImageProgress, generate
from model.sampling import SamplingParams
from test_sampling import bias_toward  # the sampling tests' logit nudge


def test_mask_schedule_is_cosine_and_fixes_at_least_one_per_step():
    n, k = 64, 8
    s = mask_schedule(k, n)
    assert s[-1] == 0 and len(s) == k
    for step in range(k - 1):  # the cosine rule where it already fixes >= 1 per step
        assert s[step] <= math.floor(n * math.cos(math.pi / 2 * (step + 1) / k))
    assert all(a > b for a, b in zip([n] + s, s))  # strictly decreasing: >= 1 fixed per step
    assert mask_schedule(n, n) == list(range(n - 1, -1, -1))  # K = N: exactly one per step
    assert mask_schedule(1, n) == [0]  # K = 1: everything at once


def test_code_positions_skip_eol_slots():
    # a 2x3 grid serialized as c c c EOL c c c: offsets 0 1 2 4 5 6
    assert code_positions(2, 3).tolist() == [0, 1, 2, 4, 5, 6]


def _run(model, bpe, sampler, size=(4, 5), guided=True, seed=0, **kw):
    v = bpe.vocab
    prompt = [v.bos, *bpe.encode("a red cube on a table"), v.answer_start]
    events = list(generate(model, prompt, uncond_ids=[v.bos, v.answer_start] if guided else None,
                           params=SamplingParams(max_new_tokens=200, **kw), image_size=size,
                           start_with_image=True, stop_ids=(v.answer_end,), min_images=1, max_images=1,
                           image_sampler=sampler, generator=torch.Generator().manual_seed(seed)))
    return events


@pytest.mark.parametrize("k", [1, 3, 20])
def test_dida_image_span_is_well_formed_and_uses_k_forwards(debug_model, bpe, k):
    v = bpe.vocab
    sampler = DiDASampler(k)
    events = _run(debug_model, bpe, sampler)
    done = [e for e in events if isinstance(e, ImageDone)]
    fin = events[-1]
    assert isinstance(fin, Finished) and len(done) == 1 and done[0].codes.shape == (4, 5)
    assert fin.token_ids[-1] == v.answer_end  # text carries on after the image: the FSM forced the stop
    assert fin.token_ids[:-1] == v.image_ids(done[0].codes)  # header, codes, EOLs, EOI all placed
    assert sampler.forwards == min(k, 20)  # K steps, or one per code when K exceeds the code count
    progress = [e for e in events if isinstance(e, ImageProgress)]
    assert progress[-1] == ImageProgress(4, 4)


def test_dida_k_equals_n_fixes_one_code_per_step(debug_model, bpe, monkeypatch):
    """With K = N each step fixes exactly one code: the positions scored (the masked ones) fall by one
    per forward."""
    import model.dida as dida

    seen = []
    real = dida._sample_codes

    def spy(scores, params, generator):
        seen.append(scores.shape[0])
        return real(scores, params, generator)

    monkeypatch.setattr(dida, "_sample_codes", spy)
    sampler = DiDASampler(6)
    _run(debug_model, bpe, sampler, size=(2, 3))
    assert sampler.forwards == 6 and seen == [6, 5, 4, 3, 2, 1]


def test_dida_never_remasks_and_ends_with_the_codes_it_fixed(debug_model, bpe, monkeypatch):
    """Read from the block fed to each forward: the masked count strictly decreases, a fixed code keeps
    its value in every later step, and the finished grid is what the steps fixed."""
    from model.dida import mask_id

    v = bpe.vocab
    blocks = []
    real = debug_model.forward

    def spy(ids, **kw):
        if kw.get("score") is not None:  # a DiDA block (the prefill and the span commit have no score)
            blocks.append(ids[0].clone())
        return real(ids, **kw)

    monkeypatch.setattr(debug_model, "forward", spy)
    events = _run(debug_model, bpe, DiDASampler(5), size=(4, 5))
    codes = [e for e in events if isinstance(e, ImageDone)][0].codes.reshape(-1) + v.visual_start
    assert len(blocks) == 5 and (blocks[0] == mask_id(v)).all()
    masked = [int((b == mask_id(v)).sum()) for b in blocks]
    assert all(a > b for a, b in zip(masked, masked[1:]))
    for earlier, later in zip(blocks, blocks[1:]):
        fixed = earlier != mask_id(v)
        assert torch.equal(later[fixed], earlier[fixed])
    fixed = blocks[-1] != mask_id(v)
    assert torch.equal(codes[fixed], blocks[-1][fixed])


def test_noisy_tokens_see_only_their_prefix_and_their_own_copy_by_perturbation(bpe):
    """Through the model (debug preset) under the adaptation mask: changing a later clean token, a
    clean code of the noisy token's own image, or another image's noisy copy leaves the noisy token's
    logits unchanged; changing a prefix token or a noisy token of its own copy moves them."""
    from model.attention import dense_from_mask_mod
    from model.config import preset
    from model.dida import add_noisy_copies
    from model.transformer import Transformer

    v = bpe.vocab
    doc = [v.bos, 5, 6, *v.image_ids([[1, 2], [3, 4]]), 7, 8, *v.image_ids([[9, 10]]), v.eos]
    ids = torch.tensor([doc])
    ext = add_noisy_copies(ids, torch.arange(len(doc))[None], torch.ones_like(ids), v,
                           torch.Generator().manual_seed(1))
    T, L = len(doc), ext["ids"].shape[1]
    mask = dense_from_mask_mod(training_mask_mod(ext["doc_ids"], ext["noisy_image"], ext["limit"]), 1, L, L)
    torch.manual_seed(0)
    m = Transformer(preset("debug")).eval()

    def noisy_logits(x):
        with torch.no_grad():
            return m(x, positions=ext["positions"], mask=mask)[0, T:T + 4]  # the first image's noisy copy

    base = noisy_logits(ext["ids"])
    img1 = doc.index(v.img)

    def moved(index, watch=(0, 1, 2, 3)):  # watch: which of the copy's 4 tokens to compare
        x = ext["ids"].clone()
        x[0, index] = 3 if int(x[0, index]) != 3 else 4
        return (noisy_logits(x) - base)[list(watch)].abs().max().item() > 1e-6

    assert not moved(img1 + 1)  # its own image's clean code
    assert not moved(doc.index(7))  # clean text after the image
    assert not moved(T + 4)  # the second image's noisy copy
    assert moved(1)  # the prefix
    assert moved(T + 1, watch=(0, 2, 3))  # a token of its own copy, seen by the copy's other tokens


def test_dida_image_that_does_not_fit_ends_the_answer_with_context(debug_model, bpe):
    """An image opened near the end of the context: the 3x3 grid's codes would fit the room left
    after its header, but with its EOLs and EOI the span would not. DiDA must refuse it before any
    forward and the answer ends with reason "context" and no half image, rather than raising."""
    v = bpe.vocab
    context = debug_model.config.max_position_embeddings
    prompt = [v.bos] + bpe.encode(" a") * (context - 16)  # 15 slots left: header 5, then 10 < 9 + 3
    boi = bias_toward(debug_model, v.boi, 50.0)  # the text phase opens an image at once
    try:
        sampler = DiDASampler(2)
        events = list(generate(debug_model, prompt, params=SamplingParams(max_new_tokens=40), image_size=(3, 3),
                               image_sampler=sampler, generator=torch.Generator().manual_seed(0)))
    finally:
        boi.remove()
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.reason == "context" and sampler.forwards == 0
    assert fin.token_ids == v.header_ids(3, 3) and not any(isinstance(e, ImageDone) for e in events)


def test_dida_k1_samples_each_position_independently(debug_model, bpe):
    """With K = 1 every code comes from one forward over the all-masked block: with greedy image
    sampling and no guidance, each code is the argmax of that forward's logits at its position."""
    from model.dida import mask_id

    v = bpe.vocab
    events = _run(debug_model, bpe, DiDASampler(1, noise_temperature=0.0), size=(3, 3), guided=False,
                  image_temperature=0.0)
    codes = [e for e in events if isinstance(e, ImageDone)][0].codes
    prompt = [v.bos, *bpe.encode("a red cube on a table"), v.answer_start, *v.header_ids(3, 3)]
    with torch.no_grad():
        cache = debug_model.new_cache(1, 64)
        debug_model(torch.tensor([prompt]), cache=cache)
        pos = cache.next_position[:, None] + code_positions(3, 3)[None]
        block = torch.full((1, 9), mask_id(v))
        from model.attention import FULL
        logits = debug_model(block, cache=cache, positions=pos, mask=FULL)[0, :, v.visual_start:v.size]
    assert codes.reshape(-1).tolist() == logits.argmax(-1).tolist()


def test_dida_is_seeded(debug_model, bpe):
    a = [e for e in _run(debug_model, bpe, DiDASampler(4), seed=3) if isinstance(e, ImageDone)][0].codes
    b = [e for e in _run(debug_model, bpe, DiDASampler(4), seed=3) if isinstance(e, ImageDone)][0].codes
    c = [e for e in _run(debug_model, bpe, DiDASampler(4), seed=4) if isinstance(e, ImageDone)][0].codes
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dida_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_steps"):
        DiDASampler(0)
    with pytest.raises(ValueError, match="noise_temperature"):
        DiDASampler(4, noise_temperature=-1)


def test_training_mask_flex_equals_dense_and_pattern():
    # one document: 3 text tokens, a 4-code clean image (idx 3..6), 1 text token, then its noisy copy (8..11)
    T = 12
    doc = torch.zeros(1, T, dtype=torch.long)
    noisy = torch.tensor([[0] * 8 + [1] * 4])
    limit = torch.tensor([[i + 1 for i in range(8)] + [3] * 4])
    mm = training_mask_mod(doc, noisy, limit)
    dense = dense_from_mask_mod(mm, 1, T, T)[0, 0]
    # clean tokens: causal over clean tokens only
    assert dense[7, :8].all() and not dense[7, 8:].any() and not dense[2, 3]
    # noisy tokens: the clean prefix before the image (0..2), and all noisy tokens of their image
    assert dense[8, :3].all() and not dense[8, 3:8].any() and dense[8, 8:].all() and dense[11, 8:].all()
    block = block_from_mask_mod(mm, 1, T, T)
    assert torch.equal(dense_from_mask_mod(block.mask_mod, 1, T, T)[0, 0], dense)
    from model.config import preset
    from model.transformer import Transformer

    torch.manual_seed(0)
    m = Transformer(preset("debug")).eval()
    x = torch.randint(0, 900, (1, T))
    with torch.no_grad():
        torch.testing.assert_close(m(x, mask=block), m(x, mask=dense_from_mask_mod(mm, 1, T, T)),
                                   atol=1e-5, rtol=1e-5)


def test_engine_uses_dida_for_adapted_checkpoints_and_per_request_k(tmp_path):
    """AR by default; DiDA when the checkpoint's config says it is adapted; K per request either way."""
    from worldsim.engine import Engine
    from worldsim.hot import Hot
    from worldsim.runtime import Runtime
    from worldsim.store import Store, default_database_url

    from model.config import preset

    for config, setting, expected in ((preset("debug"), None, "ar"), (preset("debug"), 3, "dida-3"),
                                      (preset("debug").replace(dida_steps=5), None, "dida-5"),
                                      (preset("debug").replace(dida_steps=5), 0, "ar")):
        rt = Runtime.debug(config=config)
        eng = Engine(Store(default_database_url(str(tmp_path / expected / str(setting)))), Hot(None), rt, workers=1)
        try:
            settings = {"image_size": [3, 3]} | ({} if setting is None else {"dida_steps": setting})
            turn = eng.new("alice", "explore", prompt="a cave", settings=settings, timeout=60)
            assert turn["meta"]["sampler"] == expected
            assert [s["type"] for s in turn["output"]].count("image") == 1
        finally:
            eng.close()


def test_bench_dida_json_rows_count_passes(capsys):
    """bench/dida.py on the debug preset: one row per size and K with the documented keys; DiDA takes K
    passes plus the span's one chunk, AR one per code, per EOL and for EOI."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "dida.py"
    spec = importlib.util.spec_from_file_location("bench_dida", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--preset", "debug", "--sizes", "3,4", "--steps", "2,4", "--rounds", "1", "--native", "4", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [(r["tokens"], r["k"]) for r in rows] == [(9, 2), (9, 4), (16, 2), (16, 4)]
    for r in rows:
        side = math.isqrt(r["tokens"])
        assert r["ar_passes"] == r["tokens"] + side and r["dida_passes"] == r["k"] + 1
        assert r["native"] == (side == 4) and r["speedup"] == pytest.approx(r["ar_seconds"] / r["dida_seconds"])
