"""Checkpoint I/O for the decoder: the official Hub layout and our own (SPEC §1).

Official (BAAI/Emu3.5, Emu3.5-Image): `config.json` with model_type "Emu3", sharded
`model-000NN-of-000MM.safetensors` with `model.safetensors.index.json`, and the tokenizer files
`emu3.tiktoken` + `emu3_vision_tokens.txt`, from which the vocabulary layout is derived. A config.json
without `head_dim` gets it from the stored `model.layers.0.self_attn.q_norm.weight` (its shape, read from
the safetensors header), since hidden/heads is wrong for Emu3.5; hidden/heads is only the last resort.

Ours: `config.json` = {"model_type": "worldsim", "format_version": 1, <ModelConfig fields>},
`model.safetensors` (one file, or shards with an index as above) and `tokenizer.json` (our BPE) or the
official tokenizer files. Tensor names are the official ones in both layouts.
"""

from __future__ import annotations

import json
import os

import torch

from model.config import ModelConfig, from_official_config, to_official_config
from model.text_tokenizer import BPE_FILE, TIKTOKEN_FILE, VISION_TOKENS_FILE, BPETokenizer, TiktokenTokenizer
from model.transformer import Transformer
from model.vocab import Vocab

FORMAT_VERSION = 1
OUR_MODEL_TYPE = "worldsim"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some exporters write; recomputed here
# a per-head RMSNorm weight, (head_dim,): gives head_dim when config.json omits it
HEAD_DIM_KEY = "model.layers.0.self_attn.q_norm.weight"


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint: {path} not found")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"checkpoint: {path} is not valid JSON ({e})") from None


def _load_tokenizer(path: str, num_text_tokens: int | None, codebook_size: int | None):
    """The text tokenizer in the folder, or None."""
    if os.path.isfile(os.path.join(path, TIKTOKEN_FILE)):
        return TiktokenTokenizer.from_dir(path)
    if os.path.isfile(os.path.join(path, BPE_FILE)) and num_text_tokens is not None:
        return BPETokenizer.from_file(os.path.join(path, BPE_FILE), num_text_tokens, codebook_size)
    return None


def read_config(path: str) -> tuple[ModelConfig, object]:
    """(ModelConfig, text tokenizer or None) of a checkpoint folder, either layout."""
    raw = _read_json(os.path.join(path, "config.json"))
    if raw.get("model_type") == OUR_MODEL_TYPE:
        fields = {k: v for k, v in raw.items() if k not in ("model_type", "format_version")}
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"config.json: format_version must be {FORMAT_VERSION}, got {raw.get('format_version')!r}")
        config = ModelConfig.from_dict(fields)
        tokenizer = _load_tokenizer(path, config.num_text_tokens, config.codebook_size)
        if tokenizer is not None and (tokenizer.vocab.num_text_tokens, tokenizer.vocab.codebook_size) != \
                (config.num_text_tokens, config.codebook_size):
            raise ValueError(f"config.json: num_text_tokens/codebook_size {config.num_text_tokens}/"
                             f"{config.codebook_size} disagree with the tokenizer files "
                             f"({tokenizer.vocab.num_text_tokens}/{tokenizer.vocab.codebook_size})")
        return config, tokenizer
    tokenizer = _load_tokenizer(path, None, None)
    if tokenizer is not None:
        layout = tokenizer.vocab
    elif raw.get("vocab_size") == Vocab().size:
        layout = Vocab()  # the released vocabulary, even without its tokenizer files
    else:
        raise ValueError(f"checkpoint: {path} has no {TIKTOKEN_FILE}; the official layout derives its "
                         f"vocabulary from {TIKTOKEN_FILE} and emu3_vision_tokens.txt")
    head_dim = None
    if raw.get("head_dim") is None:  # hidden/heads is wrong for Emu3.5 (SPEC §1): ask the weights
        shape = _stored_shape(path, HEAD_DIM_KEY)
        if shape is not None:
            if len(shape) != 1:
                raise ValueError(f"checkpoint: tensor {HEAD_DIM_KEY!r} has shape {shape}, expected (head_dim,)")
            head_dim = shape[0]
    config = from_official_config(raw, num_text_tokens=layout.num_text_tokens, codebook_size=layout.codebook_size,
                                  checkpoint_head_dim=head_dim)
    return config, tokenizer


def _stored_shape(path: str, key: str) -> tuple[int, ...] | None:
    """Shape of tensor `key` from the safetensors header of the file holding it (found through the
    index, else model.safetensors), without loading any tensor; None when it is not stored."""
    from safetensors import safe_open

    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or key not in weight_map:
            return None
        file = os.path.join(path, weight_map[key])
    else:
        file = os.path.join(path, SINGLE_FILE)
    if not os.path.isfile(file):
        return None
    with safe_open(file, framework="pt") as f:
        return tuple(f.get_slice(key).get_shape()) if key in f.keys() else None


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"checkpoint: {index} has no weight_map")
        return [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise ValueError(f"checkpoint: {path} has neither {INDEX_FILE} nor {SINGLE_FILE}")


def load_pretrained(path: str, device="cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Load a decoder from a checkpoint folder in either layout.

    Returns a Transformer whose call on input_ids (B, T) gives logits (B, T, V), with `.config`,
    `.vocab` and `.tokenizer` (None when the folder has no tokenizer files). dtype None keeps the
    stored dtype. Missing, unexpected or misshapen tensors raise ValueError naming the key.
    """
    from safetensors import safe_open

    if not os.path.isdir(path):
        raise ValueError(f"path: {path} is not a checkpoint folder")
    config, tokenizer = read_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {}
    for file in _weight_files(path):
        if not os.path.isfile(file):
            raise ValueError(f"checkpoint: shard {file} listed in the index is missing")
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key.endswith(_IGNORED_SUFFIXES):
                    continue
                if key not in expected:
                    raise ValueError(f"checkpoint: unexpected tensor {key!r} in {os.path.basename(file)}")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[key]:
                    raise ValueError(f"checkpoint: tensor {key!r} has shape {shape}, expected {expected[key]} "
                                     "from config.json")
                t = f.get_tensor(key)
                state[key] = t.to(dtype) if dtype is not None else t
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"checkpoint: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, assign=True, strict=True)
    model.vocab = tokenizer.vocab if tokenizer is not None else Vocab(config.num_text_tokens, config.codebook_size)
    model.tokenizer = tokenizer
    return model.eval()


def save_pretrained(model: Transformer, path: str, *, layout: str = "worldsim", tokenizer=None,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` to `path`. layout "worldsim" (ours) or "official" (the Hub layout, always with an
    index). The tokenizer (default: model.tokenizer) is written beside it: the official layout needs
    the tiktoken files, so a BPE is converted to ranks (its ids are its merge order)."""
    from safetensors.torch import save_file

    if layout not in ("worldsim", "official"):
        raise ValueError(f"layout: unknown {layout!r}; allowed: ['worldsim', 'official']")
    tokenizer = tokenizer or model.tokenizer
    if layout == "official" and isinstance(tokenizer, BPETokenizer):
        if len(tokenizer.ranks()) != model.config.num_text_tokens:
            raise ValueError(f"num_text_tokens: the official layout derives it from {TIKTOKEN_FILE}, but the BPE "
                             f"has {len(tokenizer.ranks())} tokens and the model reserves "
                             f"{model.config.num_text_tokens}; train the BPE to the full size")
        tokenizer = TiktokenTokenizer(tokenizer.ranks(), tokenizer.vocab)
    os.makedirs(path, exist_ok=True)
    _remove_previous_save(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    if layout == "official":
        config = to_official_config(model.config, torch_dtype=dtype)
    else:
        config = {"model_type": OUR_MODEL_TYPE, "format_version": FORMAT_VERSION, **model.config.to_dict()}
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)

    shards, current, size = [], {}, 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += n
    shards.append(current)
    if layout == "worldsim" and len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    if tokenizer is not None:
        tokenizer.save(path)


def _remove_previous_save(path: str) -> None:
    """Delete the files an earlier save may have left (weights, index, tokenizer), so a new save never
    mixes with them: the loader prefers an index over a single file and tiktoken files over a BPE."""
    import re

    ours = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
    for name in os.listdir(path):
        if name in (SINGLE_FILE, INDEX_FILE, BPE_FILE, TIKTOKEN_FILE, VISION_TOKENS_FILE) or ours.fullmatch(name):
            os.remove(os.path.join(path, name))
