"""Trainer of the small byte-level BPE text tokenizer (Hugging Face `tokenizers`, through
model.text_tokenizer.BPETokenizer.train; SPEC §2: Qwen's split regex, digits one token each, and '*',
'0'..'9' at ids 9 and 15..24).

    python -m train.text_bpe --recipe debug --out runs/tok-debug
    python -m train.text_bpe --recipe demo --text corpus.txt more/ --shards data/ --out runs/tok-demo

Text comes from plain files (.txt/.md, or folders of them: one document per file), from the text of dataset
shards (questions and text segments: the words the model will actually read) and, unless
`include_builtin=False`, model.text_tokenizer.builtin_corpus(). The trained BPE must have exactly
`num_text_tokens` ids, the text range of the model preset it is for; a corpus too small to learn that many
merges is a ValueError (the pretraining trainer rejects a tokenizer of another size). Writes
`out_dir/tokenizer.json` and prints a one-line JSON summary (vocabulary size, bytes per token on the corpus).
There are no optimizer steps here: training is one deterministic pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

TEXT_EXTENSIONS = (".txt", ".md")


@dataclass
class BPEConfig:
    out_dir: str = "runs/tokenizer"
    num_text_tokens: int = 512
    codebook_size: int = 256
    text: tuple[str, ...] = ()  # text files or folders
    shards: tuple[str, ...] = ()  # dataset shards or folders of shards
    include_builtin: bool = True


def debug() -> BPEConfig:
    """For the `debug` model preset: 512 text ids, learned from the built-in corpus alone."""
    return BPEConfig(out_dir="runs/tokenizer-debug", num_text_tokens=512, codebook_size=256)


def demo() -> BPEConfig:
    """For the `demo` preset: 4096 text ids; needs a real corpus (text= and/or shards=)."""
    return BPEConfig(out_dir="runs/tokenizer-demo", num_text_tokens=4096, codebook_size=2048)


RECIPES = {f.__name__: f for f in (debug, demo)}


def corpus(cfg: BPEConfig) -> list[str]:
    from model.text_tokenizer import builtin_corpus
    from train.data.format import read_shard, shard_paths

    texts: list[str] = []
    for p in cfg.text:
        if os.path.isdir(p):
            files = sorted(os.path.join(r, n) for r, _, ns in os.walk(p) for n in ns if n.endswith(TEXT_EXTENSIONS))
        elif os.path.isfile(p):
            files = [p]
        else:
            raise ValueError(f"text: {p} not found")
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                texts.append(fh.read())
    if cfg.shards:
        for path in shard_paths(cfg.shards):
            for rec in read_shard(path):
                parts = [p for t in [rec, *rec.get("turns", [])]
                         for p in [t["question"]] + [s["text"] for s in t["answer"] if "text" in s]]
                texts.append(" ".join(p for p in parts if p))
    if cfg.include_builtin:
        texts += builtin_corpus()
    if not texts:
        raise ValueError("text: the corpus is empty; give text=, shards= or include_builtin=True")
    return texts


def main(cfg: BPEConfig) -> dict:
    from model.text_tokenizer import BPETokenizer

    texts = corpus(cfg)
    tok = BPETokenizer.train(texts, cfg.num_text_tokens, cfg.codebook_size)
    learned = len(tok.ranks())
    if learned != cfg.num_text_tokens:
        raise ValueError(f"num_text_tokens: the corpus ({sum(map(len, texts))} characters) yields only {learned} "
                         f"tokens, not {cfg.num_text_tokens}; give more text or a smaller num_text_tokens")
    tok.save(cfg.out_dir)
    sample = "\n".join(texts)
    n_bytes, n_tokens = len(sample.encode("utf-8")), len(tok.encode_text(sample))
    summary = {"num_text_tokens": learned, "codebook_size": cfg.codebook_size, "documents": len(texts),
               "bytes_per_token": round(n_bytes / max(1, n_tokens), 3),
               "tokenizer": os.path.join(cfg.out_dir, "tokenizer.json")}
    with open(os.path.join(cfg.out_dir, "train_config.json"), "w", encoding="utf-8") as f:
        json.dump({"config_type": "BPEConfig", **dataclasses.asdict(cfg)}, f, indent=2)
    print(json.dumps(summary))
    return summary


def cli(argv) -> BPEConfig:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="debug", choices=sorted(RECIPES))
    p.add_argument("--out")
    p.add_argument("--text", nargs="*", default=None)
    p.add_argument("--shards", nargs="*", default=None)
    p.add_argument("--num-text-tokens", type=int)
    p.add_argument("--codebook-size", type=int)
    p.add_argument("--no-builtin", action="store_true")
    a = p.parse_args(argv)
    cfg = RECIPES[a.recipe]()
    changes = {"out_dir": a.out, "text": tuple(a.text) if a.text else None,
               "shards": tuple(a.shards) if a.shards else None, "num_text_tokens": a.num_text_tokens,
               "codebook_size": a.codebook_size, "include_builtin": False if a.no_builtin else None}
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})


if __name__ == "__main__":
    try:
        main(cli(sys.argv[1:]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
