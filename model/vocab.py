"""Vocabulary id layout and image serialization (SPEC §2).

Layout, for a text vocabulary of N ids and a codebook of M codes (official: N=151,643, M=131,072):
    0 .. N-1            text (byte-level BPE)
    N, N+1, N+2         <|endoftext|> (pad), <|im_start|>, <|im_end|>
    N+3+i               <|extra_i|>, i = 0..204
    N+208, +209, +210   <|image token|> (IMG), <|image start|> (BOI), <|image end|> (EOI)
    N+211+c             <|visual token 00000c|>, c = 0..M-1

An image of h x w codes is written
    BOI, digits(h), '*', digits(w), IMG, row_0, EOL, row_1, ..., EOL, row_{h-1}, EOI
height first, EOL (<|extra_200|>) between rows and none after the last.
Digit and '*' ids are text ids, so they come from the text tokenizer (official: '0'..'9' = 15..24,
'*' = 9; our byte-level BPE puts single bytes at the same ranks).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass

from model.config import NUM_SPECIAL_TOKENS

NUM_EXTRA = 205
SPECIAL_NAMES: tuple[str, ...] = (
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    + tuple(f"<|extra_{i}|>" for i in range(NUM_EXTRA))
    + ("<|image token|>", "<|image start|>", "<|image end|>")
)
assert len(SPECIAL_NAMES) == NUM_SPECIAL_TOKENS
VISUAL_NAME = "<|visual token {:06d}|>"
# matches any special or visual token string, for encoding text that contains them
SPECIAL_PATTERN = re.compile(
    r"<\|(?:endoftext|im_start|im_end|extra_\d+|image token|image start|image end|visual token \d{6})\|>")


@dataclass(frozen=True)
class Vocab:
    """Ids of one model's vocabulary. Build it from the text tokenizer (it knows the digit ids)."""

    num_text_tokens: int = 151643
    codebook_size: int = 131072
    digit_ids: tuple[int, ...] = tuple(range(15, 25))
    star_id: int = 9

    def __post_init__(self):
        if len(self.digit_ids) != 10:
            raise ValueError(f"digit_ids: need 10 ids for '0'..'9', got {len(self.digit_ids)}")
        for i in (*self.digit_ids, self.star_id):
            if not 0 <= i < self.num_text_tokens:
                raise ValueError(f"digit_ids/star_id: must be text ids in [0, {self.num_text_tokens}), got {i}")

    # ---- special ids ---------------------------------------------------------------------------
    @property
    def special_start(self) -> int:
        return self.num_text_tokens

    def extra(self, i: int) -> int:
        if not 0 <= i < NUM_EXTRA:
            raise ValueError(f"extra: index must be in [0, {NUM_EXTRA}), got {i}")
        return self.num_text_tokens + 3 + i

    @property
    def pad(self) -> int: return self.num_text_tokens
    @property
    def im_start(self) -> int: return self.num_text_tokens + 1
    @property
    def im_end(self) -> int: return self.num_text_tokens + 2
    @property
    def img(self) -> int: return self.num_text_tokens + 3 + NUM_EXTRA
    @property
    def boi(self) -> int: return self.img + 1
    @property
    def eoi(self) -> int: return self.img + 2
    @property
    def bos(self) -> int: return self.extra(203)
    @property
    def eos(self) -> int: return self.extra(204)
    @property
    def eol(self) -> int: return self.extra(200)
    @property
    def answer_start(self) -> int: return self.extra(100)
    @property
    def answer_end(self) -> int: return self.extra(101)
    @property
    def cot_start(self) -> int: return self.extra(60)
    @property
    def cot_end(self) -> int: return self.extra(61)
    @property
    def image_cot_start(self) -> int: return self.extra(50)
    @property
    def image_cot_end(self) -> int: return self.extra(51)

    @property
    def visual_start(self) -> int:
        return self.num_text_tokens + NUM_SPECIAL_TOKENS

    @property
    def size(self) -> int:
        return self.visual_start + self.codebook_size

    def visual(self, code: int) -> int:
        return self.visual_start + code

    def is_visual(self, token_id: int) -> bool:
        return self.visual_start <= token_id < self.size

    # ---- names (token <-> string) --------------------------------------------------------------
    def special_name(self, token_id: int) -> str:
        """The string of a special or visual id."""
        if self.num_text_tokens <= token_id < self.visual_start:
            return SPECIAL_NAMES[token_id - self.num_text_tokens]
        if self.is_visual(token_id):
            return VISUAL_NAME.format(token_id - self.visual_start)
        raise ValueError(f"token_id: {token_id} is not a special or visual id of this vocabulary "
                         f"(specials and codes are [{self.num_text_tokens}, {self.size}))")

    def special_id(self, name: str) -> int:
        if name.startswith("<|visual token "):
            code = int(name[len("<|visual token "):-2])
            if code >= self.codebook_size:
                raise ValueError(f"token: {name} exceeds codebook_size={self.codebook_size}")
            return self.visual(code)
        try:
            return self.num_text_tokens + SPECIAL_NAMES.index(name)
        except ValueError:
            raise ValueError(f"token: unknown special token {name!r}") from None

    # ---- image serialization -------------------------------------------------------------------
    def number_ids(self, n: int) -> list[int]:
        return [self.digit_ids[int(d)] for d in str(n)]

    def header_ids(self, h: int, w: int) -> list[int]:
        """BOI, digits(h), '*', digits(w), IMG. h and w: any integral (int, numpy or 0-d torch
        integer) but bool."""
        sizes = []
        for name, v in (("h", h), ("w", w)):
            try:
                n = None if isinstance(v, bool) else operator.index(v)
            except TypeError:
                n = None
            if n is None or n <= 0:
                raise ValueError(f"{name}: image size in tokens must be a positive integer, got {v!r}")
            sizes.append(n)
        h, w = sizes
        return [self.boi, *self.number_ids(h), self.star_id, *self.number_ids(w), self.img]

    def image_ids(self, codes) -> list[int]:
        """Serialize a code grid (h rows of w codes: nested lists or a 2-D tensor/array)."""
        grid = codes.tolist() if hasattr(codes, "tolist") else codes
        if not isinstance(grid, Iterable) or isinstance(grid, (str, bytes)):
            raise ValueError(f"codes: need a 2-D grid (rows of codes), got {type(codes).__name__} {grid!r}")
        rows = []
        for r, row in enumerate(grid):
            row = row.tolist() if hasattr(row, "tolist") else row
            if not isinstance(row, Iterable) or isinstance(row, (str, bytes)):
                raise ValueError(f"codes: need a 2-D grid (rows of codes), but row {r} is the single value "
                                 f"{row!r}; a flat sequence of codes has no rows")
            try:
                rows.append(list(map(int, row)))
            except TypeError:
                raise ValueError(f"codes: need a 2-D grid of integer codes; row {r} holds {row!r:.80}") from None
        if not rows or not rows[0]:
            raise ValueError("codes: the grid must have at least one row and one column")
        w = len(rows[0])
        for r, row in enumerate(rows):
            if len(row) != w:
                raise ValueError(f"codes: ragged grid, row {r} has {len(row)} codes but row 0 has {w}; "
                                 "every row must have the same length")
            bad = [c for c in row if not 0 <= c < self.codebook_size]
            if bad:
                raise ValueError(f"codes: value {bad[0]} in row {r} is outside [0, {self.codebook_size})")
        ids = self.header_ids(len(rows), w)
        for r, row in enumerate(rows):
            if r:
                ids.append(self.eol)
            ids.extend(self.visual(c) for c in row)
        ids.append(self.eoi)
        return ids

    def parse_image(self, ids: list[int]) -> list[list[int]]:
        """Inverse of image_ids: one complete image span (BOI .. EOI) -> code grid."""
        ids = list(ids)
        if len(ids) < 2 or ids[0] != self.boi or ids[-1] != self.eoi:
            raise ValueError("ids: an image span must start with <|image start|> and end with <|image end|>")
        try:
            img_at = ids.index(self.img)
        except ValueError:
            raise ValueError("ids: image span has no <|image token|> after its size header") from None
        h, w = self.parse_header(ids[1:img_at])
        body = ids[img_at + 1:-1]
        rows, row = [], []
        for t in body + [self.eol]:
            if t == self.eol:
                rows.append(row)
                row = []
            elif self.is_visual(t):
                row.append(t - self.visual_start)
            else:
                raise ValueError(f"ids: unexpected id {t} inside an image grid")
        if len(rows) != h or any(len(r) != w for r in rows):
            raise ValueError(f"ids: grid does not match its header {h}*{w}: row lengths {[len(r) for r in rows]}")
        return rows

    def parse_header(self, ids: list[int]) -> tuple[int, int]:
        """digits(h) '*' digits(w) -> (h, w)."""
        digit = {d: i for i, d in enumerate(self.digit_ids)}
        if self.star_id not in ids:
            raise ValueError("ids: image header has no '*' between height and width")
        star = ids.index(self.star_id)
        parts = (ids[:star], ids[star + 1:])
        if not all(parts) or any(t not in digit for p in parts for t in p):
            raise ValueError(f"ids: malformed image header {ids}; expected digits '*' digits")
        h, w = (int("".join(str(digit[t]) for t in p)) for p in parts)
        if h == 0 or w == 0:
            raise ValueError(f"ids: image header {h}*{w} has a zero side; h and w must be positive")
        return h, w
