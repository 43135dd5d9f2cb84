"""Training data: shard format, SPEC §2 template and loss weights, packing, and the two converters."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from train.data import format as fmt
from train.data.pack import PackedStream, collate, pack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _codes(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (h, w), generator=g).tolist()


# ------------------------------------------------------------------------------------ shards

def test_shard_round_trip(tmp_path):
    recs = [fmt.record("story", [fmt.text("Once"), fmt.image_codes(_codes(2, 3))], "a fox"),
            fmt.record(fmt.INTERLEAVED, [fmt.image_path("a.png"), fmt.text("hi")])]
    path = str(tmp_path / "s.jsonl")
    assert fmt.write_shard(path, recs, codebook_size=256) == 2
    back = list(fmt.read_shard(path))
    assert back[0] == recs[0]
    assert back[1]["answer"][0]["image"]["path"] == str(tmp_path / "a.png")  # relative to the shard
    assert fmt.read_header(path)["version"] == fmt.VERSION


def test_missing_shard_names_the_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="nope.jsonl not found"):
        fmt.shard_paths([missing])
    with pytest.raises(ValueError, match="nope.jsonl not found"):
        list(fmt.read_shard(missing))


@pytest.mark.parametrize("damage, message", [
    (lambda lines: lines[:1] + ['{"task": "story", "quest'] + lines[2:], "corrupt at line 2"),
    (lambda lines: lines[:-1], "header says 2 records, found 1"),
    (lambda lines: ["garbage"] + lines[1:], "header line is not JSON"),
    (lambda lines: [lines[0].replace('"version": 1', '"version": 7')] + lines[1:], "version 7"),
    (lambda lines: lines[:1] + [lines[1].replace('"story"', '"cooking"')] + lines[2:], "task must be one of"),
])
def test_corrupt_shard_names_the_file(tmp_path, damage, message):
    path = str(tmp_path / "s.jsonl")
    fmt.write_shard(path, [fmt.record("story", [fmt.text("x")], "q")] * 2, codebook_size=None)
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(damage(lines)) + "\n")
    with pytest.raises(ValueError, match=message) as e:
        list(fmt.read_shard(path))
    assert path in str(e.value)


# ------------------------------------------------------------------------------------ template and weights

def test_chat_ids_equal_the_whole_prompt_string_encoded(bpe):
    v = bpe.vocab
    codes = _codes(2, 3)
    rec = fmt.record("explore", [fmt.text("Turn left."), fmt.image_codes(codes)], "Walk to the door",
                     [fmt.image_codes(_codes(1, 2, seed=1))])
    enc = fmt.encode_record(rec, bpe, mode="sft", visual_weight=1.0)
    img_str = lambda c: bpe.decode(v.image_ids(c))  # noqa: E731
    whole = ("<|extra_203|>You are a helpful assistant for explore task. USER: Walk to the door"
             + img_str(_codes(1, 2, seed=1)) + " ASSISTANT: <|extra_100|>Turn left." + img_str(codes)
             + "<|extra_101|><|extra_204|>")
    assert enc.ids == bpe.encode(whole)
    # sft: weight 1 exactly from the first answer token to EOS
    start = enc.ids.index(v.answer_start) + 1
    assert enc.answer_span == (start, len(enc.ids))
    assert all(w == 0 for w in enc.weights[:start]) and all(w == 1 for w in enc.weights[start:])


def test_multi_turn_record_equals_the_engine_layout_and_masks_user_turns(bpe):
    from worldsim.modes import Layout

    v = bpe.vocab
    grids = [_codes(2, 3, seed=s) for s in range(3)]
    rec = fmt.record("explore", [fmt.text("The camera pans left."), fmt.image_codes(grids[1])], "turn left",
                     [fmt.image_codes(grids[0])],
                     turns=[("move forward", [], [fmt.text("The camera pushes forward."), fmt.image_codes(grids[2])])])
    enc = fmt.encode_record(rec, bpe, mode="sft", visual_weight=1.0)
    seg = lambda t, i: [{"type": "text", "text": t}, {"type": "image", "image": i}]  # noqa: E731
    turns = [{"kind": "prompt", "input": {"text": "turn left", "images": [0]}, "output": seg("The camera pans left.", 1)},
             {"kind": "instruction", "input": {"text": "move forward"}, "output": seg("The camera pushes forward.", 2)}]
    layout = Layout(bpe, lambda i: v.image_ids(grids[i]))
    engine_ids = [t for piece in layout.turn_pieces("explore", turns, conditional=True) for t in piece]
    assert enc.ids == engine_ids + [v.answer_end, v.eos]
    # sft: the follow-up's user text is not a target; its answer, the closing <extra_101> and EOS are
    second = enc.ids.index(v.answer_start, enc.ids.index(v.answer_start) + 1)
    first_end = enc.ids.index(v.answer_end)
    assert enc.weights[first_end] == 1 and all(w == 0 for w in enc.weights[first_end + 1:second + 1])
    assert all(w == 1 for w in enc.weights[second + 1:])
    with pytest.raises(ValueError, match=r"turns\[0\]"):
        fmt.validate_record({**rec, "turns": [{"question": "x"}]})


def test_x2i_puts_images_first_and_howto_adds_its_sentence(bpe):
    im = fmt.image_codes(_codes(1, 1))
    x2i = fmt.encode_record(fmt.record("x2i", [im], "make it red", [im]), bpe, mode="sft", visual_weight=1.0)
    text = bpe.decode(x2i.ids)
    assert text.index("<|image end|>") < text.index("make it red") < text.index("ASSISTANT")
    howto = fmt.encode_record(fmt.record("howto", [fmt.text("Step 1")], "make a pickaxe"), bpe, mode="sft",
                              visual_weight=1.0)
    assert bpe.decode(howto.ids).startswith("<|extra_203|>You are a helpful assistant for howto task. Please "
                                            "generate a response with interleaved text and images. USER: make")


def test_pretrain_weights_half_on_visual_codes_only(bpe):
    v = bpe.vocab
    rec = fmt.record(fmt.INTERLEAVED, [fmt.text("a fox"), fmt.image_codes(_codes(2, 2))])
    enc = fmt.encode_record(rec, bpe, mode="pretrain", visual_weight=0.5)
    for t, w in zip(enc.ids[1:], enc.weights[1:]):
        assert w == (0.5 if v.is_visual(t) else 1.0)
    assert enc.weights[0] == 0.0 and enc.ids[0] == v.bos
    assert sum(v.is_visual(t) for t in enc.ids) == 4
    chat = fmt.encode_record(fmt.record("t2i", [fmt.image_codes(_codes(1, 2))], "a fox"), bpe, mode="pretrain",
                             visual_weight=0.5)
    assert all(w > 0 for w in chat.weights[1:])  # pretraining: the prompt is predicted too


def test_raw_image_needs_a_vision_tokenizer(bpe):
    rec = fmt.record("t2i", [fmt.image_path("/x.png")], "q")
    with pytest.raises(ValueError, match="vision tokenizer"):
        fmt.encode_record(rec, bpe, mode="sft", visual_weight=1.0)
    enc = fmt.encode_record(rec, bpe, mode="sft", visual_weight=1.0, image_codes=lambda p: [[7, 8]])
    assert bpe.vocab.visual(7) in enc.ids


# ------------------------------------------------------------------------------------ packing

def _doc(n, start_id=1):
    return fmt.Encoded(list(range(start_id, start_id + n)), [0.0] + [1.0] * (n - 1), (1, n))


def test_packing_keeps_documents_whole_and_restarts_positions():
    docs = [_doc(5, 100), _doc(3, 200), _doc(6, 300), _doc(2, 400)]
    rows = list(pack(docs, seq_len=8, window=4))
    assert sorted(len(d) for r in rows for d in r.docs) == [2, 3, 5, 6]
    assert all(r.length <= 8 for r in rows)
    b = collate(rows, 8, pad_id=0)
    for i, row in enumerate(rows):
        at = 0
        for d_i, doc in enumerate(row.docs, start=1):
            n = len(doc)
            assert b.ids[i, at:at + n].tolist() == doc.ids
            assert b.positions[i, at:at + n].tolist() == list(range(n))
            assert (b.doc_ids[i, at:at + n] == d_i).all()
            at += n
        assert (b.doc_ids[i, at:] == 0).all() and (b.weights[i, at:] == 0).all() and (b.ids[i, at:] == 0).all()
    with pytest.raises(ValueError, match="seq_len"):
        list(pack([_doc(9)], seq_len=8))


def test_packed_mask_isolates_documents():
    from train.lm import make_mask

    doc_ids = torch.tensor([[1, 1, 1, 2, 2, 0]])
    m = make_mask(doc_ids, "dense")[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)


def test_packed_rows_give_the_same_logits_as_documents_alone(debug_model, bpe):
    """Document masking + restarted positions: a packed document is computed as if it were alone."""
    from train.lm import make_mask

    recs = [fmt.record("story", [fmt.text("Once upon a time")], "a fox"),
            fmt.record(fmt.INTERLEAVED, [fmt.text("Turn left."), fmt.image_codes(_codes(2, 3))])]
    docs = [fmt.encode_record(r, bpe, mode="pretrain", visual_weight=0.5) for r in recs]
    rows = list(pack(docs, seq_len=128))
    assert len(rows) == 1
    b = collate(rows, 128, bpe.vocab.pad)
    with torch.no_grad():
        packed = debug_model(b.ids, positions=b.positions, mask=make_mask(b.doc_ids, "dense"))
        at = 0
        for doc in rows[0].docs:
            alone = debug_model(torch.tensor([doc.ids]))
            torch.testing.assert_close(packed[0, at:at + len(doc)], alone[0], atol=1e-5, rtol=1e-5)
            at += len(doc)


def test_stream_batches_split_the_global_batch_between_ranks(tmp_path, bpe):
    recs = [fmt.record("t2i", [fmt.image_codes(_codes(2, 2, seed=i))], f"item {i}") for i in range(12)]
    fmt.write_shard(str(tmp_path / "a.jsonl"), recs, codebook_size=256)
    enc = lambda r: fmt.encode_record(r, bpe, mode="sft", visual_weight=1.0)  # noqa: E731
    stream = PackedStream([str(tmp_path / "a.jsonl")], enc, seq_len=64, pad_id=bpe.vocab.pad, seed=3)
    whole = next(stream.batches(4))
    halves = [next(stream.batches(4, rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(whole.ids[0::2], halves[0].ids) and torch.equal(whole.ids[1::2], halves[1].ids)
    third = next(stream.batches(4, skip=2))
    it = stream.batches(4)
    next(it), next(it)
    assert torch.equal(next(it).ids, third.ids)


def test_stream_interleaves_shards_in_proportion(tmp_path, bpe):
    for name, n in (("a", 60), ("b", 20)):
        recs = [fmt.record("t2i", [fmt.image_codes([[1]])], f"{name} {i}") for i in range(n)]
        fmt.write_shard(str(tmp_path / f"{name}.jsonl"), recs, codebook_size=256)
    paths = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    stream = PackedStream(paths, lambda r: r["question"], seq_len=64, pad_id=0, seed=1)
    docs = list(stream._docs(0))
    assert sorted(docs) == sorted([f"a {i}" for i in range(60)] + [f"b {i}" for i in range(20)])  # each once
    first = docs[:20]
    assert 2 <= sum(d.startswith("b") for d in first) <= 10  # both sources early, about 1 in 4 from b
    assert docs == list(PackedStream(paths, lambda r: r["question"], seq_len=64, pad_id=0, seed=1)._docs(0))
    assert docs != list(stream._docs(1))  # a new order each epoch
    twice = list(PackedStream(paths + [paths[1]], lambda r: r["question"], seq_len=64, pad_id=0, seed=1)._docs(0))
    assert len(twice) == 100 and sum(d.startswith("b") for d in twice[:40]) > sum(d.startswith("b") for d in first)


def test_pretokenize_equals_tokenizing_at_training_time(tmp_path, bpe, capsys):
    from PIL import Image

    from model.vision_tokenizer import IBQ, ibq_preset, save_ibq
    from train.data import pretokenize
    from train.data.vision import image_codes, load_vision_tokenizer

    torch.manual_seed(0)
    save_ibq(IBQ(ibq_preset("debug")), str(tmp_path / "ibq"))
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(48, 32), (48, 32), (32, 32), (40, 64)]):
        paths.append(str(tmp_path / f"im{i}.png"))
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(paths[-1])
    recs = [fmt.record("x2i", [fmt.image_path(paths[0]), fmt.text("done")], "edit it", [fmt.image_path(paths[1])],
                       turns=[("again", [fmt.image_path(paths[2])], [fmt.image_path(paths[3])])]),
            fmt.record("t2i", [fmt.image_codes([[1, 2]])], "a code image stays")]
    fmt.write_shard(str(tmp_path / "data" / "s.jsonl"), recs, codebook_size=None)
    summary = pretokenize.main(["--vision-tokenizer", str(tmp_path / "ibq"), "--image-area", "2048", "--batch-size",
                                "2", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "codes")])
    assert summary["images"] == 4 and summary["records"] == 2
    out = list(fmt.read_shard(str(tmp_path / "codes" / "s.jsonl")))
    assert fmt.read_header(str(tmp_path / "codes" / "s.jsonl"))["codebook_size"] == 256
    ibq = load_vision_tokenizer(str(tmp_path / "ibq"))
    want = fmt.map_images(recs[0], lambda im: {"codes": image_codes(ibq, im["path"], 2048)})
    assert out == [want, recs[1]]
    # the trainer's ids are the same either way
    enc = lambda r, fn=None: fmt.encode_record(r, bpe, mode="sft", visual_weight=1.0, image_codes=fn).ids  # noqa: E731
    assert enc(out[0]) == enc(recs[0], lambda p: image_codes(ibq, p, 2048))
    with pytest.raises(SystemExit):
        pretokenize.main(["--vision-tokenizer", str(tmp_path / "ibq"), "--image-area", "2048",
                          "--data", str(tmp_path / "data"), "--out", str(tmp_path / "data")])
    assert "out: must differ from --data" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ from_episodes

def _write_episodes(root, n_episodes=2, n_steps=3, size=32):
    from PIL import Image

    rng = np.random.default_rng(0)
    for e in range(n_episodes):
        d = root / f"ep{e}"
        d.mkdir(parents=True)
        steps = []
        for s in range(n_steps + 1):
            a = np.full((size, size, 3), rng.integers(0, 255, 3), np.uint8)
            Image.fromarray(a).save(d / f"{s:03d}.png")
            if s:
                steps.append({"text": f"move {['left', 'right', 'forward'][s % 3]} {e}", "frame": f"{s:03d}.png"})
        (d / "episode.json").write_text(json.dumps({"instruction": f"find the door {e}", "arm": "Franka Panda",
                                                    "initial_frame": "000.png", "steps": steps}))


def test_from_episodes_round_trip_masks_exactly_the_answers(tmp_path, bpe):
    from train.data import from_episodes
    from train.data.vision import image_codes, load_vision_tokenizer

    _write_episodes(tmp_path / "eps")
    summary = from_episodes.convert(str(tmp_path / "eps"), str(tmp_path / "out"), "vla", image_area=32 * 32,
                                    all_starts=True)
    assert summary["episodes"] == 2 and summary["sequences"] == 6  # 3 starting steps each
    # expected answers, built independently from the episode files
    ibq = load_vision_tokenizer(None)
    v = bpe.vocab
    expected = []
    for e in range(2):
        for k in range(3):
            ids = []
            for s in range(k + 1, 4):
                text = f"Current Step: move {['left', 'right', 'forward'][s % 3]} {e}"
                ids += bpe.encode(text, allow_special=False)
                ids += v.image_ids(image_codes(ibq, str(tmp_path / "eps" / f"ep{e}" / f"{s:03d}.png"), 32 * 32))
            expected.append(ids + [v.answer_end, v.eos])
    docs = [fmt.encode_record(r, bpe, mode="sft", visual_weight=1.0)
            for path in fmt.shard_paths([str(tmp_path / "out")]) for r in fmt.read_shard(path)]
    batch = collate(list(pack(docs, seq_len=256)), 256, v.pad)
    found = []
    for i in range(batch.ids.shape[0]):
        ids, w, doc = batch.ids[i].tolist(), batch.weights[i].tolist(), batch.doc_ids[i].tolist()
        for d in sorted(set(doc) - {0}):
            pos = [p for p in range(len(ids)) if doc[p] == d]
            bearing = [p for p in pos if w[p] > 0]
            start = ids.index(v.answer_start, pos[0]) + 1
            assert bearing == list(range(start, pos[-1] + 1))  # a contiguous span, right after <extra_100>
            found.append([ids[p] for p in bearing])
    assert sorted(found) == sorted(expected)


def test_from_episodes_task_formats(tmp_path):
    from train.data import from_episodes

    _write_episodes(tmp_path / "eps", n_episodes=1, n_steps=2)
    counts = {t: from_episodes.convert(str(tmp_path / "eps"), str(tmp_path / t), t, raw_images=True)["sequences"]
              for t in fmt.TASKS}
    assert counts == {"t2i": 2, "x2i": 2, "howto": 1, "story": 1, "explore": 1, "vla": 1}
    (rec,) = fmt.read_shard(str(tmp_path / "vla" / "shard-00000.jsonl"))
    assert rec["question"] == "Robot Arm Type: Franka Panda. Instruction: find the door 0. Finish the task with 2 steps."
    assert rec["answer"][0] == {"text": "Current Step: move right 0"}
    assert rec["answer"][1]["image"]["path"].endswith("ep0/001.png")


def test_from_episodes_missing_frame_exits_nonzero_naming_it(tmp_path):
    _write_episodes(tmp_path / "eps", n_episodes=1)
    os.remove(tmp_path / "eps" / "ep0" / "002.png")
    r = subprocess.run([sys.executable, "-m", "train.data.from_episodes", str(tmp_path / "eps"), "--out",
                        str(tmp_path / "out"), "--task", "explore"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert "002.png" in r.stderr and "does not exist" in r.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ from_video

def _write_clip(path, fps=10):
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (96, 64))
    scenes = [((0, 0, 255), 2.0), ((0, 255, 0), 1.0), ((255, 0, 0), 9.0), ((0, 255, 255), 1.5)]  # BGR, seconds
    for color, seconds in scenes:
        for i in range(int(seconds * fps)):
            f = np.zeros((64, 96, 3), np.uint8)
            f[:] = color
            f[20:30, (2 * i) % 86:(2 * i) % 86 + 10] = 255  # motion inside a scene is not a cut
            w.write(f)
    w.release()


SRT = """1
00:00:00,500 --> 00:00:01,500
A red room.

2
00:00:02,200 --> 00:00:02,900
Now <i>green</i>.

3
00:00:04,000 --> 00:00:05,000
Blue sky
for a while.
"""


def test_from_video_finds_cuts_and_interleaves_in_time_order(tmp_path):
    _write_clip(tmp_path / "clip.avi")
    (tmp_path / "clip.srt").write_text(SRT)
    r = subprocess.run([sys.executable, "-m", "train.data.from_video", str(tmp_path / "clip.avi"), "--transcript",
                        str(tmp_path / "clip.srt"), "--out", str(tmp_path / "out"), "--image-area", "4096",
                        "--keyframe-every", "4"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    s = json.loads(lines[-1])
    assert len(lines) == 1
    assert s["scenes"] == 4 and s["cuts_s"] == [2.0, 3.0, 12.0]
    # short scenes: their middle frame; the 9 s scene: one every 4 s from 3 s + 2 s
    assert s["keyframe_times_s"] == [0.9, 2.4, 5.0, 9.0, 12.7]
    assert s["keyframes"] == 5 and s["text_segments"] == 3
    (rec,) = fmt.read_shard(str(tmp_path / "out" / "shard-00000.jsonl"))
    kinds = ["T:" + seg["text"] if "text" in seg else "I" for seg in rec["answer"]]
    assert kinds == ["T:A red room.", "I", "T:Now green.", "I", "T:Blue sky for a while.", "I", "I", "I"]
    assert len(os.listdir(tmp_path / "out" / "keyframes")) == 5
    first = rec["answer"][1]["image"]["codes"]
    assert len(first) == 3 and len(first[0]) == 5  # 48x80 px at area 4096 -> 3x5 codes (factor 16)


def test_from_video_keyframe_colours_match_their_scenes(tmp_path, capsys):
    import importlib.util

    from PIL import Image

    from train.data import from_video

    _write_clip(tmp_path / "clip.avi")
    summary = from_video.convert(str(tmp_path / "clip.avi"), str(tmp_path / "out"), raw_images=True)
    if importlib.util.find_spec("faster_whisper") is None:  # no transcript and no ASR: said, not silent
        assert "faster-whisper is not installed" in capsys.readouterr().err and summary["asr"] == "none"
    files = sorted(os.listdir(tmp_path / "out" / "keyframes"))
    pixels = [np.asarray(Image.open(tmp_path / "out" / "keyframes" / f))[50, 5].astype(int) for f in files]
    colours = [tuple(int(c > 128) for c in p) for p in pixels]  # RGB, thresholded (MJPG is lossy)
    assert colours == [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 1), (1, 1, 0)]  # red, green, blue x2, yellow


def test_from_video_undecodable_file_exits_nonzero_naming_it(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    r = subprocess.run([sys.executable, "-m", "train.data.from_video", str(bad), "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert "broken.mp4" in r.stderr and "cannot be decoded" in r.stderr


def test_transcript_parsers(tmp_path):
    from train.data.from_video import read_transcript

    (tmp_path / "a.vtt").write_text("WEBVTT\n\nNOTE hello\n\n00:01.000 --> 00:02.500 align:start\n<v Bob>Hi</v> there\n\n"
                                    "01:00:00.250 --> 01:00:01.000\nlate\n")
    cues = read_transcript(str(tmp_path / "a.vtt"))
    assert [(c.start, c.end, c.text) for c in cues] == [(1.0, 2.5, "Hi there"), (3600.25, 3601.0, "late")]
    (tmp_path / "b.srt").write_text("1\n00:00:01,000 --> nonsense\nx\n")
    with pytest.raises(ValueError, match="b.srt line 2"):
        read_transcript(str(tmp_path / "b.srt"))
