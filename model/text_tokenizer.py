"""Text tokenizers: the official Emu3.5 one (tiktoken ranks) and our small byte-level BPE.

Both split text with Qwen's pre-tokenizer regex (every digit its own token, SPEC §2) and map bytes to
ids; special and visual tokens are handled here, on top, from the `Vocab` layout, so the two
tokenizers behave the same way around them.

- `TiktokenTokenizer.from_dir(path)` reads a checkpoint folder's `emu3.tiktoken` (base64 token +
  rank per line) and `emu3_vision_tokens.txt` (one special token string per line, in id order, following
  <|endoftext|>, <|im_start|>, <|im_end|> and the 205 extras). Every id is derived from those files and
  checked against the layout of SPEC §2. The rank file is read directly, not through
  `tiktoken.load.load_tiktoken_bpe`: that caches by file path, so a file re-saved at the same path
  would load its stale ranks.
- `BPETokenizer` wraps a Hugging Face `tokenizers` byte-level BPE trained by `BPETokenizer.train`; its
  alphabet is ordered by code point, which puts '*' at 9 and '0'..'9' at 15..24, as in Qwen's ranks.
  A BPE may hold fewer tokens than `num_text_tokens` (a small corpus stops merging early); the ids
  above it are still text ids to the model, so they decode to no bytes rather than crash a stream.
"""

from __future__ import annotations

import codecs
import os

from model.vocab import SPECIAL_NAMES, SPECIAL_PATTERN, VISUAL_NAME, Vocab

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TIKTOKEN_FILE = "emu3.tiktoken"
VISION_TOKENS_FILE = "emu3_vision_tokens.txt"
BPE_FILE = "tokenizer.json"


def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other bytes are
    shifted to code points from 256 up, so every byte has a visible character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def read_ranks(path: str) -> dict[bytes, int]:
    """An `emu3.tiktoken` file -> {token bytes: rank}. Each non-empty line is a base64 token, a space
    and an integer rank; a malformed line or a token listed twice is a ValueError naming the line."""
    import base64
    import binascii

    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != 2:
                    raise ValueError
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            except (ValueError, binascii.Error):
                raise ValueError(f"tokenizer: {path} line {line_no} is malformed ({line.strip()[:60]!r}); "
                                 "expected a base64 token, a space and an integer rank") from None
            if token in ranks:
                raise ValueError(f"tokenizer: {path} line {line_no} lists token {token!r} again "
                                 f"(it already has rank {ranks[token]})")
            ranks[token] = rank
    return ranks


class TextTokenizer:
    """Shared behaviour. Subclasses provide `vocab`, `encode_text(str) -> ids` for plain text and
    `token_bytes(id) -> bytes` for text ids."""

    vocab: Vocab

    def encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> ids. With allow_special, strings like <|image start|> or <|visual token 000042|>
        become their ids; without it they are ordinary text."""
        if not allow_special:
            return self.encode_text(text)
        ids, pos = [], 0
        for m in SPECIAL_PATTERN.finditer(text):
            if m.start() > pos:
                ids += self.encode_text(text[pos:m.start()])
            ids.append(self.vocab.special_id(m.group()))
            pos = m.end()
        if pos < len(text):
            ids += self.encode_text(text[pos:])
        return ids

    def decode(self, ids) -> str:
        """Ids -> text; special and visual ids are written by name, invalid UTF-8 as U+FFFD."""
        out, run = [], []
        for t in map(int, ids):
            if t < self.vocab.num_text_tokens:
                run.append(self.token_bytes(t))
                continue
            if run:
                out.append(b"".join(run).decode("utf-8", errors="replace"))
                run = []
            out.append(self.vocab.special_name(t))
        if run:
            out.append(b"".join(run).decode("utf-8", errors="replace"))
        return "".join(out)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns text ids, one at a time, into text deltas; a multi-byte character split across tokens is
    held back until it is complete."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


class TiktokenTokenizer(TextTokenizer):
    """The official Emu3.5 tokenizer (Qwen BPE ranks + Emu3 special and visual tokens)."""

    def __init__(self, ranks: dict[bytes, int], vocab: Vocab):
        import tiktoken

        self.vocab = vocab
        self._enc = tiktoken.Encoding(name="emu3", pat_str=QWEN_SPLIT, mergeable_ranks=ranks, special_tokens={})
        self._bytes = {rank: token for token, rank in ranks.items()}

    @classmethod
    def from_dir(cls, path: str) -> "TiktokenTokenizer":
        rank_file, vision_file = os.path.join(path, TIKTOKEN_FILE), os.path.join(path, VISION_TOKENS_FILE)
        for f in (rank_file, vision_file):
            if not os.path.isfile(f):
                raise ValueError(f"tokenizer: {f} not found; the official layout needs "
                                 f"{TIKTOKEN_FILE} and {VISION_TOKENS_FILE}")
        ranks = read_ranks(rank_file)
        num_text = len(ranks)
        if sorted(ranks.values()) != list(range(num_text)):
            raise ValueError(f"tokenizer: {rank_file} ranks must be exactly 0..{num_text - 1}")
        with open(vision_file, encoding="utf-8") as f:
            listed = [line.strip() for line in f if line.strip()]
        vocab = cls._layout_from_files(num_text, listed, ranks, vision_file)
        return cls(ranks, vocab)

    @staticmethod
    def _layout_from_files(num_text: int, listed: list[str], ranks: dict[bytes, int], vision_file: str) -> Vocab:
        """Assign ids as the release does (ranks, then the Qwen specials and extras, then the listed
        tokens in order) and check they follow SPEC §2's structure."""
        # the release lists IMG, BOI, EOI itself; the Qwen specials and extras before them are implied
        head = SPECIAL_NAMES[-3:]
        ids = {name: num_text + i for i, name in enumerate([*SPECIAL_NAMES[:-3], *listed])}
        if listed[:3] != list(head):
            raise ValueError(f"tokenizer: {vision_file} must start with {list(head)}, got {listed[:3]}")
        codes = listed[3:]
        for c, name in enumerate(codes):
            if name != VISUAL_NAME.format(c):
                raise ValueError(f"tokenizer: {vision_file} line {c + 4} is {name!r}, expected "
                                 f"{VISUAL_NAME.format(c)!r} (visual tokens must be contiguous and in order)")
        if not codes:
            raise ValueError(f"tokenizer: {vision_file} lists no visual tokens")
        try:
            digits = tuple(ranks[str(d).encode()] for d in range(10))
            star = ranks[b"*"]
        except KeyError as e:
            raise ValueError(f"tokenizer: {TIKTOKEN_FILE} lacks the single-byte token {e}") from None
        vocab = Vocab(num_text_tokens=num_text, codebook_size=len(codes), digit_ids=digits, star_id=star)
        assert ids["<|image start|>"] == vocab.boi and ids[VISUAL_NAME.format(0)] == vocab.visual_start
        return vocab

    def encode_text(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def save(self, path: str) -> None:
        """Write the two official files (used to build miniature official checkpoints)."""
        import base64

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, TIKTOKEN_FILE), "w", encoding="utf-8") as f:
            for rank in range(self.vocab.num_text_tokens):
                f.write(f"{base64.b64encode(self._bytes[rank]).decode()} {rank}\n")
        with open(os.path.join(path, VISION_TOKENS_FILE), "w", encoding="utf-8") as f:
            f.writelines(f"{n}\n" for n in SPECIAL_NAMES[-3:])
            f.writelines(f"{VISUAL_NAME.format(c)}\n" for c in range(self.vocab.codebook_size))


class BPETokenizer(TextTokenizer):
    """Our small byte-level BPE (Hugging Face `tokenizers`), for models with a compact vocabulary."""

    def __init__(self, tokenizer, num_text_tokens: int, codebook_size: int):
        n = tokenizer.get_vocab_size()
        if n > num_text_tokens:
            raise ValueError(f"num_text_tokens: the BPE has {n} tokens, more than {num_text_tokens}")
        self._tok = tokenizer
        to_byte = {ch: b for b, ch in byte_to_unicode().items()}
        self._bytes = [bytes(to_byte[ch] for ch in tokenizer.id_to_token(i)) for i in range(n)]
        digits = tuple(tokenizer.token_to_id(str(d)) for d in range(10))
        self.vocab = Vocab(num_text_tokens=num_text_tokens, codebook_size=codebook_size,
                           digit_ids=digits, star_id=tokenizer.token_to_id("*"))

    @staticmethod
    def _new_tokenizer():
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        return tok

    @classmethod
    def train(cls, texts, num_text_tokens: int, codebook_size: int) -> "BPETokenizer":
        """Train on an iterable of strings; deterministic for the same input."""
        from tokenizers import pre_tokenizers, trainers

        if num_text_tokens < 256:
            raise ValueError(f"num_text_tokens: must be >= 256 (one id per byte), got {num_text_tokens}")
        tok = cls._new_tokenizer()
        trainer = trainers.BpeTrainer(vocab_size=num_text_tokens, show_progress=False, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok, num_text_tokens, codebook_size)

    @classmethod
    def from_file(cls, path: str, num_text_tokens: int, codebook_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise ValueError(f"tokenizer: {path} not found")
        return cls(Tokenizer.from_file(path), num_text_tokens, codebook_size)

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self._tok.save(os.path.join(path, BPE_FILE))

    def encode_text(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def ranks(self) -> dict[bytes, int]:
        """The BPE as tiktoken ranks: an id is its merge order, which is what a rank means."""
        return {b: i for i, b in enumerate(self._bytes)}

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of a text id; ids past the trained BPE (up to num_text_tokens) have none."""
        if not 0 <= token_id < self.vocab.num_text_tokens:
            raise ValueError(f"token_id: {token_id} is not a text id (text ids are [0, "
                             f"{self.vocab.num_text_tokens}))")
        return self._bytes[token_id] if token_id < len(self._bytes) else b""


def builtin_corpus() -> list[str]:
    """A small fixed English corpus (prompt templates and world/robot/story phrases), enough to train a
    deterministic BPE for the `debug` preset without any download."""
    words = ("You are a helpful assistant for t2i x2i howto story explore vla task. USER: ASSISTANT: "
             "Please generate a response with interleaved text and images. The camera pushes forward. "
             "The camera pans left. The camera pans right. The camera pulls back. Strafe left. Strafe right. "
             "Turn left. Turn right. Move forward. Walk to the door. Robot Arm Type: Franka Panda. "
             "Instruction: stack the red cube on the blue cube. Finish the task with 4 steps. "
             "Current Step: pick up the green block. Place it on the plate. Push the yellow ball. "
             "Once upon a time a fox found a lantern in the forest. How to make a wood pickaxe: "
             "collect wood, place a table, craft the pickaxe. 0 1 2 3 4 5 6 7 8 9 10 64*64 * ")
    return [words] * 4 + [" ".join(sorted(set(words.split())))]
