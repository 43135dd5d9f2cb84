"""train.self_distill: every answer image is redrawn by the teacher from the sequence as it will be stored
(earlier drawn images in the prefix), text and prompt images stay, and the CLI writes a shard the DiDA
trainer reads."""

import json

import pytest

from train import self_distill as sd
from train.data import format as fmt


def _record():
    return fmt.record("explore", [fmt.text("The camera pans left."), fmt.image_codes([[1, 2], [3, 4]])],
                      question="Explore this place.", images=[fmt.image_codes([[5, 6], [7, 8]])],
                      turns=[("turn left", [], [fmt.image_codes([[9, 10], [11, 12]])]),
                             ("move forward", [], [fmt.text("Ahead."), fmt.image_codes([[13, 14], [15, 16]])])])


def test_each_image_is_drawn_from_the_stored_prefix(bpe):
    rec, seen = _record(), []

    def teacher(ids, size):
        seen.append(list(ids))
        return [[(len(ids) + i) % 200 for i in range(size[1])] for _ in range(size[0])]

    assert sd.distill_record(rec, bpe, teacher) == 3
    enc = fmt.encode_record(rec, bpe, mode="sft", visual_weight=1.0)
    starts = [i for i, (t, w) in enumerate(zip(enc.ids, enc.weights)) if t == bpe.vocab.boi and w > 0]
    assert [enc.ids[:s] for s in starts] == seen  # the teacher saw exactly the stored sequence's prefixes
    assert [im["codes"] for im in sd.answer_images(rec)] == [[[(len(p) + i) % 200 for i in range(2)]] * 2 for p in seen]
    assert rec["images"] == [{"codes": [[5, 6], [7, 8]]}]  # the prompt image is real
    assert [s for s in rec["turns"][1]["answer"] if "text" in s] == [{"text": "Ahead."}]


def test_cap_images_drops_whole_turns():
    rec = _record()
    assert len(sd.answer_images(sd.cap_images(rec, 2))) == 2
    assert "turns" not in sd.cap_images(rec, 1) and sd.cap_images(rec, 1)["answer"] == rec["answer"]
    assert sd.cap_images(rec, 9) == rec


def test_cli_writes_a_deterministic_shard(tiny_checkpoints, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "frame.png")
    recs = [fmt.record("vla", [fmt.text(f"Current Step: pick {i}"), fmt.image_path(str(tmp_path / "frame.png"))],
                       question=f"Instruction {i}.", images=[fmt.image_path(str(tmp_path / "frame.png"))])
            for i in range(3)]
    fmt.write_shard(str(tmp_path / "data" / "a.jsonl"), recs, codebook_size=None)
    outs = []
    for name in ("o1", "o2"):
        summary = sd.main(["--checkpoint", tiny_checkpoints["good"], "--data", str(tmp_path / "data"), "--records", "2",
                           "--image-area", "1024", "--out", str(tmp_path / name), "--threads", "1"])
        assert summary["records"] == 2 and summary["images"] == 2
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 2
        outs.append(list(fmt.read_shard(str(tmp_path / name / "shard-00000.jsonl"))))
    assert outs[0] == outs[1]  # greedy and seeded: the same shard twice
    assert fmt.read_header(str(tmp_path / "o1" / "shard-00000.jsonl"))["codebook_size"] == 256
    from train.data.vision import image_codes, load_vision_tokenizer

    ibq = load_vision_tokenizer(tiny_checkpoints["good"] + "/vision_tokenizer")
    real = image_codes(ibq, str(tmp_path / "frame.png"), 1024)
    assert len(real) == 2
    for rec in outs[0]:
        assert rec["images"] == [{"codes": real}]  # prompt images: the real frame's codes
        assert len(rec["answer"][1]["image"]["codes"]) == 2  # the drawn image: the ground truth's size
        assert rec["answer"][0]["text"].startswith("Current Step: pick")


def test_tasks_keeps_only_those_records(tiny_checkpoints, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (16, 16), (30, 200, 30)).save(tmp_path / "frame.png")
    im = fmt.image_path(str(tmp_path / "frame.png"))
    recs = [fmt.record("howto", [fmt.text("Step 1: Collect 2 wood."), im], "How to build a crafting table"),
            fmt.record("t2i", [im], "A top-down view of a Crafter world."),
            fmt.record("howto", [fmt.text("Step 1: Collect 3 wood."), im, fmt.text("Step 2: Place a table."), im],
                       "How to make a wood pickaxe")]
    fmt.write_shard(str(tmp_path / "data" / "a.jsonl"), recs, codebook_size=None)
    summary = sd.main(["--checkpoint", tiny_checkpoints["good"], "--data", str(tmp_path / "data"), "--records", "9",
                       "--tasks", "howto", "--image-area", "1024", "--out", str(tmp_path / "o"), "--threads", "1"])
    got = list(fmt.read_shard(str(tmp_path / "o" / "shard-00000.jsonl")))
    assert [r["question"] for r in got] == ["How to build a crafting table", "How to make a wood pickaxe"]
    assert summary["images"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--records", "0"], "--records: must be a positive integer"),
    (["--tasks", "dance"], r"--tasks: unknown \['dance'\]; allowed: "),
    (["--checkpoint", "/nope"], "checkpoint: /nope is not a folder"),
])
def test_cli_errors(tiny_checkpoints, tmp_path, argv, message):
    base = {"--checkpoint": tiny_checkpoints["good"], "--data": str(tmp_path), "--out": str(tmp_path / "o")}
    base.update(dict(zip(argv[::2], argv[1::2])))
    with pytest.raises(SystemExit, match=message):
        sd.main([x for kv in base.items() for x in kv])
