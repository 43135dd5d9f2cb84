"""Dataset shards of interleaved sequences, and their token ids (SPEC §2 sequence format, §7 losses).

Shard layout, version 1: a UTF-8 JSON-lines file `*.jsonl`.
- line 1, the header:
  `{"format": "worldsim-shard", "version": 1, "num_records": N, "codebook_size": M | null, "source": str}`
  `codebook_size` is the IBQ codebook the stored code grids come from (null when the shard holds no
  codes); `num_records` lets a truncated file be told apart from a short one.
- lines 2..N+1, one record each:
  `{"task": TASK, "question": str, "images": [IMAGE, ...], "answer": [SEGMENT, ...]}`, optionally with
  `"turns": [{"question": str, "images": [IMAGE, ...], "answer": [SEGMENT, ...]}, ...]`: follow-up
  user turns in the session engine's layout (worldsim/modes.py), for chat records only.
  TASK is one of `t2i x2i howto story explore vla` (chat records, written with SPEC §2's prompt
  template) or `interleaved` (a plain document: `BOS answer-segments EOS`; `question` and `images`
  must be empty; this is what video-interleaved pretraining data is).
  `images` are the prompt's images: after the question, except for x2i, where they come before it.
  SEGMENT is `{"text": str}` or `{"image": IMAGE}`.
  IMAGE is `{"codes": [[int, ...], ...]}` (h rows of w IBQ codes, any h and w: dynamic sizes) or
  `{"path": str}` (a raw image file, relative to the shard's folder or absolute, tokenized at
  training time by an IBQ: `encode_record(..., image_codes=...)`).

A chat record becomes ids as
`<BOS>You are a helpful assistant for {task} task.[ Please generate ...] USER: {question}{images} ASSISTANT: <extra_100>`
then the answer segments, each follow-up turn as
`<extra_101> USER: {question}{images} ASSISTANT: <extra_100>{answer}`, then `<extra_101>`, `<EOS>`. Adjacent text is joined before it is tokenized and
user text is never parsed for special tokens, so the ids equal those of the whole prompt string
encoded at inference (special tokens split the text there too).

Loss weights, one per token, are the weight of that token as a prediction target:
- `pretrain`: every token 1.0, visual codes `visual_weight` (0.5 in SPEC §7);
- `sft`: only the answers (their segments, each `<extra_101>`, and `<EOS>`) are loss-bearing, visual codes
  `visual_weight` (1.0); for `interleaved` records the whole document after BOS is the answer.
"Visual" means the code ids only; the image header, row breaks and BOI/EOI count as text. BOS has
weight 0 in both modes, so a packed row never asks one document to predict the next one's start.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

FORMAT = "worldsim-shard"
VERSION = 1
TASKS = ("t2i", "x2i", "howto", "story", "explore", "vla")
INTERLEAVED = "interleaved"
HOWTO_SENTENCE = " Please generate a response with interleaved text and images."
MODES = ("pretrain", "sft")


# ------------------------------------------------------------------------------------ records

def text(value: str) -> dict:
    return {"text": value}


def image_codes(codes) -> dict:
    """An image segment from an (h, w) code grid (nested lists, tensor or array)."""
    return {"image": {"codes": codes.tolist() if hasattr(codes, "tolist") else [list(r) for r in codes]}}


def image_path(path: str) -> dict:
    return {"image": {"path": path}}


def _images(images) -> list[dict]:
    return [im["image"] if "image" in im else im for im in (images or [])]


def record(task: str, answer: list[dict], question: str = "", images: list[dict] | None = None,
           turns: list[tuple] | None = None) -> dict:
    """Build and validate one record (`images`: IMAGE dicts, or image segments as made above;
    `turns`: follow-ups as (question, images, answer) tuples)."""
    rec = {"task": task, "question": question, "images": _images(images), "answer": answer}
    if turns:
        rec["turns"] = [{"question": q, "images": _images(ims), "answer": a} for q, ims, a in turns]
    validate_record(rec)
    return rec


def record_images(rec: dict) -> list[dict]:
    """Every IMAGE of a record: prompts' and answers', the follow-up turns' included."""
    return [im for t in [rec, *rec.get("turns", [])]
            for im in [*t.get("images", []), *(s["image"] for s in t["answer"] if "image" in s)]]


def map_images(rec: dict, fn: Callable[[dict], dict]) -> dict:
    """A copy of rec with every IMAGE (prompts' and answers', the follow-up turns' included) replaced by
    fn(IMAGE); text segments are copied."""
    def turn(t):
        return {"question": t["question"], "images": [fn(im) for im in t["images"]],
                "answer": [{"image": fn(seg["image"])} if "image" in seg else dict(seg) for seg in t["answer"]]}

    out = {"task": rec["task"], **turn(rec)}
    if rec.get("turns"):
        out["turns"] = [turn(t) for t in rec["turns"]]
    return out


def _check_image(im, where: str) -> None:
    if not isinstance(im, dict) or len(im) != 1 or not ({"codes", "path"} & set(im)):
        raise ValueError(f"{where}: an image must be {{'codes': [[...]]}} or {{'path': str}}, got {str(im)[:80]}")
    if "path" in im:
        if not isinstance(im["path"], str) or not im["path"]:
            raise ValueError(f"{where}: image path must be a non-empty string")
        return
    codes = im["codes"]
    if not isinstance(codes, list) or not codes or not all(isinstance(r, list) and r for r in codes):
        raise ValueError(f"{where}: image codes must be a non-empty list of non-empty rows")
    w = len(codes[0])
    if any(len(r) != w for r in codes):
        raise ValueError(f"{where}: image codes are ragged; every row must have {w} codes")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for r in codes for c in r):
        raise ValueError(f"{where}: image codes must be non-negative integers")


def validate_record(rec, where: str = "record") -> None:
    """ValueError naming the field when `rec` does not follow the layout in the module docstring."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(rec).__name__}")
    unknown = sorted(set(rec) - {"task", "question", "images", "answer", "turns"})
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: task, question, images, answer, turns")
    task = rec.get("task")
    if task not in TASKS + (INTERLEAVED,):
        raise ValueError(f"{where}: task must be one of {list(TASKS) + [INTERLEAVED]}, got {task!r}")
    turns = rec.get("turns", [])
    if not isinstance(turns, list) or (turns and task == INTERLEAVED):
        raise ValueError(f"{where}: turns must be a list (and only chat records have turns)")
    _validate_turn(rec, task, where)
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or sorted(t) != ["answer", "images", "question"]:
            raise ValueError(f"{where}: turns[{i}] must be {{'question', 'images', 'answer'}}")
        _validate_turn(t, task, f"{where}: turns[{i}]")


def _validate_turn(rec: dict, task: str, where: str) -> None:
    question, images, answer = rec.get("question", ""), rec.get("images", []), rec.get("answer")
    if not isinstance(question, str):
        raise ValueError(f"{where}: question must be a string")
    if not isinstance(images, list):
        raise ValueError(f"{where}: images must be a list")
    if task == INTERLEAVED and (question or images):
        raise ValueError(f"{where}: an 'interleaved' record has no question or prompt images")
    for i, im in enumerate(images):
        _check_image(im, f"{where}: images[{i}]")
    if not isinstance(answer, list) or not answer:
        raise ValueError(f"{where}: answer must be a non-empty list of segments")
    for i, seg in enumerate(answer):
        if not isinstance(seg, dict) or len(seg) != 1 or not ({"text", "image"} & set(seg)):
            raise ValueError(f"{where}: answer[{i}] must be {{'text': str}} or {{'image': IMAGE}}")
        if "text" in seg and not isinstance(seg["text"], str):
            raise ValueError(f"{where}: answer[{i}].text must be a string")
        if "image" in seg:
            _check_image(seg["image"], f"{where}: answer[{i}]")


# ------------------------------------------------------------------------------------ shards

def write_shard(path: str, records: Iterable[dict], *, codebook_size: int | None, source: str = "") -> int:
    """Write records to `path` (a new .jsonl shard); returns the record count. Written to a temporary
    name and renamed, so a shard that exists is complete."""
    records = list(records)
    for i, rec in enumerate(records):
        validate_record(rec, f"{path}: record {i}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    header = {"format": FORMAT, "version": VERSION, "num_records": len(records),
              "codebook_size": codebook_size, "source": source}
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for rec in records:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    return len(records)


def read_header(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"shard: {path} not found")
    with open(path, encoding="utf-8") as f:
        try:
            first = f.readline()
            header = json.loads(first)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"shard: {path} is corrupt: its header line is not JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"shard: {path} is not a {FORMAT} file (header format field missing or different)")
    if header.get("version") != VERSION:
        raise ValueError(f"shard: {path} has version {header.get('version')!r}; this reader knows version {VERSION}")
    n = header.get("num_records")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"shard: {path} header has no valid num_records")
    return header


def read_shard(path: str) -> Iterator[dict]:
    """Yield the records of one shard, with image paths made absolute. Any problem -> ValueError
    naming the file (and the line)."""
    header = read_header(path)
    base = os.path.dirname(os.path.abspath(path))
    count = 0
    with open(path, encoding="utf-8") as f:
        f.readline()
        for lineno, line in enumerate(f, start=2):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"shard: {path} is corrupt at line {lineno} ({e})") from None
            validate_record(rec, f"shard: {path} line {lineno}")
            for im in record_images(rec):
                if "path" in im and not os.path.isabs(im["path"]):
                    im["path"] = os.path.join(base, im["path"])
            count += 1
            yield rec
    if count != header["num_records"]:
        raise ValueError(f"shard: {path} is corrupt: header says {header['num_records']} records, "
                         f"found {count} (truncated?)")


def shard_paths(paths: Iterable[str]) -> list[str]:
    """Files and folders (all `*.jsonl` inside, sorted) -> shard files. A missing path -> ValueError."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, n) for n in os.listdir(p) if n.endswith(".jsonl"))
            if not found:
                raise ValueError(f"data: folder {p} holds no .jsonl shard")
            out += found
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise ValueError(f"shard: {p} not found")
    if not out:
        raise ValueError("data: no shards given")
    return out


# ------------------------------------------------------------------------------------ ids

@dataclass
class Encoded:
    """One document as ids (list of int), per-token loss weights (list of float), and the answer's
    [start, end) token range (the whole document after BOS for `interleaved`)."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    answer_span: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return len(self.ids)


def prompt_prefix(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task: must be one of {list(TASKS)}, got {task!r}")
    return f"You are a helpful assistant for {task} task.{HOWTO_SENTENCE if task == 'howto' else ''} USER: "


class _Builder:
    def __init__(self, tokenizer, image_codes_fn, visual_weight: float):
        self.tok, self.vocab = tokenizer, tokenizer.vocab
        self.image_codes_fn, self.visual_weight = image_codes_fn, visual_weight
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.pending_text = ""
        self.weight = 0.0  # weight of what is being added now

    def text(self, s: str) -> None:
        self.pending_text += s

    def flush(self) -> None:
        if self.pending_text:
            new = self.tok.encode(self.pending_text, allow_special=False)
            self.ids += new
            self.weights += [self.weight] * len(new)
            self.pending_text = ""

    def special(self, token_id: int) -> None:
        self.flush()
        self.ids.append(token_id)
        self.weights.append(self.weight)

    def image(self, im: dict) -> None:
        self.flush()
        if "codes" in im:
            codes = im["codes"]
        elif self.image_codes_fn is None:
            raise ValueError(f"image: {im['path']} is a raw image; pass a vision tokenizer to turn it into codes")
        else:
            codes = self.image_codes_fn(im["path"])
        new = self.vocab.image_ids(codes)
        self.ids += new
        self.weights += [self.weight * self.visual_weight if self.vocab.is_visual(t) else self.weight for t in new]

    def segments(self, segs: list[dict]) -> None:
        for seg in segs:
            if "text" in seg:
                self.text(seg["text"])
            else:
                self.image(seg["image"])
        self.flush()


def encode_record(rec: dict, tokenizer, *, mode: str, visual_weight: float,
                  image_codes: Callable[[str], object] | None = None) -> Encoded:
    """Record -> Encoded (see the module docstring for the template and the weights).
    tokenizer: a model.text_tokenizer tokenizer (its `.vocab` gives the special ids);
    image_codes: path -> (h, w) code grid, needed only for raw-image records."""
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {list(MODES)}, got {mode!r}")
    if not 0.0 <= visual_weight:
        raise ValueError(f"visual_weight: must be >= 0, got {visual_weight}")
    b = _Builder(tokenizer, image_codes, visual_weight)
    v = b.vocab
    prompt_weight = 1.0 if mode == "pretrain" else 0.0
    b.special(v.bos)  # weight 0: never a target (see docstring)
    task = rec["task"]
    if task == INTERLEAVED:
        b.weight = 1.0
        start = len(b.ids)
        b.segments(rec["answer"])
        b.special(v.eos)
        return Encoded(b.ids, b.weights, (start, len(b.ids)))
    b.weight = prompt_weight
    b.text(prompt_prefix(task))
    _user(b, task, rec)
    b.weight = 1.0
    start = len(b.ids)
    b.segments(rec["answer"])
    for t in rec.get("turns", []):
        b.special(v.answer_end)
        b.weight = prompt_weight
        b.text(" USER: ")
        _user(b, task, t)
        b.weight = 1.0
        b.segments(t["answer"])
    b.special(v.answer_end)
    b.special(v.eos)
    return Encoded(b.ids, b.weights, (start, len(b.ids)))


def _user(b: _Builder, task: str, turn: dict) -> None:
    """{question}{images} ASSISTANT: <extra_100> (x2i: images first), at the builder's weight."""
    if task == "x2i":
        for im in turn["images"]:
            b.image(im)
        b.text(turn["question"])
    else:
        b.text(turn["question"])
        for im in turn["images"]:
            b.image(im)
    b.text(" ASSISTANT: ")
    b.special(b.vocab.answer_start)


def write_shards(out_dir: str, records: list[dict], *, codebook_size: int | None, source: str = "",
                 records_per_shard: int = 1000, prefix: str = "shard") -> list[str]:
    """Write records as out_dir/{prefix}-00000.jsonl, ... (at most records_per_shard each)."""
    if records_per_shard <= 0:
        raise ValueError(f"records_per_shard: must be > 0, got {records_per_shard}")
    paths = []
    for i in range(0, max(1, len(records)), records_per_shard):
        path = os.path.join(out_dir, f"{prefix}-{i // records_per_shard:05d}.jsonl")
        write_shard(path, records[i:i + records_per_shard], codebook_size=codebook_size, source=source)
        paths.append(path)
    return paths
