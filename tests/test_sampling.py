"""Sampling (model/sampling.py) and streaming generation (model/generate.py) against SPEC §3.

- task defaults: SPEC §3's table, written out here;
- guidance: a hand-computed log-softmax example;
- filters: temperature / top-k / top-p on distributions whose outcome is known in advance;
- the decoding FSM: driven by random logits for many seeds, every image span is checked with an
  independent parser (and with vocab.parse_image);
- generate(): on the random debug model, events and ids follow SPEC §2's serialization.
"""

import math

import pytest
import torch

from model.generate import Finished, ImageDone, ImageProgress, ImageStarted, TextDelta, generate
from model.sampling import TASKS, DecodeFSM, SamplingParams, guide, sample, task_defaults

# ---- SPEC §3 defaults table ----------------------------------------------------------------------------
# task: guidance, text top-k, text top-p, text T, image top-k, max new tokens, image area (px)
SPEC_TABLE = {
    "t2i": (5.0, 1024, 0.9, 1.0, 5120, 5120, 1024 * 1024),
    "x2i": (3.0, 1024, 0.9, 1.0, 5120, 5120, 1024 * 1024),
    "story": (3.0, 1024, 0.9, 1.0, 10240, 32768, 720 * 720),
    "howto": (3.0, 200, 0.8, 0.7, 10240, 32768, 720 * 720),
    "explore": (3.0, 200, 0.5, 0.7, 5120, 32768, 720 * 720),
}


@pytest.mark.parametrize("task", list(SPEC_TABLE))
def test_task_defaults_match_spec_table(task):
    p = task_defaults(task)
    got = (p.guidance_scale, p.text_top_k, p.text_top_p, p.text_temperature, p.image_top_k, p.max_new_tokens,
           p.image_area)
    assert got == SPEC_TABLE[task]


def test_t2i_base_model_guidance():
    base = task_defaults("t2i", image_model=False)
    assert base.guidance_scale == 2.0
    image = task_defaults("t2i", image_model=True)
    assert image.guidance_scale == 5.0
    # only the guidance differs
    assert base.replace(guidance_scale=5.0) == image


def test_all_prompt_tasks_have_defaults():
    assert set(TASKS) == {"t2i", "x2i", "howto", "story", "explore", "vla"}
    for task in TASKS:
        assert isinstance(task_defaults(task), SamplingParams)


@pytest.mark.parametrize("task", ["T2I", "chat", "", "image"])
def test_unknown_task(task):
    with pytest.raises(ValueError, match="task") as e:
        task_defaults(task)
    for allowed in ("t2i", "x2i", "howto", "story", "explore", "vla"):
        assert allowed in str(e.value)


@pytest.mark.parametrize("field, value", [
    ("text_temperature", -0.5), ("image_temperature", -1e-3), ("text_top_p", 0.0), ("image_top_p", 0.0),
    ("text_top_p", 1.5), ("image_top_p", -0.1), ("text_top_k", -1), ("image_top_k", -5),
    ("guidance_scale", -1.0), ("max_new_tokens", 0), ("image_area", 0),
])
def test_invalid_sampling_params(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        task_defaults("story").replace(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("text_top_k", 1024.5), ("image_top_k", 5120.0), ("text_top_k", True), ("image_top_k", False),
    ("text_top_k", "200"), ("max_new_tokens", 10.5), ("max_new_tokens", True), ("image_area", 1e6),
    ("text_temperature", "0.7"), ("image_temperature", None), ("text_top_p", "0.9"), ("image_top_p", [0.5]),
    ("guidance_scale", "3"), ("guidance_scale", True), ("text_temperature", False),
])
def test_sampling_params_reject_wrong_types(field, value):
    """Wrong types are ValueErrors naming the field, not a TypeError here or a failure later in torch."""
    with pytest.raises(ValueError, match=rf"^{field}: "):
        SamplingParams(**{field: value})


def test_sampling_params_accept_numpy_numbers():
    import numpy as np

    p = SamplingParams(text_top_k=np.int64(200), image_top_k=np.int32(5120), text_top_p=np.float32(0.5),
                       guidance_scale=np.float64(3.0), text_temperature=1, max_new_tokens=np.int64(64))
    assert p.text_top_k == 200 and p.text_temperature == 1


def test_valid_edge_sampling_params():
    SamplingParams(text_temperature=0, image_temperature=0, text_top_k=0, image_top_k=0, text_top_p=1.0,
                   image_top_p=1e-9, guidance_scale=0.0)


# ---- guidance, by hand --------------------------------------------------------------------------------------

def _log_softmax(xs):
    z = math.log(sum(math.exp(x) for x in xs))
    return [x - z for x in xs]


COND = [2.0, 1.0, -0.5, 0.25]
UNCOND = [0.0, 3.0, 1.0, -2.0]


@pytest.mark.parametrize("scale", [1.0, 0.0, 3.0, 0.5])
def test_guidance_hand_computed(scale):
    lc, lu = _log_softmax(COND), _log_softmax(UNCOND)
    expected = [u + scale * (c - u) for c, u in zip(lc, lu)]
    got = guide(torch.tensor(COND), torch.tensor(UNCOND), scale)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    if scale == 1.0:
        assert got.tolist() == pytest.approx(lc, abs=1e-5)
    if scale == 0.0:
        assert got.tolist() == pytest.approx(lu, abs=1e-5)


def test_guidance_scale_3_numbers():
    # written out: lc = COND - log(e^2 + e^1 + e^-0.5 + e^0.25), lu = UNCOND - log(1 + e^3 + e^1 + e^-2)
    zc = math.log(math.exp(2) + math.exp(1) + math.exp(-0.5) + math.exp(0.25))
    zu = math.log(1 + math.exp(3) + math.exp(1) + math.exp(-2))
    expected = [(0 - zu) + 3 * ((2 - zc) - (0 - zu)), (3 - zu) + 3 * ((1 - zc) - (3 - zu)),
                (1 - zu) + 3 * ((-0.5 - zc) - (1 - zu)), (-2 - zu) + 3 * ((0.25 - zc) - (-2 - zu))]
    got = guide(torch.tensor([COND, UNCOND]), torch.tensor([UNCOND, UNCOND]), 3.0)  # batched (2, 4)
    assert got[0].tolist() == pytest.approx(expected, abs=1e-5)
    assert got[1].tolist() == pytest.approx(_log_softmax(UNCOND), abs=1e-5)  # cond == uncond: no change
    # guidance pushes toward the tokens cond prefers: token 0 gains, token 1 loses against s=1
    s1 = guide(torch.tensor(COND), torch.tensor(UNCOND), 1.0)
    assert got[0, 0] > s1[0] and got[0, 1] < s1[1]


def test_guidance_ignores_logit_offsets():
    a = guide(torch.tensor(COND), torch.tensor(UNCOND), 3.0)
    b = guide(torch.tensor(COND) + 7.0, torch.tensor(UNCOND) - 4.0, 3.0)
    assert torch.allclose(a, b, atol=1e-5)


# ---- sample --------------------------------------------------------------------------------------------------

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 5.0, 2.0, -1.0], [3.0, 0.0, 0.5, 2.9], [-9.0, -8.0, -10.0, -7.5]])
    for k, p in [(0, 1.0), (2, 0.5), (1, 1e-3)]:
        assert sample(logits, 0.0, k, p, _gen(0)).tolist() == [1, 0, 3]


def test_top_k_1_and_tiny_top_p_pick_the_max():
    g = _gen(1)
    logits = torch.randn(64, 50, generator=g)
    best = logits.argmax(-1)
    for seed in range(5):
        assert torch.equal(sample(logits, 1.0, 1, 1.0, _gen(seed)), best)
        assert torch.equal(sample(logits, 1.0, 0, 1e-6, _gen(seed)), best)
        assert torch.equal(sample(logits, 5.0, 1, 1.0, _gen(seed)), best)  # even when hot


def test_top_k_and_top_p_keep_exactly_the_expected_sets():
    # probs 0.4, 0.3, 0.2, 0.1
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1])).expand(4000, 4)
    # top-k 2 -> {0, 1}
    got = sample(logits, 1.0, 2, 1.0, _gen(0))
    assert set(got.tolist()) == {0, 1}
    # top-p 0.5: 0.4 < 0.5 so token 1 is needed; 0.4+0.3 >= 0.5 so token 2 is not -> {0, 1}
    got = sample(logits, 1.0, 0, 0.5, _gen(0))
    assert set(got.tolist()) == {0, 1}
    # top-p 0.75: cumulative before token 2 is 0.7 < 0.75 -> {0, 1, 2}
    got = sample(logits, 1.0, 0, 0.75, _gen(0))
    assert set(got.tolist()) == {0, 1, 2}
    # no filter: all four
    assert set(sample(logits, 1.0, 0, 1.0, _gen(0)).tolist()) == {0, 1, 2, 3}


def test_sampling_frequencies_follow_temperature():
    logits = torch.log(torch.tensor([0.75, 0.25])).expand(20000, 2)
    f1 = (sample(logits, 1.0, 0, 1.0, _gen(3)) == 0).float().mean().item()
    assert f1 == pytest.approx(0.75, abs=0.015)
    # T = 0.5 squares the probabilities: 0.5625 / (0.5625 + 0.0625) = 0.9
    f05 = (sample(logits, 0.5, 0, 1.0, _gen(3)) == 0).float().mean().item()
    assert f05 == pytest.approx(0.9, abs=0.01)
    # top-p renormalizes what is kept: p = 0.8 keeps both here -> unchanged frequency
    fp = (sample(logits, 1.0, 0, 0.8, _gen(3)) == 0).float().mean().item()
    assert fp == pytest.approx(0.75, abs=0.015)


def test_seeded_sampling_is_reproducible():
    flat = torch.zeros(200, 1000)
    a = sample(flat, 1.0, 0, 1.0, _gen(42))
    b = sample(flat, 1.0, 0, 1.0, _gen(42))
    c = sample(flat, 1.0, 0, 1.0, _gen(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a != c).float().mean() > 0.9  # a flat distribution: almost every draw differs


def test_minus_inf_is_never_sampled():
    g = _gen(7)
    logits = torch.randn(3000, 40, generator=g) * 3
    banned = torch.zeros(40, dtype=torch.bool)
    banned[::3] = True
    banned[5] = True
    logits[:, banned] = float("-inf")
    for t, k, p in [(1.0, 0, 1.0), (2.0, 0, 1.0), (1.0, 35, 1.0), (1.0, 0, 0.99), (10.0, 30, 0.999)]:
        got = sample(logits, t, k, p, _gen(k))
        assert not banned[got].any(), (t, k, p)
    # a row with a single finite entry always picks it
    one = torch.full((10, 40), float("-inf"))
    one[:, 17] = -50.0
    assert sample(one, 1.0, 10, 0.9, _gen(0)).tolist() == [17] * 10


# ---- the decoding FSM, independent parser ---------------------------------------------------------------

class Truncated(Exception):
    pass


def split_spans(ids, v):
    """Walk a generated id stream with SPEC §2/§3's grammar. Returns (spans, text_positions):
    spans = [(start, end_exclusive, (h, w), grid)] for complete images; a trailing incomplete image is
    allowed and checked as far as it goes. Any violation is an AssertionError."""
    digits = {d: i for i, d in enumerate(v.digit_ids)}
    is_vis = lambda t: v.visual_start <= t < v.size  # noqa: E731
    spans, text_pos = [], []
    i, n = 0, len(ids)

    def at(j):
        if j >= n:
            raise Truncated
        return ids[j]

    while i < n:
        t = ids[i]
        if t != v.boi:
            assert not is_vis(t), f"visual code {t} in text phase at {i}"
            assert t not in (v.img, v.eoi), f"image token {t} outside an image at {i}"
            assert t < v.size, f"id {t} outside the vocabulary at {i}"
            text_pos.append(i)
            i += 1
            continue
        start = i
        try:
            j = i + 1
            hd = []
            while at(j) in digits:
                hd.append(digits[at(j)])
                j += 1
            assert hd and at(j) == v.star_id, f"bad height at {j}"
            j += 1
            wd = []
            while at(j) in digits:
                wd.append(digits[at(j)])
                j += 1
            assert wd and at(j) == v.img, f"bad width at {j}"
            j += 1
            h, w = int("".join(map(str, hd))), int("".join(map(str, wd)))
            assert h > 0 and w > 0
            grid = []
            for r in range(h):
                if r:
                    assert at(j) == v.eol, f"expected EOL at {j}, got {at(j)}"
                    j += 1
                row = []
                for _ in range(w):
                    assert is_vis(at(j)), f"expected a visual code at {j}, got {at(j)}"
                    row.append(at(j) - v.visual_start)
                    j += 1
                grid.append(row)
            assert at(j) == v.eoi, f"expected EOI at {j}, got {at(j)}"
            j += 1
        except Truncated:
            return spans, text_pos
        spans.append((start, j, (h, w), grid, (hd, wd)))
        i = j
    return spans, text_pos


def test_split_spans_parser_itself(bpe):
    """The checker must catch what it is meant to catch."""
    v = bpe.vocab
    good = [70, 71] + v.image_ids([[1, 2, 3], [4, 5, 6]]) + [72] + v.image_ids([[9]])
    spans, text = split_spans(good, v)
    assert [(s[2], s[3]) for s in spans] == [((2, 3), [[1, 2, 3], [4, 5, 6]]), ((1, 1), [[9]])]
    assert text == [0, 1, 15]
    for bad in (good[:5] + good[6:],  # header digit dropped
                good[:-3] + [v.eol] + good[-3:],  # stray EOL
                good + [v.visual(3)],  # code in text
                [70, v.eoi]):
        with pytest.raises(AssertionError):
            split_spans(bad, v)
    assert split_spans(good[:9], v)[0] == []  # truncated image: no complete span, no error


def drive(fsm, vocab_size, steps, seed, bias):
    """Random logits + biases -> FSM -> token ids. Returns (ids, grids returned by advance)."""
    g = torch.Generator().manual_seed(seed)
    ids, grids = [], []
    for _ in range(steps):
        token = fsm.forced()
        if token is None:
            logits = torch.randn(vocab_size, generator=g) * 2 + bias
            token = int(sample(fsm.constrain(logits)[None], 1.0, 0, 1.0, g)[0])
        grid = fsm.advance(token)
        ids.append(token)
        if grid is not None:
            grids.append(grid)
    return ids, grids


def check_stream(v, ids, grids):
    spans, _ = split_spans(ids, v)
    assert [s[3] for s in spans] == grids  # the FSM returns exactly the grids it wrote
    for start, end, _, grid, _ in spans:
        assert v.parse_image(ids[start:end]) == grid
    return spans


def test_fsm_forced_size_random_logits(bpe):
    v = bpe.vocab
    bias = torch.zeros(v.size)
    bias[v.boi] = 4.0
    total = 0
    for seed in range(25):
        fsm = DecodeFSM(v, v.size, image_size=(3, 4))
        ids, grids = drive(fsm, v.size, 300, seed, bias)
        spans = check_stream(v, ids, grids)
        for start, _, size, _, _ in spans:
            assert size == (3, 4)
            assert ids[start:start + 5] == [v.boi, 18, 9, 19, v.img]  # '3' '*' '4' by hand
        total += len(spans)
    assert total >= 100  # images really happened


def test_fsm_sampled_headers_follow_grammar(bpe):
    """Unbiased digits: the header alone, for many seeds (a full image would be thousands of tokens)."""
    v = bpe.vocab
    bias = torch.zeros(v.size)
    bias[v.boi] = 8.0
    sizes = set()
    for seed in range(60):
        fsm = DecodeFSM(v, v.size)
        ids, _ = drive(fsm, v.size, 40, seed, bias)
        split_spans(ids, v)  # grammar holds for the (truncated) stream
        b = ids.index(v.boi)
        header = ids[b + 1:b + 7]
        assert header[2] == v.star_id and header[5] == v.img, header
        h, w = v.parse_header(header[:5])
        assert 10 <= h <= 99 and 10 <= w <= 99
        assert fsm.size == (h, w)
        sizes.add((h, w))
    assert len(sizes) > 30
    assert any(h >= 50 for h, _ in sizes) and any(w >= 50 for _, w in sizes)


def _small_header_bias(v, boi=8.0):
    # random logits still decide everything; the bias only makes small two-digit sizes likely so that
    # whole images fit in a few hundred steps
    bias = torch.zeros(v.size)
    bias[v.boi] = boi
    bias[v.digit_ids[1]] = 8.0
    bias[v.digit_ids[0]] = 8.0
    return bias


@pytest.mark.parametrize("padded", [0, 13])
def test_fsm_sampled_sizes_reused(bpe, padded):
    v = bpe.vocab
    size = v.size + padded  # padded embeddings (vocab_size > layout): padded ids are never produced
    bias = torch.cat([_small_header_bias(v), torch.full((padded,), 20.0)])
    multi = complete = 0
    for seed in range(20):
        fsm = DecodeFSM(v, size, reuse_first_size=True)
        ids, grids = drive(fsm, size, 600, seed, bias)
        assert max(ids) < v.size
        spans = check_stream(v, ids, grids)
        if not spans:  # a large first image can outlast the steps; checked up to where it got
            continue
        complete += 1
        first = spans[0][2]
        hd, wd = spans[0][4]
        assert len(hd) == 2 and len(wd) == 2 and hd[0] != 0 and wd[0] != 0
        assert 10 <= first[0] <= 99 and 10 <= first[1] <= 99
        for s in spans[1:]:
            assert s[2] == first
        # a trailing partial image must also use the first size
        last_boi = max(i for i, t in enumerate(ids) if t == v.boi)
        if last_boi >= spans[-1][1]:
            tail = ids[last_boi + 1:last_boi + 6]
            assert tail == v.header_ids(*first)[1:1 + len(tail)]
        multi += len(spans) > 1
    assert complete >= 15 and multi >= 10


def test_fsm_no_reuse_samples_each_header(bpe):
    v = bpe.vocab
    bias = _small_header_bias(v)
    differing = 0
    for seed in range(20):
        fsm = DecodeFSM(v, v.size, reuse_first_size=False)
        ids, grids = drive(fsm, v.size, 600, seed, bias)
        spans = check_stream(v, ids, grids)
        for s in spans:
            assert 10 <= s[2][0] <= 99 and 10 <= s[2][1] <= 99
        differing += len({s[2] for s in spans}) > 1
    assert differing >= 3


def test_fsm_rejects_illegal_ids(bpe):
    v = bpe.vocab
    fsm = DecodeFSM(v, v.size, image_size=(2, 2))
    with pytest.raises(ValueError, match="token_id"):
        fsm.advance(v.visual(0))  # visual code in text
    with pytest.raises(ValueError, match="token_id"):
        fsm.advance(v.eoi)
    with pytest.raises(ValueError, match="token_id"):
        fsm.advance(v.answer_start)  # an answer never opens another (a trained model wrote it mid-story)
    assert not fsm.allowed()[v.answer_start] and fsm.allowed()[v.answer_end]
    fsm.advance(70)
    fsm.advance(v.boi)
    assert fsm.forced() == 17  # '2'
    with pytest.raises(ValueError, match="token_id"):
        fsm.advance(18)
    for t in (17, 9, 17, v.img, v.visual(1)):
        fsm.advance(t)
    with pytest.raises(ValueError, match="token_id"):
        fsm.advance(v.eol)  # EOL only after w codes
    with pytest.raises(ValueError, match="token_id"):
        fsm.advance(70)  # text inside the grid
    fsm.advance(v.visual(2))
    assert fsm.forced() == v.eol
    fsm.advance(v.eol)
    fsm.advance(v.visual(3))
    assert fsm.advance(v.visual(4)) is None
    assert fsm.forced() == v.eoi
    assert fsm.advance(v.eoi) == [[1, 2], [3, 4]]
    assert not fsm.in_image


def test_fsm_rejects_bad_forced_size(bpe):
    with pytest.raises(ValueError):
        DecodeFSM(bpe.vocab, bpe.vocab.size, image_size=(0, 4))


# ---- generate() on the debug model -------------------------------------------------------------------------

def bias_toward(model, token, amount):
    def hook(module, inputs, out):
        out = out.clone()
        out[..., token] += amount
        return out
    return model.lm_head.register_forward_hook(hook)


def run(model, prompt, **kw):
    return list(generate(model, prompt, **kw))


def test_generate_forced_image_events(debug_model, bpe):
    v = bpe.vocab
    bias_toward(debug_model, v.boi, 30.0)
    prompt = bpe.encode("<|extra_203|>You are a helpful assistant for t2i task. USER: a fox ASSISTANT: <|extra_100|>")
    params = SamplingParams(max_new_tokens=45, image_top_k=0)
    decoded = []
    events = run(debug_model, prompt, params=params, generator=_gen(0), image_size=(2, 3), tokenizer=bpe,
                 decode_image=lambda c: decoded.append(c.clone()) or "img%d" % len(decoded))
    fin = events[-1]
    # BOI, '2', '*', '3', IMG, 3 codes, EOL, 3 codes, EOI = 13 tokens; 45 tokens hold 3 whole images and
    # open a 4th, which is allowed to finish past the budget (an image is never cut): 4 * 13 = 52 tokens
    assert isinstance(fin, Finished) and fin.reason == "max_new_tokens" and len(fin.token_ids) == 52
    assert sum(isinstance(e, Finished) for e in events) == 1
    dones = [e for e in events if isinstance(e, ImageDone)]
    assert len(dones) == 4
    image_events = [e for e in events if isinstance(e, (ImageStarted, ImageProgress, ImageDone))]
    for k in range(4):
        started, p1, p2, done = image_events[4 * k:4 * k + 4]
        assert started == ImageStarted(2, 3)
        assert p1 == ImageProgress(1, 2) and p2 == ImageProgress(2, 2)
        assert done.codes.shape == (2, 3) and done.codes.dtype == torch.long
        assert ((done.codes >= 0) & (done.codes < 256)).all()
        assert done.image == "img%d" % (k + 1) and torch.equal(decoded[k], done.codes)
    spans, _ = split_spans(fin.token_ids, v)
    assert [s[3] for s in spans] == [d.codes.tolist() for d in dones]
    serialized = [tok for d in dones for tok in v.image_ids(d.codes)]
    assert fin.token_ids == serialized
    assert fin.token_ids[:5] == [721, 17, 9, 18, 720]  # BOI '2' '*' '3' IMG, compact layout by hand
    assert not any(isinstance(e, TextDelta) for e in events)  # nothing but images was generated


def test_greedy_guided_image_codes_match_a_full_vocabulary_reference(debug_model, bpe):
    """Inside a grid the AR step scores the visual codes alone; guidance then log-softmaxes over the
    codes, a per-row shift that must change no choice. Reference: a plain loop over the full-vocabulary
    logits, guided, masked to the visual codes, argmax."""
    v = bpe.vocab
    cond = bpe.encode("<|extra_203|>USER: a red cube ASSISTANT: <|extra_100|>")
    uncond = [cond[0]] + bpe.encode(" ") * (len(cond) - 2) + [cond[-1]]  # as long: no padding to model
    params = SamplingParams(max_new_tokens=40, guidance_scale=3.0, image_temperature=0.0)
    fin = run(debug_model, cond, params=params, uncond_ids=uncond, image_size=(2, 3), start_with_image=True,
              stop_ids=(v.answer_end,), max_images=1)[-1]
    header = v.header_ids(2, 3)
    with torch.no_grad():
        cache = debug_model.new_cache(2, 64)
        logits = debug_model(torch.tensor([cond + header, uncond + header]), cache=cache)[:, -1]
        want = []
        for i in range(8):  # 3 codes, EOL, 3 codes, EOI
            if i in (3, 7):
                token = v.eol if i == 3 else v.eoi
            else:
                scores = guide(logits[0], logits[1], 3.0)
                scores[:v.visual_start] = float("-inf")
                token = int(scores.argmax())
            want.append(token)
            logits = debug_model(torch.tensor([[token], [token]]), cache=cache)[:, -1]
    assert fin.token_ids[:len(header) + 8] == header + want


def test_inverse_cdf_never_draws_an_id_without_mass_even_at_the_top(monkeypatch):
    """u = 1 (rounding can land it on the total mass) must fall back to the last id with mass."""
    from model.sampling import inverse_cdf

    probs = torch.tensor([[0.2, 0.8, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(2, 1))
    assert inverse_cdf(probs).tolist() == [1, 2]
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(2, 1))
    assert inverse_cdf(probs).tolist() == [0, 2]  # u = 0: the first id with mass


def test_generate_text_deltas_match_decode(debug_model, bpe):
    v = bpe.vocab
    prompt = bpe.encode("<|extra_203|>You are a helpful assistant for story task. USER: go ASSISTANT: <|extra_100|>")
    for seed in range(3):
        events = run(debug_model, prompt, params=SamplingParams(max_new_tokens=60, text_top_k=0, text_top_p=1.0),
                     generator=_gen(seed), image_size=(1, 2), tokenizer=bpe)
        fin = events[-1]
        spans, text_pos = split_spans(fin.token_ids, v)
        text_ids = [fin.token_ids[i] for i in text_pos if fin.token_ids[i] < v.num_text_tokens]
        assert len(text_ids) > 10
        deltas = [e.text for e in events if isinstance(e, TextDelta)]
        assert all(deltas)
        assert "".join(deltas) == bpe.decode(text_ids)
        if v.eos in fin.token_ids:
            assert fin.reason == "eos" and fin.token_ids[-1] == v.eos


def test_generate_guidance_batched_and_reproducible(debug_model, bpe):
    v = bpe.vocab
    bias_toward(debug_model, v.boi, 30.0)
    cond = bpe.encode("<|extra_203|>You are a helpful assistant for t2i task. USER: a red cube on a blue "
                      "cube ASSISTANT: <|extra_100|>")
    uncond = bpe.encode("<|extra_203|>You are a helpful assistant. USER:  ASSISTANT: <|extra_100|>")
    assert len(uncond) < len(cond)
    params = SamplingParams(max_new_tokens=26, guidance_scale=3.0, image_top_k=0)
    a = run(debug_model, cond, params=params, generator=_gen(5), uncond_ids=uncond, image_size=(2, 3))
    b = run(debug_model, cond, params=params, generator=_gen(5), uncond_ids=uncond, image_size=(2, 3))
    assert a[-1].token_ids == b[-1].token_ids
    assert len([e for e in a if isinstance(e, ImageDone)]) == 2
    c = run(debug_model, cond, params=params, generator=_gen(6), uncond_ids=uncond, image_size=(2, 3))
    assert c[-1].token_ids != a[-1].token_ids


def test_generate_guidance_zero_follows_the_padded_uncond_row(debug_model, bpe):
    """With s = 0, guided codes are the unconditional row's: greedy codes must equal a plain greedy run
    on the unconditional prompt alone. The unconditional prompt is the shorter, left-padded row, so
    this checks padding, positions and the guidance formula together."""
    v = bpe.vocab
    bias_toward(debug_model, v.boi, 30.0)
    cond = bpe.encode("<|extra_203|>You are a helpful assistant for t2i task. USER: a lantern in the "
                      "forest at night ASSISTANT: <|extra_100|>")
    uncond = bpe.encode("<|extra_203|>You are a helpful assistant. USER:  ASSISTANT: <|extra_100|>")
    greedy = SamplingParams(max_new_tokens=26, image_temperature=0.0)
    guided = run(debug_model, cond, params=greedy.replace(guidance_scale=0.0), uncond_ids=uncond,
                 image_size=(2, 3), generator=_gen(0))[-1].token_ids
    alone = run(debug_model, uncond, params=greedy, image_size=(2, 3), generator=_gen(0))[-1].token_ids
    plain_cond = run(debug_model, cond, params=greedy, image_size=(2, 3), generator=_gen(0))[-1].token_ids
    assert guided == alone
    assert guided != plain_cond  # the two prompts really lead to different codes


def test_generate_prompt_checks(debug_model, bpe):
    params = SamplingParams(max_new_tokens=4)
    context = debug_model.config.max_position_embeddings
    with pytest.raises(ValueError, match="prompt_ids"):
        run(debug_model, [70] * context, params=params)
    with pytest.raises(ValueError, match="prompt_ids"):
        run(debug_model, [70] * (context + 10), params=params)
    with pytest.raises(ValueError, match="prompt_ids"):
        run(debug_model, [70], params=params.replace(guidance_scale=3.0), uncond_ids=[70] * context)
    with pytest.raises(ValueError, match="prompt_ids"):
        run(debug_model, [], params=params)


def test_generate_rejects_bad_ids_and_oversized_forced_image(debug_model, bpe):
    v = bpe.vocab
    params = SamplingParams(max_new_tokens=10)
    with pytest.raises(ValueError, match="prompt_ids"):
        run(debug_model, [v.bos, debug_model.config.vocab_size], params=params)
    with pytest.raises(ValueError, match="uncond_ids"):
        run(debug_model, [v.bos, 5], params=params, uncond_ids=[])
    # a 60x60 image needs 3,600+ tokens: it cannot fit the debug context of 2,048
    with pytest.raises(ValueError, match="image"):
        run(debug_model, [v.bos, 5], params=params, image_size=(60, 60), start_with_image=True)


def test_turn_shape_rules_on_random_model(debug_model, bpe):
    """min/max images and the text-run limit shape a turn even when the model is untrained."""
    v = bpe.vocab
    prompt = [v.bos, *bpe.encode("USER: walk ASSISTANT: "), v.answer_start]
    for seed in range(3):
        events = run(debug_model, prompt, params=SamplingParams(max_new_tokens=400), generator=_gen(seed),
                     image_size=(2, 2), stop_ids=(v.answer_end, v.eos), min_images=2, max_images=2,
                     max_text_tokens=5)
        fin = events[-1]
        assert fin.reason == "eos" and fin.token_ids[-1] == v.answer_end
        assert sum(isinstance(e, ImageDone) for e in events) == 2
        spans, text = split_spans(fin.token_ids, v)
        assert len(spans) == 2
        # every text run between images is at most 5 tokens
        runs, current, in_image = [], 0, False
        for t in fin.token_ids:
            if t == v.boi or t == v.answer_end:
                runs.append(current)
                current, in_image = 0, t == v.boi
            elif t == v.eoi:
                in_image = False
            elif not in_image:
                current += 1
        assert max(runs) <= 5
