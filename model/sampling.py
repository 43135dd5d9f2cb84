"""Turning logits into tokens (SPEC §3): the text/image decoding FSM, classifier-free guidance on
visual codes, temperature / top-k / top-p, and the release's per-task defaults.

The FSM is a set of logits rules. In the text phase visual codes, grid tokens, BOS and the answer-start
token are forbidden and BOI opens an image. The size header is then either forced to a requested h*w or
sampled under a grammar (two-digit h and w, 10..99); later images of one answer reuse the first image's
size by default. In the grid, EOL is forced after every w codes and EOI after h rows; only visual codes are
allowed elsewhere.

Legend: B batch rows, V vocabulary size (logits' last dim), h x w an image's size in tokens (rows x codes).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields, replace

import torch

from model.vocab import Vocab

TASKS = ("t2i", "x2i", "howto", "story", "explore", "vla")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one request. top_k 0 and top_p 1.0 switch those filters off;
    temperature 0 means greedy. top-k, max_new_tokens and image_area are integers (Python or numpy,
    never bool); the others are real numbers (never bool). Anything else is a ValueError naming the
    field."""

    guidance_scale: float = 3.0
    text_temperature: float = 1.0
    text_top_k: int = 1024
    text_top_p: float = 0.9
    image_temperature: float = 1.0
    image_top_k: int = 5120
    image_top_p: float = 1.0
    max_new_tokens: int = 32768
    image_area: int = 720 * 720  # target pixels per image (resize and default size)

    def __post_init__(self):
        integral = ("text_top_k", "image_top_k", "max_new_tokens", "image_area")
        for f in fields(self):
            value, want_int = getattr(self, f.name), f.name in integral
            # bool is an int subclass, but True as a top-k or temperature is a mistake, not a number
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if want_int else numbers.Real):
                raise ValueError(f"{f.name}: must be {'an integer' if want_int else 'a number'}, "
                                 f"got {type(value).__name__} {value!r}")
        checks = {
            "guidance_scale": self.guidance_scale >= 0,
            "text_temperature": self.text_temperature >= 0, "image_temperature": self.image_temperature >= 0,
            "text_top_k": self.text_top_k >= 0, "image_top_k": self.image_top_k >= 0,
            "text_top_p": 0 < self.text_top_p <= 1, "image_top_p": 0 < self.image_top_p <= 1,
            "max_new_tokens": self.max_new_tokens > 0, "image_area": self.image_area > 0,
        }
        allowed = {"guidance_scale": ">= 0", "text_temperature": ">= 0", "image_temperature": ">= 0",
                   "text_top_k": ">= 0 (0 = off)", "image_top_k": ">= 0 (0 = off)", "text_top_p": "in (0, 1]",
                   "image_top_p": "in (0, 1]", "max_new_tokens": "> 0", "image_area": "> 0"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: must be {allowed[name]}, got {getattr(self, name)!r}")

    def replace(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


_INTERLEAVED = dict(max_new_tokens=32768, image_area=720 * 720, image_top_k=10240)
_DEFAULTS = {
    "t2i": SamplingParams(guidance_scale=5.0, max_new_tokens=5120, image_area=1024 * 1024, image_top_k=5120),
    "x2i": SamplingParams(guidance_scale=3.0, max_new_tokens=5120, image_area=1024 * 1024, image_top_k=5120),
    "story": SamplingParams(**_INTERLEAVED),
    "howto": SamplingParams(text_top_k=200, text_top_p=0.8, text_temperature=0.7, **_INTERLEAVED),
    "explore": SamplingParams(text_top_k=200, text_top_p=0.5, text_temperature=0.7,
                              **{**_INTERLEAVED, "image_top_k": 5120}),
}
# The release has no vla settings; a plan wants the same focused text as exploration.
_DEFAULTS["vla"] = _DEFAULTS["explore"]


def task_defaults(task: str, image_model: bool = True) -> SamplingParams:
    """The release's defaults (SPEC §3). image_model=False gives base Emu3.5's t2i guidance (2.0)."""
    if task not in _DEFAULTS:
        raise ValueError(f"task: unknown {task!r}; allowed: {list(TASKS)}")
    params = _DEFAULTS[task]
    return params.replace(guidance_scale=2.0) if task == "t2i" and not image_model else params


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance in log-prob space: log p_u + s * (log p_c - log p_u). (..., V) fp32.
    Apply it to raw logits, before FSM masking, so masked entries never meet -inf - -inf."""
    lc, lu = torch.log_softmax(cond.float(), -1), torch.log_softmax(uncond.float(), -1)
    return lu + scale * (lc - lu)


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Disallowed entries must already be -inf."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return inverse_cdf(torch.softmax(logits, -1), generator)


def inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs (B, V) -> one id per row, drawn by inverting the cumulative distribution with one uniform
    number per row (torch.multinomial took 8x longer on 144 x 2048 image logits on a 2-core CPU). The first id
    whose cumulative mass exceeds u wins, so an id of probability 0 is never drawn; u at the very top
    (rounding) falls back to the last id with mass."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # (B, V); fp64, so ids of tiny mass stay reachable
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # (B,)
    last_with_mass = (probs > 0).cumsum(-1).argmax(-1)
    return torch.minimum(drawn, last_with_mass)


TEXT, HEADER, GRID = "text", "header", "grid"


class DecodeFSM:
    """Tracks the text/image phase of one generated stream and says which ids may come next.

    start_with_image forces the answer to open with an image (t2i and x2i answers are one image).
    Turn shape (used by the session engine): `stop_ids` end the answer and are refused until
    `min_images` images are done; after `max_images` images the first stop id is forced; a text run of
    `max_text_tokens` tokens is closed by BOI while images are still owed, else by the first stop id;
    no image opens before the current text run has `min_text_tokens` tokens.
    Use: `forced()` gives the one id that must come next (or None); otherwise `constrain(logits)`
    masks disallowed ids (inside a grid every visual code is allowed, so image samplers skip it and
    score the visual codes alone); then `advance(id)` moves the state and returns the finished code grid
    (h, w) when the id closed an image.
    """

    def __init__(self, vocab: Vocab, vocab_size: int, image_size: tuple[int, int] | None = None,
                 reuse_first_size: bool = True, start_with_image: bool = False, stop_ids: tuple[int, ...] = (),
                 min_images: int = 0, max_images: int | None = None, max_text_tokens: int | None = None,
                 min_text_tokens: int = 0, device=None):
        self.vocab, self.image_size, self.reuse_first_size = vocab, image_size, reuse_first_size
        if image_size is not None:
            vocab.header_ids(*image_size)  # validates the size
        self.phase = TEXT
        for name, value in (("min_images", min_images), ("max_images", max_images),
                            ("max_text_tokens", max_text_tokens), ("min_text_tokens", min_text_tokens)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")
        if (min_images or max_images is not None or max_text_tokens) and not stop_ids:
            raise ValueError("stop_ids: min_images, max_images and max_text_tokens need at least one stop id")
        if max_images is not None and max_images < min_images:
            raise ValueError(f"max_images: must be >= min_images={min_images}, got {max_images}")
        self.stop_ids, self.min_images, self.max_images = tuple(stop_ids), min_images, max_images
        self.max_text_tokens, self.min_text_tokens = max_text_tokens, min_text_tokens
        self.images_done = 0
        self.text_run = 0  # text tokens since the last image (or the start)
        self.queue: list[int] = [vocab.boi] if start_with_image else []  # forced ids still to come
        if max_images == 0:
            self.queue = [self.stop_ids[0]]
        self.header: list[int] = []
        self.header_forced = False
        self.size: tuple[int, int] | None = None
        self.codes: list[int] = []
        ids = torch.arange(vocab_size, device=device)
        # an answer never opens another answer: <extra_100> (answer start) is prompt structure, as BOS is
        self.text_allowed = (ids < vocab.size) & ~((ids >= vocab.visual_start)
                                                   | (ids == vocab.img) | (ids == vocab.eoi)
                                                   | (ids == vocab.eol) | (ids == vocab.bos)
                                                   | (ids == vocab.answer_start))
        self.text_no_stop = self.text_allowed & ~torch.isin(ids, torch.tensor(self.stop_ids or (-1,), device=device))
        self.visual_allowed = (ids >= vocab.visual_start) & (ids < vocab.size)
        self.boi_mask = ids == vocab.boi
        digits = torch.tensor(vocab.digit_ids, device=device)
        self.digit_allowed = torch.isin(ids, digits)
        self.nonzero_digit_allowed = torch.isin(ids, digits[1:])

    @property
    def in_grid(self) -> bool:
        return self.phase == GRID

    @property
    def in_image(self) -> bool:
        return self.phase != TEXT

    def forced(self) -> int | None:
        return self.queue[0] if self.queue else None

    def allowed(self) -> torch.Tensor:
        """(V,) bool of the ids allowed next (when nothing is forced)."""
        if self.phase == TEXT:
            allowed = self.text_allowed if self.images_done >= self.min_images else self.text_no_stop
            if self.text_run < self.min_text_tokens:  # text comes before the next image
                allowed = allowed & ~self.boi_mask
            return allowed
        if self.phase == GRID:
            return self.visual_allowed
        # sampled header grammar: [1-9][0-9] '*' [1-9][0-9]; '*' and IMG are queued, so only digits here
        return self.nonzero_digit_allowed if len(self.header) in (0, 3) else self.digit_allowed

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(~self.allowed(), float("-inf"))

    def advance(self, token_id: int) -> list[list[int]] | None:
        v = self.vocab
        if self.queue:
            if token_id != self.queue[0]:
                raise ValueError(f"token_id: {token_id} given where {self.queue[0]} is forced")
            self.queue.pop(0)
        elif not bool(self.allowed()[token_id]):
            raise ValueError(f"token_id: {token_id} is not allowed in the {self.phase} phase")
        if self.phase == TEXT:
            if token_id == v.boi:
                self._open_image()
            elif token_id not in self.stop_ids:
                self.text_run += 1
                if self.max_text_tokens is not None and self.text_run >= self.max_text_tokens and not self.queue:
                    self.queue.append(v.boi if self.images_done < self.min_images else self.stop_ids[0])
            return None
        if self.phase == HEADER:
            self.header.append(token_id)
            if token_id == v.img:
                self.size = v.parse_header(self.header[:-1])
                self.phase, self.codes = GRID, []
            elif not self.header_forced and len(self.header) in (2, 5):  # after two digits of h, or of w
                self.queue.append(v.star_id if len(self.header) == 2 else v.img)
            return None
        # GRID
        h, w = self.size
        if token_id == v.eoi:
            self.phase, self.text_run = TEXT, 0
            self.images_done += 1
            if self.reuse_first_size and self.image_size is None:
                self.image_size = self.size
            if self.max_images is not None and self.images_done >= self.max_images:
                self.queue.append(self.stop_ids[0])
            return [self.codes[r * w:(r + 1) * w] for r in range(h)]
        if token_id != v.eol:
            self.codes.append(token_id - v.visual_start)
            n = len(self.codes)
            if n % w == 0:
                self.queue.append(v.eoi if n == h * w else v.eol)
        return None

    def _open_image(self):
        self.phase, self.header = HEADER, []
        self.header_forced = self.image_size is not None
        if self.header_forced:
            self.queue = self.vocab.header_ids(*self.image_size)[1:]  # digits, '*', digits, IMG
