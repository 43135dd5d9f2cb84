"""Vocabulary layout and image serialization (model/vocab.py) against SPEC §2.

Every expected id below is written out from SPEC §2's table (official layout) or from the same
structure for the compact debug layout (512 text ids, 256 codes): specials at N.., visual codes at
N + 211 + c. Nothing is copied from the module's output.
"""

import numpy as np
import pytest
import torch

from model.vocab import Vocab

# ---- SPEC §2, official layout, written out by hand ---------------------------------------------------
PAD, IM_START, IM_END = 151643, 151644, 151645
EXTRA0 = 151646
IMG, BOI, EOI = 151851, 151852, 151853
VIS0 = 151854
EOL = EXTRA0 + 200  # 151846
DIGIT = {str(d): 15 + d for d in range(10)}  # '0'..'9' = 15..24
STAR = 9

# ---- the debug preset's compact layout: N = 512 text ids, M = 256 codes --------------------------------
C_IMG, C_BOI, C_EOI = 512 + 208, 512 + 209, 512 + 210
C_EOL = 512 + 3 + 200
C_VIS0 = 512 + 211


@pytest.fixture(scope="module")
def official():
    return Vocab()


def test_official_special_ids(official):
    v = official
    assert (v.pad, v.im_start, v.im_end) == (151643, 151644, 151645)
    assert [v.extra(i) for i in (0, 1, 50, 100, 204)] == [151646, 151647, 151696, 151746, 151850]
    assert (v.img, v.boi, v.eoi) == (151851, 151852, 151853)
    assert v.bos == 151646 + 203 == 151849
    assert v.eos == 151646 + 204 == 151850
    assert v.eol == 151646 + 200 == 151846
    # roles of the extras (SPEC §2)
    assert (v.answer_start, v.answer_end) == (151746, 151747)
    assert (v.cot_start, v.cot_end) == (151706, 151707)
    assert (v.image_cot_start, v.image_cot_end) == (151696, 151697)
    assert v.visual_start == 151854
    assert [v.visual(c) for c in (0, 1, 131071)] == [151854, 151855, 282925]
    assert v.size == 282926
    assert v.digit_ids == tuple(range(15, 25)) and v.star_id == 9


def test_official_names_round_trip(official):
    v = official
    cases = {
        151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
        151646: "<|extra_0|>", 151846: "<|extra_200|>", 151850: "<|extra_204|>",
        151851: "<|image token|>", 151852: "<|image start|>", 151853: "<|image end|>",
        151854: "<|visual token 000000|>", 151854 + 42: "<|visual token 000042|>",
        282925: "<|visual token 131071|>",
    }
    for token_id, name in cases.items():
        assert v.special_name(token_id) == name
        assert v.special_id(name) == token_id


def test_is_visual_boundaries(official):
    v = official
    assert not v.is_visual(151853) and v.is_visual(151854)
    assert v.is_visual(282925) and not v.is_visual(282926)
    assert not v.is_visual(15)


def test_extra_index_range(official):
    for bad in (-1, 205):
        with pytest.raises(ValueError, match="extra"):
            official.extra(bad)


def test_grid_2x3_serializes_exactly(official):
    codes = [[5, 0, 131071], [7, 42, 1]]
    expected = [151852, 17, 9, 18, 151851,
                151854 + 5, 151854 + 0, 151854 + 131071,
                151646 + 200,
                151854 + 7, 151854 + 42, 151854 + 1,
                151853]
    assert official.image_ids(codes) == expected
    # tensors and arrays serialize the same way as nested lists
    assert official.image_ids(torch.tensor(codes)) == expected
    assert official.image_ids(np.array(codes)) == expected
    assert official.parse_image(expected) == codes


def test_single_row_and_single_column_grids(official):
    # one row: no EOL at all (EOL only *between* rows)
    assert official.image_ids([[3, 4]]) == [BOI, 16, STAR, 17, IMG, VIS0 + 3, VIS0 + 4, EOI]
    # one column of three rows: an EOL after each of the first two codes only
    assert official.image_ids([[8], [9], [10]]) == [BOI, 18, STAR, 16, IMG, VIS0 + 8, EOL, VIS0 + 9, EOL,
                                                    VIS0 + 10, EOI]


def test_multi_digit_header_is_digit_by_digit(official):
    # 47*85 (SPEC's 16:9 preset): '4' '7' '*' '8' '5'
    assert official.header_ids(47, 85) == [BOI, 19, 22, 9, 23, 20, IMG]
    assert official.header_ids(100, 7) == [BOI, 16, 15, 15, 9, 22, IMG]
    assert official.parse_header([19, 22, 9, 23, 20]) == (47, 85)

    g = torch.Generator().manual_seed(0)
    grid = torch.randint(0, 131072, (47, 85), generator=g)
    ids = official.image_ids(grid)
    assert ids[:7] == [BOI, 19, 22, 9, 23, 20, IMG]
    assert ids[-1] == EOI
    assert len(ids) == 7 + 47 * 85 + 46 + 1  # header, codes, 46 EOLs between 47 rows, EOI
    eols = [i for i, t in enumerate(ids) if t == EOL]
    assert eols == [7 + 85 * (r + 1) + r for r in range(46)]
    assert official.parse_image(ids) == grid.tolist()


def test_compact_layout_text_round_trip(bpe):
    v = bpe.vocab
    assert (v.img, v.boi, v.eoi, v.eol, v.visual_start, v.size) == (C_IMG, C_BOI, C_EOI, C_EOL, C_VIS0,
                                                                      512 + 211 + 256)
    codes = [[5, 0, 255], [7, 42, 1]]
    ids = v.image_ids(codes)
    assert ids == [C_BOI, 17, 9, 18, C_IMG, C_VIS0 + 5, C_VIS0, C_VIS0 + 255, C_EOL,
                   C_VIS0 + 7, C_VIS0 + 42, C_VIS0 + 1, C_EOI]
    text = bpe.decode(ids)
    assert text == ("<|image start|>2*3<|image token|>"
                    "<|visual token 000005|><|visual token 000000|><|visual token 000255|><|extra_200|>"
                    "<|visual token 000007|><|visual token 000042|><|visual token 000001|><|image end|>")
    assert bpe.encode(text) == ids
    assert v.parse_image(bpe.encode(text)) == codes


def test_compact_two_digit_round_trip_through_text(bpe):
    v = bpe.vocab
    g = torch.Generator().manual_seed(1)
    grid = torch.randint(0, 256, (12, 31), generator=g).tolist()
    ids = v.image_ids(grid)
    text = bpe.decode(ids)
    assert text.startswith("<|image start|>12*31<|image token|>")
    assert text.endswith("<|image end|>")
    assert text.count("<|extra_200|>") == 11
    assert bpe.encode(text) == ids
    assert v.parse_image(bpe.encode(text)) == grid
    # two images concatenated, with text around them
    two = "before " + text + " middle " + bpe.decode(v.image_ids([[1]])) + " after"
    back = bpe.encode(two)
    assert bpe.decode(back) == two
    assert back.count(C_BOI) == 2 and back.count(C_EOI) == 2


# ---- errors ------------------------------------------------------------------------------------------------

def test_ragged_grid_is_rejected(official):
    with pytest.raises(ValueError, match=r"ragged.*row 1"):
        official.image_ids([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match=r"ragged.*row 2"):
        official.image_ids([[1, 2], [3, 4], [5, 6, 7]])


@pytest.mark.parametrize("bad", [-1, 131072, 10 ** 9])
def test_out_of_range_code_is_rejected(official, bad):
    with pytest.raises(ValueError, match="codes"):
        official.image_ids([[0, 1], [2, bad]])


def test_out_of_range_code_compact(bpe):
    bpe.vocab.image_ids([[255]])  # the last code is fine
    with pytest.raises(ValueError, match="codes"):
        bpe.vocab.image_ids([[256]])


@pytest.mark.parametrize("grid", [[], [[]]])
def test_empty_grid_is_rejected(official, grid):
    with pytest.raises(ValueError, match="codes"):
        official.image_ids(grid)


@pytest.mark.parametrize("h, w", [(0, 3), (3, 0), (-2, 3), (2.0, 3)])
def test_bad_header_size(official, h, w):
    with pytest.raises(ValueError):
        official.header_ids(h, w)


GOOD = [BOI, 17, STAR, 18, IMG, VIS0 + 1, VIS0 + 2, VIS0 + 3, EOL, VIS0 + 4, VIS0 + 5, VIS0 + 6, EOI]
MALFORMED = {
    "no BOI": GOOD[1:],
    "no EOI": GOOD[:-1],
    "empty": [],
    "no IMG": [BOI, 17, STAR, 18, VIS0 + 1, EOI],
    "no star": [BOI, 17, 18, IMG, VIS0 + 1, VIS0 + 2, EOI],
    "empty height": [BOI, STAR, 18, IMG, VIS0 + 1, EOI],
    "empty width": [BOI, 17, STAR, IMG, VIS0 + 1, EOI],
    "letter in header": [BOI, 17, STAR, 70, IMG, VIS0 + 1, EOI],
    "two stars": [BOI, 17, STAR, 18, STAR, 18, IMG] + GOOD[5:],
    "short row": GOOD[:7] + GOOD[8:],
    "long row": GOOD[:8] + [VIS0 + 9] + GOOD[8:],
    "missing row": GOOD[:8] + [EOI],
    "extra row": GOOD[:-1] + [EOL, VIS0 + 7, VIS0 + 8, VIS0 + 9, EOI],
    "EOL after last row": GOOD[:-1] + [EOL, EOI],
    "text id in grid": GOOD[:6] + [70] + GOOD[7:],
    "special in grid": GOOD[:6] + [IM_START] + GOOD[7:],
    "BOI in grid": GOOD[:6] + [BOI] + GOOD[7:],
    "header says 3 rows": [BOI, 18, STAR, 18] + GOOD[4:],
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_parse_image_rejects_malformed(official, name):
    assert official.parse_image(GOOD) == [[1, 2, 3], [4, 5, 6]]  # the span they are cut from is fine
    with pytest.raises(ValueError, match="ids"):
        official.parse_image(MALFORMED[name])


@pytest.mark.parametrize("span", [
    [BOI, 16, STAR, 15, IMG, EOI],  # 1*0
    [BOI, 17, STAR, 15, IMG, EOL, EOI],  # 2*0
])
def test_parse_image_rejects_zero_size(official, span):
    # image_ids can never write a zero side, so such a span is malformed
    with pytest.raises(ValueError, match="zero side"):
        official.parse_image(span)


@pytest.mark.parametrize("name", ["<|extra_205|>", "<|extra_-1|>", "<|foo|>", "image start", "<|image_start|>",
                                  "<|visual token 131072|>"])
def test_unknown_special_names(official, name):
    with pytest.raises(ValueError, match="token"):
        official.special_id(name)


def test_visual_name_beyond_compact_codebook(bpe):
    assert bpe.vocab.special_id("<|visual token 000255|>") == C_VIS0 + 255
    with pytest.raises(ValueError, match="codebook_size"):
        bpe.vocab.special_id("<|visual token 000256|>")


@pytest.mark.parametrize("token_id", [0, 15, 151642, 282926, -1])
def test_special_name_of_non_special_id(official, token_id):
    with pytest.raises(ValueError, match="token_id"):
        official.special_name(token_id)


def test_vocab_validates_digit_ids():
    with pytest.raises(ValueError, match="digit_ids"):
        Vocab(digit_ids=(1, 2, 3))
    with pytest.raises(ValueError, match="digit_ids/star_id"):
        Vocab(num_text_tokens=512, codebook_size=256, star_id=600)


@pytest.mark.parametrize("h, w, name", [(True, 3, "h"), (3, False, "w"), (2.5, 3, "h"), ("2", 3, "h"),
                                        (np.float32(2), 3, "h"), (3, np.int64(0), "w")])
def test_header_size_must_be_a_positive_integral(official, h, w, name):
    with pytest.raises(ValueError, match=rf"^{name}: "):
        official.header_ids(h, w)


def test_header_accepts_numpy_and_torch_integers(official):
    # SPEC §2: 47*85 is '4' '7' '*' '8' '5'
    expected = [BOI, 19, 22, STAR, 23, 20, IMG]
    assert official.header_ids(np.int64(47), np.int32(85)) == expected
    assert official.header_ids(torch.tensor(47), 85) == expected


@pytest.mark.parametrize("codes", [torch.tensor([1, 2, 3]), np.array([4, 5]), [1, 2, 3], (7,),
                                   torch.tensor(5), [[[1, 2]], [[3, 4]]]])
def test_image_ids_needs_a_2d_grid(official, codes):
    with pytest.raises(ValueError, match=r"^codes: "):
        official.image_ids(codes)
