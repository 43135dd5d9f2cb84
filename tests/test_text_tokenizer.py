"""Text tokenizers (model/text_tokenizer.py): our byte-level BPE, the streaming decoder, and the official
tiktoken tokenizer read from hand-written miniature `emu3.tiktoken` / `emu3_vision_tokens.txt` files.

Expected ids come from SPEC §2 (digits 15..24, '*' 9, specials after the text ids) or from the rank files
the tests write themselves.
"""

import base64

import pytest

from model.text_tokenizer import TiktokenTokenizer, byte_to_unicode

MIXED = [
    "Hello, world! The camera pans left.",
    "naïve café, déjà vu — ½ price",
    "中文字符与English混合",
    "emoji 😀🚀 and 👩‍💻 (a ZWJ sequence)",
    "tabs\tand\nnew lines\r\n  double  spaces   ",
    "numbers 2024, 3.14159 and 64*64",
    "don't you're I'LL we've",
    "<|image start|>2*3<|image token|><|visual token 000005|><|image end|>",
    "text <|extra_100|> answer <|extra_101|><|extra_204|>",
    "",
]


# ---- byte-level alphabet (GPT-2's table, well known) -------------------------------------------------------

def test_byte_to_unicode_is_gpt2_table():
    table = byte_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord("!")] == "!" and table[ord("~")] == "~"
    assert table[0] == "\u0100"   # 'Ā'
    assert table[10] == "\u010a"  # 'Ċ'
    assert table[32] == "\u0120"  # 'Ġ'
    assert table[127] == "\u0121"
    assert table[0xAD] == "\u0143"  # 'Ń', the soft hyphen is not kept
    assert table[0xAE] == "\u00ae"


# ---- BPE ----------------------------------------------------------------------------------------------------

def test_bpe_digits_and_star_ids(bpe):
    for d in range(10):
        assert bpe.encode(str(d)) == [15 + d]
        assert bpe.token_bytes(15 + d) == str(d).encode()
    assert bpe.encode("*") == [9] and bpe.token_bytes(9) == b"*"
    assert bpe.vocab.digit_ids == tuple(range(15, 25)) and bpe.vocab.star_id == 9
    # the corpus contains "10" and "64*64", yet every digit stays its own token
    assert bpe.encode("2024") == [17, 15, 17, 19]
    assert bpe.encode("64*64") == [21, 19, 9, 21, 19]
    assert bpe.encode("10") == [16, 15]
    ids = bpe.encode("1234567890 apples")
    assert ids[:10] == [16, 17, 18, 19, 20, 21, 22, 23, 24, 15]


def test_bpe_learned_merges(bpe):
    # the built-in corpus repeats "camera" and " the": they must be multi-byte tokens, not bytes
    assert len(bpe.encode(" camera")) < len(" camera")
    assert max(len(bpe.token_bytes(i)) for i in range(512)) > 3


@pytest.mark.parametrize("text", MIXED)
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text


def test_bpe_special_strings(bpe):
    # compact layout: N = 512, BOI = N + 209, visual c = N + 211 + c, extra_i = N + 3 + i
    assert bpe.encode("<|image start|>") == [721]
    assert bpe.encode("a<|visual token 000005|>b") == bpe.encode("a") + [728] + bpe.encode("b")
    assert bpe.encode("<|extra_204|><|endoftext|>") == [512 + 3 + 204, 512]
    with pytest.raises(ValueError):
        bpe.encode("<|visual token 000256|>")  # beyond the 256-code codebook


def test_bpe_allow_special_false_is_plain_text(bpe):
    s = "x <|image start|> y"
    plain = bpe.encode(s, allow_special=False)
    assert all(t < 512 for t in plain)
    assert 721 not in plain
    assert bpe.decode(plain) == s
    assert 721 in bpe.encode(s)


def test_decode_names_specials_and_replaces_bad_utf8(bpe):
    e_acute = bpe.encode("é")
    assert len(e_acute) == 2  # two bytes, two byte tokens in this small BPE
    # a lone continuation byte is invalid UTF-8 -> U+FFFD; specials cut runs
    assert bpe.decode([e_acute[1]]) == "\ufffd"
    assert bpe.decode([e_acute[0], 721, e_acute[1]]) == "\ufffd<|image start|>\ufffd"
    assert bpe.decode(e_acute + [721]) == "é<|image start|>"


# ---- StreamDecoder ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["héllo 中文 😀 naïve", "😀😀👩‍💻中", "plain ascii only", "ünïcödé" * 3])
def test_stream_decoder_holds_split_characters(bpe, text):
    ids = bpe.encode(text)
    dec = bpe.stream_decoder()
    deltas, seen = [], b""
    for t in ids:
        deltas.append(dec.push(t))
        seen += bpe.token_bytes(t)
        # everything complete so far has been emitted, nothing incomplete
        assert "".join(deltas) == seen.decode("utf-8", errors="ignore")
    deltas.append(dec.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_stream_decoder_really_sees_split_characters(bpe):
    ids = bpe.encode("中文 😀")
    partial = [t for t in ids if _invalid_alone(bpe.token_bytes(t))]
    assert partial, "the test text must split a multi-byte character across tokens"
    dec = bpe.stream_decoder()
    assert dec.push(partial[0]) == ""  # held back


def _invalid_alone(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


# ---- official tokenizer from hand-written files -------------------------------------------------------------

MERGES = [b"th", b"he", b"the", b"in", b" t"]
NUM_CODES = 16


def gpt2_byte_order() -> list[int]:
    table = byte_to_unicode()
    return sorted(range(256), key=lambda b: ord(table[b]))


def write_rank_file(path, tokens: list[bytes]):
    with open(path / "emu3.tiktoken", "w") as f:
        for rank, tok in enumerate(tokens):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")


def write_vision_file(path, names: list[str]):
    with open(path / "emu3_vision_tokens.txt", "w", encoding="utf-8") as f:
        f.write("".join(n + "\n" for n in names))


def vision_names(n=NUM_CODES):
    return ["<|image token|>", "<|image start|>", "<|image end|>"] + [
        "<|visual token " + str(c).zfill(6) + "|>" for c in range(n)]


@pytest.fixture
def official_dir(tmp_path):
    tokens = [bytes([b]) for b in gpt2_byte_order()] + MERGES
    write_rank_file(tmp_path, tokens)
    write_vision_file(tmp_path, vision_names())
    return tmp_path, tokens


def test_gpt2_order_puts_digits_where_qwen_does():
    order = gpt2_byte_order()
    assert [order.index(ord(str(d))) for d in range(10)] == list(range(15, 25))
    assert order.index(ord("*")) == 9


def test_from_dir_derives_layout(official_dir):
    path, tokens = official_dir
    tok = TiktokenTokenizer.from_dir(str(path))
    v = tok.vocab
    num_text = 256 + len(MERGES)
    assert v.num_text_tokens == num_text == 261
    assert v.codebook_size == 16
    assert v.boi == num_text + 3 + 205 + 1 == 470
    assert v.img == 469 and v.eoi == 471
    assert v.visual_start == num_text + 211 and v.size == num_text + 211 + 16
    assert v.digit_ids == tuple(tokens.index(str(d).encode()) for d in range(10)) == tuple(range(15, 25))
    assert v.star_id == tokens.index(b"*") == 9
    # merges
    assert tok.encode("the") == [tokens.index(b"the")]
    assert tok.encode("th") == [tokens.index(b"th")]
    # lowest rank first: ' ','t','h','e' -> ' ','th','e' (th=256 beats ' t'=260) -> ' ','the'
    assert tok.encode("in the") == [tokens.index(b"in"), tokens.index(b" "), tokens.index(b"the")]
    assert tokens.index(b" ") == 220  # as in Qwen's ranks
    assert tok.encode("2*3") == [17, 9, 18]
    # specials by name, and a round trip of an image with text around it
    assert tok.encode("<|image start|>") == [470]
    assert tok.encode("<|visual token 000015|>") == [num_text + 211 + 15]
    with pytest.raises(ValueError):
        tok.encode("<|visual token 000016|>")
    ids = tok.encode("the ") + v.image_ids([[1, 2], [15, 0]]) + tok.encode(" end")
    text = tok.decode(ids)
    assert "<|image start|>2*2<|image token|><|visual token 000001|>" in text
    assert tok.encode(text) == ids
    assert tok.decode(tok.encode("é中😀")) == "é中😀"


def test_from_dir_reads_ids_from_the_files(tmp_path):
    # a different byte order: the digit and '*' ids must come from the rank file, not from defaults
    order = gpt2_byte_order()[::-1]
    tokens = MERGES[:3] + [bytes([b]) for b in order]
    write_rank_file(tmp_path, tokens)
    write_vision_file(tmp_path, vision_names(5))
    tok = TiktokenTokenizer.from_dir(str(tmp_path))
    assert tok.vocab.digit_ids == tuple(tokens.index(str(d).encode()) for d in range(10))
    assert tok.vocab.digit_ids[0] == 3 + 255 - 15
    assert tok.vocab.star_id == 3 + 255 - 9
    assert tok.vocab.codebook_size == 5 and tok.vocab.num_text_tokens == 259
    assert tok.encode("42") == [tokens.index(b"4"), tokens.index(b"2")]
    assert tok.vocab.image_ids([[4]])[:5] == [259 + 209, tokens.index(b"1"), tokens.index(b"*"),
                                             tokens.index(b"1"), 259 + 208]
    assert tok.encode("the") == [2]


@pytest.mark.parametrize("names, line", [
    (vision_names()[:6] + [vision_names()[7], vision_names()[6]] + vision_names()[8:], "line 7"),  # 3 and 4 swapped
    (vision_names()[:3] + vision_names()[4:], "line 4"),  # code 0 missing
    (["<|image start|>", "<|image token|>", "<|image end|>"] + vision_names()[3:], "must start with"),
])
def test_vision_file_out_of_order(official_dir, names, line):
    path, _ = official_dir
    write_vision_file(path, names)
    with pytest.raises(ValueError, match="emu3_vision_tokens.txt") as e:
        TiktokenTokenizer.from_dir(str(path))
    assert line in str(e.value)


def test_vision_file_without_codes(official_dir):
    path, _ = official_dir
    write_vision_file(path, vision_names()[:3])
    with pytest.raises(ValueError, match="emu3_vision_tokens.txt"):
        TiktokenTokenizer.from_dir(str(path))


@pytest.mark.parametrize("missing", ["emu3.tiktoken", "emu3_vision_tokens.txt"])
def test_missing_file(official_dir, missing):
    path, _ = official_dir
    (path / missing).unlink()
    with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
        TiktokenTokenizer.from_dir(str(path))


def test_rank_gap_is_rejected(tmp_path):
    tokens = [bytes([b]) for b in gpt2_byte_order()]
    with open(tmp_path / "emu3.tiktoken", "w") as f:
        for rank, t in enumerate(tokens):
            f.write(f"{base64.b64encode(t).decode()} {rank if rank < 100 else rank + 1}\n")
    write_vision_file(tmp_path, vision_names())
    with pytest.raises(ValueError, match="emu3.tiktoken"):
        TiktokenTokenizer.from_dir(str(tmp_path))


def test_missing_digit_byte_is_rejected(tmp_path):
    tokens = [bytes([b]) for b in gpt2_byte_order() if b != ord("7")]
    write_rank_file(tmp_path, tokens)
    write_vision_file(tmp_path, vision_names())
    with pytest.raises(ValueError, match="emu3.tiktoken"):
        TiktokenTokenizer.from_dir(str(tmp_path))


# ---- BPE -> ranks -> tiktoken gives the same ids -------------------------------------------------------------

SENTENCES = MIXED + [
    "You are a helpful assistant for story task. USER: Once upon a time ASSISTANT: ",
    "Robot Arm Type: Franka Panda. Instruction: stack the red cube on the blue cube.",
    "The camera pushes forward. Turn left. Walk to the door.",
    "How to make a wood pickaxe: collect wood, place a table, craft the pickaxe.",
    "thethe camera cameras Camera CAMERA forwardness",
    "   leading spaces and trailing   ",
    "Ünïcode ünd ëmöjï 🎉🎉 ✓ ∑ ≈ ∞",
]


def test_bpe_ranks_in_tiktoken_match(bpe):
    tik = TiktokenTokenizer(bpe.ranks(), bpe.vocab)
    assert len(bpe.ranks()) == 512
    for s in SENTENCES:
        assert tik.encode(s) == bpe.encode(s), s
        assert tik.decode(bpe.encode(s)) == s
    for s in bpe_corpus_lines():
        assert tik.encode(s) == bpe.encode(s)


def bpe_corpus_lines():
    from model.text_tokenizer import builtin_corpus

    return builtin_corpus()[-1:] + builtin_corpus()[0].split(". ")


# ---- rank file read fresh, malformed lines -------------------------------------------------------------------

def test_resaved_rank_file_loads_the_new_ranks(tmp_path):
    """Re-saving emu3.tiktoken at the same path must not load the old ranks (tiktoken's loader caches
    by file path)."""
    old = [bytes([b]) for b in gpt2_byte_order()] + MERGES
    new = [bytes([b]) for b in gpt2_byte_order()] + [b"ca", b"me", b"ra", b"came", b"camera", b"xyz"]
    write_vision_file(tmp_path, vision_names())
    write_rank_file(tmp_path, old)
    first = TiktokenTokenizer.from_dir(str(tmp_path))
    assert first.vocab.num_text_tokens == 261 and first.encode("the") == [old.index(b"the")]
    write_rank_file(tmp_path, new)
    second = TiktokenTokenizer.from_dir(str(tmp_path))
    assert second.vocab.num_text_tokens == 262
    assert second.encode("camera") == [new.index(b"camera")] == [260]
    assert second.encode("the") == [new.index(b"t"), new.index(b"h"), new.index(b"e")]
    assert second.token_bytes(261) == b"xyz"


@pytest.mark.parametrize("bad, line_no", [
    ("dGg=\n", 3),             # no rank
    ("dGg= 2 7\n", 3),         # three fields
    ("dGg= two\n", 3),         # rank not an integer
    ("d@g= 2\n", 3),           # not base64
])
def test_malformed_rank_line_names_file_and_line(tmp_path, bad, line_no):
    tokens = [bytes([b]) for b in gpt2_byte_order()]
    lines = [f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)]
    lines[2] = bad
    (tmp_path / "emu3.tiktoken").write_text("".join(lines))
    write_vision_file(tmp_path, vision_names())
    with pytest.raises(ValueError, match=rf"emu3\.tiktoken.*line {line_no}\b"):
        TiktokenTokenizer.from_dir(str(tmp_path))


def test_rank_file_blank_lines_are_skipped_and_duplicates_named(tmp_path):
    tokens = [bytes([b]) for b in gpt2_byte_order()]
    lines = [f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)]
    (tmp_path / "emu3.tiktoken").write_text("\n" + "".join(lines[:100]) + "\n\n" + "".join(lines[100:]))
    write_vision_file(tmp_path, vision_names())
    assert TiktokenTokenizer.from_dir(str(tmp_path)).vocab.num_text_tokens == 256
    # token of rank 5 listed again with rank 256 (line 257): the same bytes cannot have two ranks
    (tmp_path / "emu3.tiktoken").write_text("".join(lines) + f"{base64.b64encode(tokens[5]).decode()} 256\n")
    with pytest.raises(ValueError, match=r"emu3\.tiktoken.*line 257"):
        TiktokenTokenizer.from_dir(str(tmp_path))


# ---- a BPE smaller than num_text_tokens --------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_bpe():
    from model.text_tokenizer import BPETokenizer, builtin_corpus

    tok = BPETokenizer.train(builtin_corpus(), 1024, 256)  # the corpus only supports ~522 tokens
    n = len(tok.ranks())
    assert n < 1024 and tok.vocab.num_text_tokens == 1024
    return tok, n


def test_short_bpe_unused_text_ids_decode_to_nothing(short_bpe):
    """Ids in [n, num_text_tokens) are text ids the model may sample; they carry no bytes."""
    tok, n = short_bpe
    hello = tok.encode("hello")
    assert tok.token_bytes(n) == b"" and tok.token_bytes(1023) == b""
    assert tok.decode(hello + [n, 1023] + tok.encode(" world")) == "hello world"
    assert tok.decode([n, tok.vocab.boi]) == "<|image start|>"
    dec = tok.stream_decoder()
    out = [dec.push(t) for t in hello[:1] + [n] + hello[1:] + [1023]]
    assert out[1] == "" and "".join(out) + dec.flush() == "hello"
    # ranks() keeps only the real tokens
    assert len(tok.ranks()) == n and sorted(tok.ranks().values()) == list(range(n))


@pytest.mark.parametrize("token_id", [-1, 1024, 1024 + 211])
def test_token_bytes_of_a_non_text_id_is_refused(short_bpe, token_id):
    tok, _ = short_bpe
    with pytest.raises(ValueError, match="token_id"):
        tok.token_bytes(token_id)
