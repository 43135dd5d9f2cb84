"""Decoder invariants on the `debug` preset (model/transformer.py, attention.py, kv_cache.py, config.py,
info.py): causality, KV-cache decoding against a full forward, left-padded guidance batches,
cache crop/clone, FlexAttention against the dense mask, QK-norm on every kernel path, parameter
counts of the 34B preset computed from SPEC §1's sizes, and the ValueErrors users see.

Every expected value is derived independently (a full forward without a cache, a single unpadded row,
a hand-written mask, SPEC's sizes), never read back from the output under test."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.attention import block_from_mask_mod, dense_from_mask_mod, document_mask_mod
from model.config import ModelConfig, preset
from model.kv_cache import KVCache
from model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5


def random_ids(model, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=g)


def max_diff(a, b):
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------ causality

@pytest.mark.parametrize("t", [0, 7, 15])
def test_causality(debug_model, t):
    ids = random_ids(debug_model, 2, 16)
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 123) % debug_model.config.vocab_size
    with torch.no_grad():
        a, b = debug_model(ids), debug_model(changed)
    assert a.shape == (2, 16, debug_model.config.vocab_size)
    if t > 0:
        assert max_diff(a[:, :t], b[:, :t]) < 1e-6, "a later token leaked into earlier positions"
    assert max_diff(a[:, t], b[:, t]) > 1e-3, "changing token t did not change position t's logits"
    if t < 15:
        assert max_diff(a[:, t + 1:], b[:, t + 1:]) > 1e-4, "later positions ignore token t"


# ------------------------------------------------------------------------------------- KV cache

def test_incremental_decoding_equals_full_forward(debug_model):
    B, T = 2, 24
    ids = random_ids(debug_model, B, T, seed=1)
    with torch.no_grad():
        full = debug_model(ids)
        cache = debug_model.new_cache(B, 64)
        out = [debug_model(ids[:, :10], cache=cache)]  # prefill
        for i in range(10, 16):  # one token at a time
            out.append(debug_model(ids[:, i:i + 1], cache=cache))
        out.append(debug_model(ids[:, 16:], cache=cache))  # a multi-token chunk after a prefix
    assert cache.length == T and cache.next_position.tolist() == [T, T]
    inc = torch.cat(out, dim=1)
    assert inc.shape == full.shape
    assert max_diff(inc, full) < ATOL


def test_last_only_matches_last_position(debug_model):
    ids = random_ids(debug_model, 1, 9, seed=2)
    with torch.no_grad():
        full, last = debug_model(ids), debug_model(ids, last_only=True)
    assert last.shape == (1, 1, debug_model.config.vocab_size)
    assert max_diff(last[:, 0], full[:, -1]) < ATOL


def test_score_and_vocab_range_select_from_the_full_logits(debug_model):
    """The samplers' narrow head: logits for chosen positions over an id range equal the same entries of
    the full logits, with a cache and a bidirectional block too (DiDA's call)."""
    from model.attention import FULL

    ids = random_ids(debug_model, 2, 12, seed=4)
    pick = torch.tensor([1, 5, 6, 11])
    lo, hi = 300, 700
    with torch.no_grad():
        full = debug_model(ids)
        got = debug_model(ids, score=pick, vocab_range=(lo, hi))
        assert got.shape == (2, 4, hi - lo) and max_diff(got, full[:, pick, lo:hi]) < ATOL
        cache = debug_model.new_cache(2, 32)
        debug_model(ids[:, :8], cache=cache)
        block = debug_model(ids[:, 8:], cache=cache, mask=FULL)
        cache.crop(8)
        narrow = debug_model(ids[:, 8:], cache=cache, mask=FULL, score=torch.tensor([0, 3]), vocab_range=(lo, hi))
    assert max_diff(narrow, block[:, [0, 3], lo:hi]) < ATOL
    with pytest.raises(ValueError, match="score"):
        debug_model(ids, last_only=True, score=pick)


def test_left_padded_batch_matches_unpadded_rows(debug_model):
    """Guidance batches a conditional and an unconditional prompt of different lengths, left-padded."""
    vocab = debug_model.vocab
    long_row, short_row = random_ids(debug_model, 1, 12, seed=3)[0], random_ids(debug_model, 1, 7, seed=4)[0]
    pad = 12 - 7
    attention_mask = torch.ones(2, 12, dtype=torch.bool)
    attention_mask[1, :pad] = False
    batch = torch.stack([long_row, torch.cat([torch.full((pad,), vocab.pad), short_row])])
    cont = random_ids(debug_model, 2, 6, seed=5)  # per-row continuation tokens

    with torch.no_grad():
        # references: each row alone, no padding, no cache
        ref_long = debug_model(torch.cat([long_row, cont[0]])[None])
        ref_short = debug_model(torch.cat([short_row, cont[1]])[None])

        cache = debug_model.new_cache(2, 32)
        pre = debug_model(batch, cache=cache, attention_mask=attention_mask)
        assert max_diff(pre[0], ref_long[0, :12]) < ATOL
        assert max_diff(pre[1, pad:], ref_short[0, :7]) < ATOL
        assert cache.next_position.tolist() == [12, 7]

        steps = [debug_model(cont[:, i:i + 1], cache=cache) for i in range(3)]  # one at a time
        steps.append(debug_model(cont[:, 3:], cache=cache))  # then a chunk
        dec = torch.cat(steps, dim=1)
        assert max_diff(dec[0], ref_long[0, 12:]) < ATOL
        assert max_diff(dec[1], ref_short[0, 7:]) < ATOL

        # padding is really hidden: another pad id gives the same real-token logits
        other = batch.clone()
        other[1, :pad] = random_ids(debug_model, 1, pad, seed=6)[0]
        again = debug_model(other, attention_mask=attention_mask)
        assert max_diff(again[1, pad:], ref_short[0, :7]) < ATOL


def test_crop_then_redecode_and_clone_independence(debug_model):
    prefix, a_tok, b_tok = (random_ids(debug_model, 1, n, seed=s) for n, s in ((10, 7), (5, 8), (4, 9)))
    with torch.no_grad():
        ref_a = debug_model(torch.cat([prefix, a_tok], 1))[:, 10:]
        ref_b = debug_model(torch.cat([prefix, b_tok], 1))[:, 10:]

        cache = debug_model.new_cache(1, 32)
        debug_model(prefix, cache=cache)
        snapshot = cache.clone()
        first = torch.cat([debug_model(a_tok[:, i:i + 1], cache=cache) for i in range(5)], 1)
        assert max_diff(first, ref_a) < ATOL

        cache.crop(10)
        assert cache.length == 10 and cache.next_position.tolist() == [10]
        assert max_diff(debug_model(b_tok, cache=cache), ref_b) < ATOL  # a different branch
        cache.crop(10)
        again = torch.cat([debug_model(a_tok[:, i:i + 1], cache=cache) for i in range(5)], 1)
        assert max_diff(again, ref_a) < ATOL  # the original continuation, re-decoded

        # the clone was taken before any of that, and decoding on it leaves `cache` alone
        assert snapshot.length == 10 and snapshot.next_position.tolist() == [10]
        length, pos = cache.length, cache.next_position.clone()
        k = cache.k.clone()
        assert max_diff(debug_model(b_tok, cache=snapshot), ref_b) < ATOL
        assert cache.length == length and torch.equal(cache.next_position, pos) and torch.equal(cache.k, k)

    with pytest.raises(ValueError, match="length"):
        cache.crop(cache.length + 1)


def test_crop_on_left_padded_cache(debug_model):
    vocab = debug_model.vocab
    row0, row1 = random_ids(debug_model, 1, 8, seed=10)[0], random_ids(debug_model, 1, 5, seed=11)[0]
    batch = torch.stack([row0, torch.cat([torch.full((3,), vocab.pad), row1])])
    mask = torch.tensor([[True] * 8, [False] * 3 + [True] * 5])
    cont = random_ids(debug_model, 2, 4, seed=12)
    with torch.no_grad():
        ref0 = debug_model(torch.cat([row0[:6], cont[0]])[None])[0, 6:]
        ref1 = debug_model(torch.cat([row1[:3], cont[1]])[None])[0, 3:]
        cache = debug_model.new_cache(2, 32)
        debug_model(batch, cache=cache, attention_mask=mask)
        debug_model(random_ids(debug_model, 2, 3, seed=13), cache=cache)
        cache.crop(6)  # keeps 6 slots: row 0's first 6 tokens, row 1's 3 pads + first 3 tokens
        assert cache.next_position.tolist() == [6, 3]
        out = debug_model(cont, cache=cache)
        # crop into the padding: row 1 keeps only 2 of its pads, so it restarts at position 0
        cache.crop(2)
        assert cache.next_position.tolist() == [2, 0]
        short = debug_model(cont, cache=cache)
        ref0_short = debug_model(torch.cat([row0[:2], cont[0]])[None])[0, 2:]
        ref1_short = debug_model(cont[1:])[0]
    assert max_diff(out[0], ref0) < ATOL
    assert max_diff(out[1], ref1) < ATOL
    assert max_diff(short[0], ref0_short) < ATOL
    assert max_diff(short[1], ref1_short) < ATOL


def test_cache_overflow_raises(debug_model):
    cache = debug_model.new_cache(1, 8)
    with torch.no_grad():
        debug_model(random_ids(debug_model, 1, 6), cache=cache)
        with pytest.raises(ValueError, match="input_ids"):
            debug_model(random_ids(debug_model, 1, 3), cache=cache)
        assert cache.length == 6  # nothing was written
        with pytest.raises(ValueError, match="input_ids"):
            debug_model(random_ids(debug_model, 1, 9), cache=debug_model.new_cache(1, 8))
    with pytest.raises(ValueError, match="max_length"):
        KVCache(debug_model.config, 1, debug_model.config.max_position_embeddings + 1)


def test_new_cache_max_length_zero_is_refused_not_widened(debug_model):
    """0 is a length, not "unset": it must reach KVCache's check instead of becoming the full context."""
    with pytest.raises(ValueError, match="max_length"):
        debug_model.new_cache(1, 0)
    assert debug_model.new_cache(2).k.shape == (2, 2, 2, 2048, 32)  # None: the full context, (L, B, K, S, D)
    assert debug_model.new_cache(1, 5).max_length == 5


# ---------------------------------------------------------------------------------- attention masks

# two packed documents (8 + 12 tokens); the second holds a bidirectional block at 12..15
DOC_IDS = torch.tensor([[0] * 8 + [1] * 12])
BLOCK_IDS = torch.tensor([[0] * 12 + [1] * 4 + [0] * 4])


def hand_mask():
    """The structured mask written out with loops, (1, 1, 20, 20) bool."""
    T = 20
    m = torch.zeros(1, 1, T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(T):
            same_doc = DOC_IDS[0, q] == DOC_IDS[0, k]
            in_block = BLOCK_IDS[0, q] > 0 and BLOCK_IDS[0, q] == BLOCK_IDS[0, k]
            m[0, 0, q, k] = bool(same_doc and (k <= q or in_block))
    return m


def packed_positions():
    return torch.cat([torch.arange(8), torch.arange(12)])[None]  # restart per document


def test_dense_mask_from_mask_mod_matches_hand_written():
    mm = document_mask_mod(DOC_IDS, BLOCK_IDS)
    dense = dense_from_mask_mod(mm, 1, 20, 20)
    assert dense.shape == (1, 1, 20, 20) and dense.dtype == torch.bool
    assert torch.equal(dense, hand_mask())


def test_flex_equals_dense_mask_no_grad(debug_model):
    ids = random_ids(debug_model, 1, 20, seed=20)
    mm = document_mask_mod(DOC_IDS, BLOCK_IDS)
    pos = packed_positions()
    with torch.no_grad():
        flex = debug_model(ids, positions=pos, mask=block_from_mask_mod(mm, 1, 20, 20))
        dense = debug_model(ids, positions=pos, mask=dense_from_mask_mod(mm, 1, 20, 20))
        hand = debug_model(ids, positions=pos, mask=hand_mask())
        causal = debug_model(ids)
        # the first document, causal with its own positions, is the first document run alone
        alone0 = debug_model(ids[:, :8])
    assert max_diff(flex, dense) < ATOL
    assert max_diff(dense, hand) < ATOL
    assert max_diff(dense[:, :8], alone0) < ATOL
    # the second document's tokens before the block are that document's causal prefix
    with torch.no_grad():
        alone1 = debug_model(ids[:, 8:12])
    assert max_diff(dense[:, 8:12], alone1) < ATOL
    # the mask is not a disguised causal mask: documents are cut and the block sees ahead
    assert max_diff(dense[:, 8:], causal[:, 8:]) > 1e-3


def test_bidirectional_block_sees_ahead(debug_model):
    ids = random_ids(debug_model, 1, 20, seed=21)
    changed = ids.clone()
    changed[0, 15] = (ids[0, 15] + 77) % debug_model.config.vocab_size  # last token of the block
    block_mask = block_from_mask_mod(document_mask_mod(DOC_IDS, BLOCK_IDS), 1, 20, 20)
    with torch.no_grad():
        a = debug_model(ids, positions=packed_positions(), mask=block_mask)
        b = debug_model(changed, positions=packed_positions(), mask=block_mask)
    assert max_diff(a[:, :12], b[:, :12]) < 1e-6  # first document and the pre-block prefix: unaffected
    assert max_diff(a[:, 12], b[:, 12]) > 1e-3  # the block's first token sees its last one


def test_flex_with_gradients_falls_back_and_matches(debug_model):
    ids = random_ids(debug_model, 1, 20, seed=22)
    mm = document_mask_mod(DOC_IDS, BLOCK_IDS)
    pos = packed_positions()
    with torch.no_grad():
        ref = debug_model(ids, positions=pos, mask=block_from_mask_mod(mm, 1, 20, 20))

    def loss_and_grads(mask):
        debug_model.zero_grad(set_to_none=True)
        logits = debug_model(ids, positions=pos, mask=mask)
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in debug_model.named_parameters()}

    flex_logits, flex_grads = loss_and_grads(block_from_mask_mod(mm, 1, 20, 20))
    dense_logits, dense_grads = loss_and_grads(dense_from_mask_mod(mm, 1, 20, 20))
    assert max_diff(flex_logits, ref) < ATOL
    assert max_diff(dense_logits, ref) < ATOL
    q_grad = flex_grads["model.layers.0.self_attn.q_proj.weight"]
    assert q_grad.abs().max() > 0
    for name in flex_grads:
        assert torch.allclose(flex_grads[name], dense_grads[name], atol=1e-6, rtol=1e-4), name


def test_purely_causal_dense_mask_equals_causal_path(debug_model):
    ids = random_ids(debug_model, 2, 18, seed=23)
    mm = document_mask_mod(torch.zeros(2, 18, dtype=torch.long))  # one document, no blocks
    dense = dense_from_mask_mod(mm, 2, 18, 18)
    assert torch.equal(dense[:, 0], torch.ones(18, 18, dtype=torch.bool).tril().expand(2, 18, 18))
    with torch.no_grad():
        causal = debug_model(ids)
        assert max_diff(debug_model(ids, mask=dense), causal) < ATOL
        assert max_diff(debug_model(ids, mask=block_from_mask_mod(mm, 2, 18, 18)), causal) < ATOL


# --------------------------------------------------------------------------------------- QK-norm

def _paths(model, ids):
    """Logits on each attention path: plain causal, dense mask, flex BlockMask, cached one-token decoding."""
    T = ids.shape[1]
    mm = document_mask_mod(torch.zeros(1, T, dtype=torch.long))
    with torch.no_grad():
        cache = model.new_cache(1, 32)
        model(ids[:, :-1], cache=cache)
        return {
            "causal": model(ids),
            "dense": model(ids, mask=dense_from_mask_mod(mm, 1, T, T)),
            "flex": model(ids, mask=block_from_mask_mod(mm, 1, T, T)),
            "cached": model(ids[:, -1:], cache=cache),
        }


def test_qk_norm_applied_on_every_path():
    """RMSNorm on q and k makes attention invariant to scaling q_proj/k_proj; without QK-norm the
    scores would grow 49-fold. The control shows that q_norm.weight is used on each path.
    The debug preset with eps ~0, so that the invariance is exact up to rounding (with eps 1e-5 and
    std-0.02 weights, eps alone moves the logits by ~2e-4)."""
    torch.manual_seed(0)
    debug_model = Transformer(preset("debug").replace(rms_norm_eps=1e-12)).eval()
    ids = random_ids(debug_model, 1, 12, seed=30)
    base = _paths(debug_model, ids)

    scaled = copy.deepcopy(debug_model)
    with torch.no_grad():
        for layer in scaled.model.layers:
            layer.self_attn.q_proj.weight.mul_(7.0)
            layer.self_attn.k_proj.weight.mul_(7.0)
    got = _paths(scaled, ids)

    control = copy.deepcopy(debug_model)
    with torch.no_grad():
        for layer in control.model.layers:
            layer.self_attn.q_norm.weight.mul_(3.0)
    ctrl = _paths(control, ids)

    # all paths agree with each other at the base weights, too
    assert max_diff(base["dense"], base["causal"]) < ATOL and max_diff(base["flex"], base["causal"]) < ATOL
    assert max_diff(base["cached"][:, 0], base["causal"][:, -1]) < ATOL
    for name in base:
        assert max_diff(got[name], base[name]) < 1e-5, f"{name}: QK-norm missing on this path"
        assert max_diff(ctrl[name], base[name]) > 1e-3, f"{name}: q_norm.weight has no effect on this path"


# ------------------------------------------------------------------------------------- model.info

def test_info_34b_counts_from_spec_sizes():
    C, F, L, H, K, D = 5120, 25600, 64, 64, 8, 128
    V = 151643 + 211 + 131072
    assert V == 282926  # SPEC §1's vocabulary is exactly SPEC §2's layout
    per_layer = (C * H * D + 2 * C * K * D + H * D * C  # q, k, v, o
                 + 3 * C * F  # gate, up, down
                 + 2 * D + 2 * C)  # q_norm, k_norm, two RMSNorms
    layers, embeddings = L * per_layer, 2 * V * C  # untied lm_head
    total = layers + embeddings + C  # + final norm
    proc = subprocess.run([sys.executable, "-m", "model.info", "--preset", "emu3.5-34b"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout

    def line(key):
        m = re.search(rf"^{key}\s+(\S+)\s+\(([\d,]+) parameters\)", out, re.M)
        assert m, f"no {key} line in:\n{out}"
        return m.group(1), int(m.group(2).replace(",", ""))

    assert line("total") == ("34.1B", total)
    assert line("layers") == ("31.2B", layers)
    assert line("embeddings") == ("2.9B", embeddings)
    assert re.search(r"bf16 size\s+68\.2 GB", out), out


def test_info_unknown_preset_fails():
    proc = subprocess.run([sys.executable, "-m", "model.info", "--preset", "nope"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    for name in ("debug", "demo", "emu3.5-34b"):
        assert name in proc.stderr


def test_bench_decode_unknown_preset_is_a_usage_error(capsys):
    """bench/decode.py parses its arguments at the edge: a bad --preset is a usage error, no traceback."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_decode", REPO / "bench" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as e:
        bench.main(["--preset", "emu3.5-7b", "--prompt", "4", "--new", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and "preset" in err
    for name in ("debug", "demo", "emu3.5-34b"):
        assert name in err


def test_model_file_legends():
    """House style 3: model files that name shapes open with a legend of their letters."""
    import model.attention
    import model.sampling

    for module, letters in ((model.attention, "BHKTSD"), (model.sampling, "BV")):
        legend = [line for line in module.__doc__.splitlines() if line.startswith("Legend:")]
        assert len(legend) == 1, module.__name__
        assert all(re.search(rf"\b{c}\b", legend[0]) for c in letters), legend[0]


# ---------------------------------------------------------------------------------- ValueErrors

def test_unknown_preset_raises():
    with pytest.raises(ValueError, match=r"preset.*'debug'.*'demo'.*'emu3\.5-34b'"):
        preset("emu3.5-7b")


def test_heads_not_divisible_raises():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=6, num_kv_heads=4,
                    head_dim=16, max_position_embeddings=64, num_text_tokens=256, codebook_size=16)


def test_vocab_below_layout_raises():
    cfg = preset("debug")
    assert cfg.vocab_size == 512 + 211 + 256
    with pytest.raises(ValueError, match="vocab_size"):
        cfg.replace(vocab_size=512 + 211 + 256 - 1)
    assert cfg.replace(vocab_size=1024).vocab_size == 1024  # padding up is allowed


def test_debug_preset_is_gqa_with_explicit_head_dim():
    cfg = preset("debug")
    model = Transformer(cfg)
    attn = model.model.layers[0].self_attn
    assert cfg.num_kv_heads < cfg.num_heads and cfg.num_heads * cfg.head_dim != cfg.hidden_size
    assert attn.q_proj.weight.shape == (cfg.num_heads * cfg.head_dim, cfg.hidden_size)
    assert attn.k_proj.weight.shape == (cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size)
    assert attn.q_norm.weight.shape == (cfg.head_dim,)
    assert all(b is None for m in model.modules() for n, b in m.named_parameters(recurse=False) if n == "bias")


# --------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_cuda_matches_cpu(debug_model):
    ids = random_ids(debug_model, 2, 16, seed=40)
    with torch.no_grad():
        ref = debug_model(ids)
        gpu = debug_model.to("cuda")
        full = gpu(ids.cuda())
        cache = gpu.new_cache(2, 32)
        inc = torch.cat([gpu(ids[:, :8].cuda(), cache=cache)]
                        + [gpu(ids[:, i:i + 1].cuda(), cache=cache) for i in range(8, 16)], 1)
    assert max_diff(full.cpu(), ref) < 1e-4
    assert max_diff(inc.cpu(), ref) < 1e-4
