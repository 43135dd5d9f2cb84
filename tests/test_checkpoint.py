"""Checkpoint I/O (model/checkpoint.py): our layout round trip, and a miniature checkpoint in the
OFFICIAL Emu3.5 layout checked against (a) an independent reference forward written here from
SPEC §1 with plain torch, reading the shard files directly, and (b) transformers' Qwen3ForCausalLM,
which implements the same architecture. Then the ValueErrors for broken checkpoints."""

import json
import math
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.checkpoint import load_pretrained, save_pretrained
from model.config import ModelConfig, preset
from model.transformer import Transformer

SAMPLE = ("You are a helpful assistant for story task. USER: Once upon a time 64*64 "
          "<|image start|>12*34<|image token|><|visual token 000007|><|extra_200|><|image end|> ASSISTANT: ")


def mini_config() -> ModelConfig:
    """GQA (4 q / 2 kv heads), head_dim*heads = 64 != hidden 48, 3 layers, non-default rope_theta and eps,
    the BPE fixture's vocabulary layout (512 text ids, 256 codes)."""
    return ModelConfig(hidden_size=48, intermediate_size=80, num_layers=3, num_heads=4, num_kv_heads=2,
                       head_dim=16, max_position_embeddings=256, num_text_tokens=512, codebook_size=256,
                       rope_theta=10000.0, rms_norm_eps=1e-6)


def randomize(model: Transformer, seed: int) -> Transformer:
    """Random weights large enough for sharp attention, and norm weights that are not all ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model.eval()


def sample_ids(tokenizer, extra_codes=(3, 200, 17)):
    ids = tokenizer.encode(SAMPLE) + [tokenizer.vocab.visual(c) for c in extra_codes]
    return torch.tensor([ids])


# ------------------------------------------------------------------------------------ our layout

@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 40_000])
def test_our_layout_round_trip(tmp_path, debug_model, bpe, max_shard_bytes):
    randomize(debug_model, seed=1)
    save_pretrained(debug_model, str(tmp_path), max_shard_bytes=max_shard_bytes)
    files = sorted(os.listdir(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "worldsim" and "tokenizer.json" in files
    shards = [f for f in files if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)]
    if max_shard_bytes > 2**20:
        assert "model.safetensors" in files and not shards
    else:
        assert "model.safetensors.index.json" in files and len(shards) >= 2 and "model.safetensors" not in files

    loaded = load_pretrained(str(tmp_path))
    assert loaded.config == debug_model.config
    assert loaded.vocab == bpe.vocab
    ids = sample_ids(bpe)
    with torch.no_grad():
        assert torch.equal(loaded(ids), debug_model(ids))
    for text in (SAMPLE, "Turn left. Walk to the door 0123456789 ünïcödé"):
        assert loaded.tokenizer.encode(text) == bpe.encode(text)
        assert loaded.tokenizer.decode(bpe.encode(text)) == bpe.decode(bpe.encode(text))


# ------------------------------------------------------------------------- official miniature

@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, bpe):
    """A miniature official-layout checkpoint (fp32, sharded) and the model it was written from."""
    path = tmp_path_factory.mktemp("official")
    model = randomize(Transformer(mini_config()), seed=2)
    save_pretrained(model, str(path), layout="official", tokenizer=bpe, max_shard_bytes=100_000)
    return path, model


def test_official_layout_files(official_dir):
    path, model = official_dir
    files = set(os.listdir(path))
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "Emu3" and raw["architectures"] == ["Emu3ForCausalLM"]
    assert {"emu3.tiktoken", "emu3_vision_tokens.txt", "model.safetensors.index.json"} <= files
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    assert set(shards) <= files and "model.safetensors" not in files
    # every tensor is where the index says, under its official name
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(3) for n in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(index["weight_map"]) == expected
    for key, shard in index["weight_map"].items():
        with safe_open(str(path / shard), framework="pt") as f:
            assert key in f.keys()
    # the vision-token file follows SPEC §2: IMG, BOI, EOI, then the codes in order
    lines = (path / "emu3_vision_tokens.txt").read_text().splitlines()
    assert len(lines) == 3 + 256
    assert lines[:4] == ["<|image token|>", "<|image start|>", "<|image end|>", "<|visual token 000000|>"]
    assert lines[-1] == "<|visual token 000255|>"
    assert len((path / "emu3.tiktoken").read_text().splitlines()) == 512


def read_official(path):
    """config.json and every tensor, straight from the shard files."""
    cfg = json.loads((path / "config.json").read_text())
    index = json.loads((path / "model.safetensors.index.json").read_text())
    sd = {}
    for shard in sorted(set(index["weight_map"].values())):
        sd.update(load_file(str(path / shard)))
    return cfg, sd


def reference_forward(cfg: dict, sd: dict, ids: torch.Tensor) -> torch.Tensor:
    """SPEC §1 in plain torch, fp32. ids (B, T) -> logits (B, T, V)."""
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    H, K, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    B, T = ids.shape

    def rms(x, w):
        x32 = x.float()
        return w * (x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + eps)).to(x.dtype)

    # NeoX rotate-half: pair dimension i with i + D/2, frequency theta^(-2i/D)
    half = D // 2
    freq = torch.tensor([theta ** (-2.0 * i / D) for i in range(half)], dtype=torch.float64)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freq[None]  # (T, D/2)
    cos, sin = ang.cos().float(), ang.sin().float()

    def rope(x):  # (B, heads, T, D)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = sd["model.embed_tokens.weight"][ids]  # (B, T, C)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(B, T, H, D)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(B, T, K, D)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(B, T, K, D)
        q = rope(rms(q, sd[p + "self_attn.q_norm.weight"]).transpose(1, 2))  # (B, H, T, D)
        k = rope(rms(k, sd[p + "self_attn.k_norm.weight"]).transpose(1, 2))  # (B, K, T, D)
        v = v.transpose(1, 2)
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # (B, H, T, D)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # (B, H, T, D)
        x = x + att.transpose(1, 2).reshape(B, T, H * D) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def test_official_matches_reference_forward(official_dir, bpe):
    path, _ = official_dir
    cfg, sd = read_official(path)
    assert cfg["rope_theta"] == 10000.0 and cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]
    assert not all(torch.all(v == 1) for k, v in sd.items() if k.endswith("norm.weight"))

    model = load_pretrained(str(path))
    assert model.config == mini_config()
    assert model.vocab == bpe.vocab
    ids = sample_ids(model.tokenizer)
    assert ids.tolist() == sample_ids(bpe).tolist()  # the tiktoken files tokenize like the BPE
    ids = torch.cat([ids, ids.roll(5, 1)])  # two different rows
    with torch.no_grad():
        ours = model(ids)
    ref = reference_forward(cfg, sd, ids)
    assert ours.shape == ref.shape == (2, ids.shape[1], cfg["vocab_size"])
    assert ref.abs().max() > 1.0  # logits of a useful size, so the tolerance means something
    assert (ours - ref).abs().max().item() < 2e-5


def test_reference_forward_is_sensitive(official_dir):
    """The reference is not vacuous: it sees rope_theta, the QK-norm weights and the causal order."""
    path, _ = official_dir
    cfg, sd = read_official(path)
    ids = torch.arange(100, 120)[None]
    base = reference_forward(cfg, sd, ids)
    assert (reference_forward({**cfg, "rope_theta": 1e6}, sd, ids) - base).abs().max() > 1e-3
    sd2 = dict(sd, **{"model.layers.1.self_attn.k_norm.weight": sd["model.layers.1.self_attn.k_norm.weight"] * 2})
    assert (reference_forward(cfg, sd2, ids) - base).abs().max() > 1e-3
    changed = ids.clone()
    changed[0, 10] = 300
    out = reference_forward(cfg, sd, changed)
    assert (out[:, :10] - base[:, :10]).abs().max() < 1e-6 and (out[:, 10] - base[:, 10]).abs().max() > 1e-3


def test_official_matches_transformers_qwen3(official_dir):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path, _ = official_dir
    cfg, sd = read_official(path)
    hf_cfg = Qwen3Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"],
        max_position_embeddings=cfg["max_position_embeddings"], rms_norm_eps=cfg["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]},
        tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0, hidden_act="silu",
        use_sliding_window=False)
    hf_cfg._attn_implementation = "eager"
    hf = Qwen3ForCausalLM(hf_cfg).eval()
    assert hf.config._attn_implementation == "eager"
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)

    ids = torch.tensor([[5, 99, 400, 511, 600, 723, 900, 978, 15, 9, 16, 300]])
    ours = load_pretrained(str(path))
    with torch.no_grad():
        a, b = ours(ids), hf(input_ids=ids).logits
    assert a.shape == b.shape
    assert b.abs().max() > 1.0
    assert (a - b).abs().max().item() < 1e-4


def test_official_load_bfloat16(official_dir):
    path, _ = official_dir
    fp32, bf16 = load_pretrained(str(path)), load_pretrained(str(path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    ids = torch.tensor([[1, 2, 3, 50, 600, 723, 800, 15, 9]])
    with torch.no_grad():
        a, b = fp32(ids), bf16(ids)
    assert b.dtype == torch.bfloat16
    err = (a - b.float()).abs().max().item()
    assert err < 0.05 * a.abs().max().item(), err
    # and the cache takes the model's dtype
    with torch.no_grad():
        cache = bf16.new_cache(1, 16)
        assert cache.k.dtype == torch.bfloat16
        inc = torch.cat([bf16(ids[:, :5], cache=cache), bf16(ids[:, 5:], cache=cache)], 1)
    assert (inc.float() - b.float()).abs().max().item() < 0.05 * a.abs().max().item()


# --------------------------------------------------------------------------------- broken input

def copy_of(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def rewrite_shard_of(path, key, fn):
    """Apply fn(state dict of the shard holding `key`) and write that shard back."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"][key]
    sd = load_file(str(shard))
    fn(sd)
    save_file(sd, str(shard), metadata={"format": "pt"})


@pytest.mark.parametrize("field", ["num_key_value_heads", "rope_theta", "hidden_size"])
def test_official_missing_config_field(official_dir, tmp_path, field):
    path = copy_of(official_dir[0], tmp_path)
    edit_config(path, lambda c: c.pop(field))
    with pytest.raises(ValueError, match=field):
        load_pretrained(str(path))


def test_official_rope_theta_from_rope_parameters(official_dir, tmp_path, bpe):
    """transformers-5 style: rope_theta inside rope_parameters is read too (same logits)."""
    path = copy_of(official_dir[0], tmp_path)
    edit_config(path, lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": c.pop("rope_theta")}))
    ids = torch.tensor([[10, 20, 30, 40, 600, 700]])
    with torch.no_grad():
        assert torch.equal(load_pretrained(str(path))(ids), load_pretrained(str(official_dir[0]))(ids))


def test_official_wrong_model_type(official_dir, tmp_path):
    path = copy_of(official_dir[0], tmp_path)
    edit_config(path, lambda c: c.update(model_type="qwen3"))
    with pytest.raises(ValueError, match="model_type"):
        load_pretrained(str(path))


@pytest.mark.parametrize("head_dim_entry", ["deleted", "null"])
def test_official_missing_head_dim_is_read_from_q_norm(official_dir, tmp_path, head_dim_entry):
    """Without head_dim in config.json, hidden/heads (48/4 = 12) would be wrong, as for the 34B model
    (5120/64 = 80, not 128): the per-head q_norm weight's length (16) gives it, read from the shard header."""
    path = copy_of(official_dir[0], tmp_path)
    edit_config(path, lambda c: c.pop("head_dim") if head_dim_entry == "deleted" else c.update(head_dim=None))
    cfg, sd = read_official(official_dir[0])
    assert cfg["hidden_size"] // cfg["num_attention_heads"] != cfg["head_dim"] == 16
    model = load_pretrained(str(path))
    assert model.config == mini_config()
    ids = torch.tensor([[10, 20, 30, 40, 600, 700, 723, 978]])
    with torch.no_grad():
        assert torch.equal(model(ids), official_dir[1](ids))
        assert (model(ids) - reference_forward(cfg, sd, ids)).abs().max().item() < 2e-5


def test_official_head_dim_from_q_norm_of_a_single_file(official_dir, tmp_path):
    """The same inference when the weights are one model.safetensors without an index."""
    path = copy_of(official_dir[0], tmp_path)
    edit_config(path, lambda c: c.pop("head_dim"))
    _, sd = read_official(path)
    for f in os.listdir(path):
        if f.startswith("model-") or f == "model.safetensors.index.json":
            os.remove(path / f)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    assert load_pretrained(str(path)).config == mini_config()


def test_official_missing_head_dim_and_q_norm_is_a_shape_error(official_dir, tmp_path):
    """With neither head_dim nor layer 0's q_norm, hidden/heads = 12 is assumed; q_proj (64, 48) then
    does not fit, and the error names the tensor."""
    key = "model.layers.0.self_attn.q_norm.weight"
    path = copy_of(official_dir[0], tmp_path)
    edit_config(path, lambda c: c.pop("head_dim"))
    rewrite_shard_of(path, key, lambda sd: sd.pop(key))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"self_attn\.[qkvo]_(proj|norm)\.weight.* expected \((12|48, 48)\b"):
        load_pretrained(str(path))


def test_official_wrong_shape(official_dir, tmp_path):
    key = "model.layers.1.self_attn.k_proj.weight"
    path = copy_of(official_dir[0], tmp_path)
    rewrite_shard_of(path, key, lambda sd: sd.update({key: torch.zeros(16, 48)}))  # should be (32, 48)
    with pytest.raises(ValueError, match=re.escape(key)):
        load_pretrained(str(path))


def test_official_missing_tensor(official_dir, tmp_path):
    key = "model.layers.2.mlp.up_proj.weight"
    path = copy_of(official_dir[0], tmp_path)
    rewrite_shard_of(path, key, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=re.escape(key)):
        load_pretrained(str(path))


def test_official_unexpected_tensor(official_dir, tmp_path):
    key, extra = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.extra_proj.weight"
    path = copy_of(official_dir[0], tmp_path)
    rewrite_shard_of(path, key, lambda sd: sd.update({extra: torch.zeros(3)}))
    with pytest.raises(ValueError, match=re.escape(extra)):
        load_pretrained(str(path))


@pytest.fixture
def our_dir(tmp_path, debug_model):
    save_pretrained(debug_model, str(tmp_path / "ours"))
    return tmp_path / "ours"


def test_our_layout_unknown_field(our_dir):
    edit_config(our_dir, lambda c: c.update(num_experts=8))
    with pytest.raises(ValueError, match="num_experts"):
        load_pretrained(str(our_dir))


def test_our_layout_missing_field(our_dir):
    edit_config(our_dir, lambda c: c.pop("num_kv_heads"))
    with pytest.raises(ValueError, match="num_kv_heads"):
        load_pretrained(str(our_dir))


def test_our_layout_wrong_shape_names_key(our_dir):
    edit_config(our_dir, lambda c: c.update(intermediate_size=160))  # the stored MLP is 176 wide
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight"):
        load_pretrained(str(our_dir))


def test_our_layout_config_disagrees_with_tokenizer(our_dir):
    edit_config(our_dir, lambda c: c.update(num_text_tokens=400))  # tokenizer.json holds 512 text ids
    with pytest.raises(ValueError, match="num_text_tokens"):
        load_pretrained(str(our_dir))


def test_debug_preset_unchanged_by_round_trip_dict():
    cfg = preset("debug")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------ saving over old saves

def test_resave_single_file_over_sharded_loads_new_weights(tmp_path, bpe):
    torch.manual_seed(0)
    old = Transformer(preset("debug")).eval()
    torch.manual_seed(1)
    new = Transformer(preset("debug")).eval()
    save_pretrained(old, str(tmp_path), tokenizer=bpe, max_shard_bytes=40_000)  # sharded, with an index
    save_pretrained(new, str(tmp_path), tokenizer=bpe)  # same folder, now small enough for one file
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "tokenizer.json"]
    ids = torch.tensor([[1, 2, 3, 600, 900]])
    with torch.no_grad():
        assert torch.equal(load_pretrained(str(tmp_path))(ids), new(ids))


def test_official_save_with_bpe_smaller_than_num_text_tokens_is_refused_before_writing(tmp_path):
    from model.text_tokenizer import BPETokenizer, builtin_corpus

    small = BPETokenizer.train(builtin_corpus(), 1024, 256)  # the corpus only supports ~522 tokens
    assert len(small.ranks()) < 1024
    model = randomize(Transformer(preset("debug").replace(num_text_tokens=1024, vocab_size=0)), seed=3)
    target = tmp_path / "ckpt"
    with pytest.raises(ValueError, match="num_text_tokens"):
        save_pretrained(model, str(target), layout="official", tokenizer=small)
    assert not target.exists()  # nothing half-written
