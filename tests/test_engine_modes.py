"""Modes end to end on the debug runtime (random weights, 2x2-token images), the sequence layout of
modes.py, prefix-cache reuse (a miss is recomputed with the same result) and the context budget."""

import pytest

from worldsim.modes import Layout, system_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"image_size": [2, 2]}


def images_of(turn):
    return [s["image"] for s in turn["output"] if s["type"] == "image"]


def check_segments(turn):
    """Every output segment is well-formed: a known type, images of the session size, stripped text."""
    for seg in turn["output"]:
        assert seg["type"] in ("text", "cot", "image"), seg
        if seg["type"] == "image":
            assert (seg["height"], seg["width"]) == (2, 2)
        else:
            assert seg["text"] == seg["text"].strip() and seg["text"]


@pytest.fixture
def eng(make_engine):
    return make_engine()


# ---- modes ---------------------------------------------------------------------------------------------
def test_explore_step_by_step(eng):
    first = eng.new("alice", "explore", prompt="a stone bridge over a river", settings=SMALL)
    sid = first["session_id"]
    turns = [first] + [eng.step("alice", sid, text) for text in ("turn left", "walk to the door", "look up")]
    assert [t["seq"] for t in turns] == [0, 1, 2, 3]
    assert [t["kind"] for t in turns] == ["prompt", "instruction", "instruction", "instruction"]
    assert [t["input"]["text"] for t in turns[1:]] == ["turn left", "walk to the door", "look up"]
    for t in turns:
        check_segments(t)
        assert len(images_of(t)) == 1, t["output"]
        # the narration: the turn shape puts text before the image; a random model may spend it on a
        # reasoning (cot) span, which is still the turn's text, just not shown as narration
        kinds = [s["type"] for s in t["output"]]
        assert kinds[0] in ("text", "cot") and kinds.index("image") > 0, t["output"]
        assert t["meta"]["finish_reason"] == "eos"
    assert len({images_of(t)[0] for t in turns}) == 4  # a new picture every step
    assert [t["seq"] for t in eng.show("alice", sid)["turns"]] == [0, 1, 2, 3]


def test_auto_size_keeps_an_uploaded_frame_s_shape(eng, engine_runtime):
    """Without settings.image_size a world started from a picture is drawn in its shape on every turn
    (a 4:3 ViZDoom-like frame -> 5 x 7 tokens of the debug IBQ's factor 16 at 96x96 px: as
    resize_to_area encodes it, the grid a model trained on such frames knows); with no picture the
    grid is square; an explicit image_size wins."""
    from engine_helpers import png_image

    area = {"sampling": {"image_area": 96 * 96}}
    first = eng.new("alice", "explore", prompt="a corridor", images=[png_image(160, 120)], settings=area)
    second = eng.step("alice", first["session_id"], "turn left")
    for turn in (first, second):
        assert turn["meta"]["image_size"] == [5, 7]
        assert [(s["height"], s["width"]) for s in turn["output"] if s["type"] == "image"] == [(5, 7)]
    assert eng.new("alice", "explore", prompt="a corridor", settings=area)["meta"]["image_size"] == [6, 6]
    fixed = eng.new("alice", "explore", prompt="a corridor", images=[png_image(160, 120)],
                    settings={**area, "image_size": [2, 3]})
    assert fixed["meta"]["image_size"] == [2, 3]
    # the rule itself: the shape kept, no side over max_image_side()
    side = engine_runtime.max_image_side()
    assert engine_runtime.default_image_size(4096 * 4096) == (side, side)
    assert engine_runtime.default_image_size(4096 * 4096, (1600, 900)) == (round(side * 192 / 341), side)
    assert engine_runtime.default_image_size(96 * 96, (120, 160)) == (7, 5)  # a portrait picture


def test_auto_free_exploration(eng):
    sid = eng.new("alice", "explore", prompt="a forest path", settings=SMALL)["session_id"]
    job = eng.auto("alice", sid, 3, wait=False)
    done = eng.wait("alice", job["id"], timeout=120)
    assert done["status"] == "done" and done["result"] == {"seqs": [1, 2, 3]}
    assert [t["seq"] for t in done["turns"]] == [1, 2, 3]
    for t in done["turns"]:
        assert t["kind"] == "continue" and t["input"] == {} and t["job_id"] == job["id"]
        check_segments(t)
        assert len(images_of(t)) == 1
    last = eng.auto("alice", sid, 1)  # wait=True returns the last committed turn
    assert last["seq"] == 4 and last["kind"] == "continue"
    assert [t["seq"] for t in eng.show("alice", sid)["turns"]] == [0, 1, 2, 3, 4]


def test_story_beats(eng):
    first = eng.new("alice", "story", prompt="a lighthouse keeper finds a map", settings=SMALL)
    assert len(images_of(first)) == 1
    eng.auto("alice", first["session_id"], 2)
    turns = eng.show("alice", first["session_id"])["turns"]
    assert [(t["seq"], t["kind"]) for t in turns] == [(0, "prompt"), (1, "continue"), (2, "continue")]
    assert all(len(images_of(t)) == 1 for t in turns)


@pytest.mark.parametrize("max_steps", [1, 3])
def test_howto_steps(eng, max_steps):
    t = eng.new("alice", "howto", prompt="how do I plant a tree?", settings={**SMALL, "max_steps": max_steps})
    check_segments(t)
    assert 1 <= len(images_of(t)) <= max_steps
    if max_steps == 1:
        assert len(images_of(t)) == 1


@pytest.mark.parametrize("n", [1, 3])
def test_vla_plan_has_n_keyframes(eng, n):
    from engine_helpers import png_image

    scene = png_image(48, 48, seed=1)
    t = eng.new("alice", "vla", arm="Franka Panda", goal="put the red cube in the bowl", steps=n,
                images=[scene], settings=SMALL)
    assert t["input"]["text"] == ("Robot Arm Type: Franka Panda. Instruction: put the red cube in the bowl. "
                                  f"Finish the task with {n} steps.")
    assert len(t["input"]["images"]) == 1
    check_segments(t)
    assert len(images_of(t)) == n
    shown = eng.show("alice", t["session_id"])
    assert shown["settings"]["steps"] == n and shown["settings"]["arm"] == "Franka Panda"
    plan = shown["plan"]
    assert [p["step"] for p in plan] == list(range(1, n + 1))
    assert [p["image"] for p in plan] == images_of(t)
    assert all(isinstance(p["subtask"], str) for p in plan)
    with pytest.raises(ValueError, match="^mode:"):
        eng.step("alice", t["session_id"], "next")


# ---- vla replan: edit subtask k, plan again from there --------------------------------------------------
def plan_session(eng, n=3, user="alice"):
    from engine_helpers import png_image

    t = eng.new(user, "vla", arm="Franka Panda", goal="put the red cube in the bowl", steps=n,
                images=[png_image(48, 48, seed=1)], settings=SMALL)
    return t["session_id"]


def upto_image(segments, m):
    """The segments up to and including the m-th image."""
    ends = [i for i, s in enumerate(segments) if s["type"] == "image"]
    return segments[:ends[m - 1] + 1] if m else []


def replay_plan_fsm(engine_runtime, answer_ids, n):
    """Advance a fresh FSM with the plan turn's own shape over a whole stored answer: it raises on any
    id the plan's rules forbid. Returns it, at the end of the answer."""
    from model.sampling import DecodeFSM
    from worldsim.modes import turn_shape

    v, shape = engine_runtime.vocab, turn_shape("vla", "prompt", {"steps": n})
    fsm = DecodeFSM(v, engine_runtime.model.config.vocab_size, image_size=(2, 2), stop_ids=(v.answer_end, v.eos),
                    min_images=shape.min_images, max_images=shape.max_images,
                    max_text_tokens=shape.max_text_tokens, min_text_tokens=shape.min_text_tokens)
    for t in answer_ids:
        fsm.advance(t)
    return fsm


@pytest.mark.parametrize("step", [2, 3])
def test_vla_replan_keeps_the_earlier_steps_exactly(eng, engine_runtime, step):
    n, edited = 3, "grasp the red cube from above"
    sid = plan_session(eng, n)
    before = eng.show("alice", sid)
    original = eng.store.turns(sid)[0]

    turn = eng.replan("alice", sid, step, f"  {edited} ")
    new = eng.show("alice", turn["session_id"])
    assert new["session_id"] != sid and new["parent"] == {"session_id": sid, "seq": -1}
    assert new["mode"] == "vla" and new["settings"] == before["settings"]
    assert turn["input"] == original["input"] and turn["kind"] == "prompt"
    assert turn["meta"]["replanned_from"] == {"session_id": sid, "seq": 0, "step": step}
    plan, old_plan = new["plan"], before["plan"]
    assert len(plan) == n and [p["step"] for p in plan] == list(range(1, n + 1))
    assert [(p["subtask"], p["image"]) for p in plan[:step - 1]] == [(p["subtask"], p["image"]) for p in
                                                                     old_plan[:step - 1]]
    assert plan[step - 1]["subtask"] == edited
    check_segments(turn)
    assert upto_image(turn["output"], step - 1) == upto_image(original["output"], step - 1)

    # the exact ids: the original's up to the end of keyframe step-1, the edited text, then the keyframe
    v, tok = engine_runtime.vocab, engine_runtime.tokenizer
    old_ids, ids = original["meta"]["answer_ids"], eng.store.turns(new["session_id"])[0]["meta"]["answer_ids"]
    cut = [i for i, t in enumerate(old_ids) if t == v.eoi][step - 2] + 1
    text = tok.encode(f"Current Step: {edited}", allow_special=False)
    assert ids[:cut] == old_ids[:cut]
    assert ids[cut:cut + len(text) + 1] == text + [v.boi]
    assert turn["meta"]["forced_tokens"] == cut + len(text)
    fsm = replay_plan_fsm(engine_runtime, ids, n)  # the whole answer obeys the plan's rules
    assert fsm.images_done == n and fsm.forced() == v.answer_end
    # new keyframes are stored like any generated image (with their codes) and served to the owner
    for p in plan[step - 1:]:
        assert len(eng.store.get_image(p["image"])["codes"]) == 2
        assert eng.image("alice", p["image"])[:4] == b"\x89PNG"

    assert eng.show("alice", sid) == before  # the original plan is untouched and still there
    assert {s["session_id"] for s in eng.list("alice")} == {sid, new["session_id"]}


def test_vla_replan_from_step_1_keeps_nothing(eng, engine_runtime):
    sid = plan_session(eng, 2)
    turn = eng.replan("alice", sid, 1, "open the gripper")
    plan = eng.show("alice", turn["session_id"])["plan"]
    assert [p["subtask"] for p in plan][:1] == ["open the gripper"] and len(plan) == 2
    v = engine_runtime.vocab
    ids = eng.store.turns(turn["session_id"])[0]["meta"]["answer_ids"]
    text = engine_runtime.tokenizer.encode("Current Step: open the gripper", allow_special=False)
    assert ids[:len(text) + 1] == text + [v.boi] and turn["meta"]["forced_tokens"] == len(text)
    assert replay_plan_fsm(engine_runtime, ids, 2).images_done == 2
    assert len(eng.show("alice", sid)["plan"]) == 2  # the original is still there


def test_vla_replan_refuses_bad_input_and_changes_nothing(eng):
    from engine_helpers import snapshot

    from worldsim.store import NotFound

    sid = plan_session(eng, 3)
    walk = eng.new("alice", "explore", prompt="a garden", settings=SMALL)["session_id"]
    cases = [
        (lambda: eng.replan("alice", sid, 0, "lift it"), ValueError, r"^step: must be an integer in \[1, 3\].*got 0"),
        (lambda: eng.replan("alice", sid, 4, "lift it"), ValueError, r"^step: must be an integer in \[1, 3\].*got 4"),
        (lambda: eng.replan("alice", sid, "2", "lift it"), ValueError, r"^step: .*got '2'"),
        (lambda: eng.replan("alice", sid, True, "lift it"), ValueError, r"^step:"),
        (lambda: eng.replan("alice", sid, 2, "  "), ValueError, r"^subtask: must not be empty"),
        (lambda: eng.replan("alice", sid, 2, None), ValueError, r"^subtask: must not be empty"),
        (lambda: eng.replan("alice", walk, 1, "lift it"), ValueError, r"^mode: .*; this one is explore"),
        (lambda: eng.replan("bob", sid, 2, "lift it"), NotFound, r"^session_id: no session .* for user 'bob'"),
        (lambda: eng.replan("alice", "0" * 32, 2, "lift it"), NotFound, r"^session_id: no session"),
    ]
    before = snapshot(eng.store)
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()
    assert snapshot(eng.store) == before


def test_t2i_turns_are_independent(eng, engine_runtime):
    first = eng.new("alice", "t2i", prompt="a red bicycle", settings=SMALL)
    second = eng.step("alice", first["session_id"], "a blue boat on a lake at night")
    for t in (first, second):
        assert [s["type"] for s in t["output"]] == ["image"]
    assert second["kind"] == "prompt"
    # turn 2 sees no history: its prompt is the opening with its own text, nothing of turn 1
    layout = Layout(engine_runtime.tokenizer, image_ids=None)
    for t in (first, second):
        pending = {"kind": "prompt", "input": t["input"], "output": [], "meta": {}}
        assert t["meta"]["prompt_tokens"] == len(layout.turn_pieces("t2i", [pending], True)[0])
    assert second["meta"]["prompt_tokens"] < first["meta"]["prompt_tokens"] + first["meta"]["generated_tokens"]


@pytest.mark.parametrize("num_refs", [1, 3])
def test_x2i_reference_images(eng, engine_runtime, num_refs):
    from engine_helpers import png_image

    refs = [png_image(32, 32, seed=10 + i) for i in range(num_refs)]
    t = eng.new("alice", "x2i", prompt="make it snowy", images=refs, settings=SMALL)
    assert [s["type"] for s in t["output"]] == ["image"]
    assert len(t["input"]["images"]) == num_refs
    # the references were encoded at the session's image size and sit before the question
    v = engine_runtime.vocab
    codes = {h: eng.store.get_image(h)["codes"]["2x2"] for h in t["input"]["images"]}
    layout = Layout(engine_runtime.tokenizer, image_ids=lambda h: v.image_ids(codes[h]))
    expected = ([v.bos] + engine_runtime.tokenizer.encode(system_text("x2i", True) + " USER: ", allow_special=False)
                + [i for h in t["input"]["images"] for i in v.image_ids(codes[h])]
                + engine_runtime.tokenizer.encode("make it snowy ASSISTANT: ", allow_special=False)
                + [v.answer_start])
    pending = {"kind": "prompt", "input": t["input"], "output": [], "meta": {}}
    assert layout.turn_pieces("x2i", [pending], True)[0] == expected
    assert t["meta"]["prompt_tokens"] == len(expected)
    again = eng.step("alice", t["session_id"], "now at night", images=refs[:1])
    assert again["seq"] == 1 and [s["type"] for s in again["output"]] == ["image"]


def test_x2i_refuses_four_references(eng):
    from engine_helpers import png_image, snapshot

    before = snapshot(eng.store)
    with pytest.raises(ValueError, match="^images:.*3"):
        eng.new("alice", "x2i", prompt="merge", images=[png_image(8, 8, seed=i) for i in range(4)], settings=SMALL)
    with pytest.raises(ValueError, match="^images:"):
        eng.new("alice", "x2i", prompt="nothing to edit", settings=SMALL)
    assert snapshot(eng.store) == before


# ---- the sequence layout (modes.py docstring, SPEC §2) ---------------------------------------------------
def test_layout_of_a_multi_turn_explore_session(bpe):
    v = bpe.vocab
    grids = {"in": [[1, 2], [3, 4]], "a": [[5]], "b": [[6, 7]], "c": [[8], [9]]}
    img = {h: v.image_ids(g) for h, g in grids.items()}
    enc = lambda s: bpe.encode(s, allow_special=False)
    turns = [
        {"kind": "prompt", "input": {"text": "a red room", "images": ["in"]},
         "output": [{"type": "text", "text": "You see a door."}, {"type": "image", "image": "a"}], "meta": {}},
        {"kind": "instruction", "input": {"text": "open the door", "images": []},
         "output": [{"type": "text", "text": "It opens."}, {"type": "image", "image": "b"}], "meta": {}},
        {"kind": "continue", "input": {},
         "output": [{"type": "cot", "text": "plan"}, {"type": "text", "text": "A hall."},
                    {"type": "image", "image": "c"}], "meta": {}},
        {"kind": "instruction", "input": {"text": "go in", "images": []}, "output": [], "meta": {}},
    ]
    layout = Layout(bpe, image_ids=img.__getitem__)
    cond = layout.turn_pieces("explore", turns, conditional=True)
    assert cond == [
        [v.bos] + enc("You are a helpful assistant for explore task. USER: a red room") + img["in"]
        + enc(" ASSISTANT: ") + [v.answer_start] + enc("You see a door.") + img["a"],
        [v.answer_end] + enc(" USER: open the door ASSISTANT: ") + [v.answer_start] + enc("It opens.") + img["b"],
        [v.cot_start] + enc("plan") + [v.cot_end] + enc("A hall.") + img["c"],  # continues the open answer
        [v.answer_end] + enc(" USER: go in ASSISTANT: ") + [v.answer_start],
    ]
    uncond = layout.turn_pieces("explore", turns, conditional=False)
    assert uncond == [
        [v.bos] + enc("You are a helpful assistant. USER: ") + img["in"] + enc(" ASSISTANT: ") + [v.answer_start]
        + enc("You see a door.") + img["a"],
        [v.answer_end] + enc(" USER:  ASSISTANT: ") + [v.answer_start] + enc("It opens.") + img["b"],
        cond[2],
        [v.answer_end] + enc(" USER:  ASSISTANT: ") + [v.answer_start],
    ]
    # the ids a turn was generated as win over re-tokenizing its segments
    exact = [dict(t) for t in turns]
    exact[1] = {**turns[1], "meta": {"answer_ids": [11, 12, 13]}}
    assert layout.turn_pieces("explore", exact, True)[1] == \
        [v.answer_end] + enc(" USER: open the door ASSISTANT: ") + [v.answer_start, 11, 12, 13]


def test_layout_howto_and_x2i_openings(bpe):
    v = bpe.vocab
    enc = lambda s: bpe.encode(s, allow_special=False)
    img = {"r1": v.image_ids([[1]]), "r2": v.image_ids([[2]])}
    layout = Layout(bpe, image_ids=img.__getitem__)
    howto = layout.turn_pieces("howto", [{"kind": "prompt", "input": {"text": "tie a knot"}, "output": []}], True)
    assert howto == [[v.bos] + enc("You are a helpful assistant for howto task. Please generate a response with "
                                   "interleaved text and images. USER: tie a knot ASSISTANT: ") + [v.answer_start]]
    x2i = {"kind": "prompt", "input": {"text": "blend", "images": ["r1", "r2"]}, "output": []}
    assert layout.turn_pieces("x2i", [x2i], True) == [
        [v.bos] + enc("You are a helpful assistant for x2i task. USER: ") + img["r1"] + img["r2"]
        + enc("blend ASSISTANT: ") + [v.answer_start]]
    assert layout.turn_pieces("x2i", [x2i], False) == [
        [v.bos] + enc("You are a helpful assistant. USER: ") + img["r1"] + img["r2"]
        + enc(" ASSISTANT: ") + [v.answer_start]]


def test_engine_prompt_matches_layout(eng, engine_runtime):
    """What the engine actually fed the model for turn 3 is the layout of turns 0..2 plus turn 3's
    question (prompt_tokens), with the uploaded image encoded at the session's size."""
    from engine_helpers import png_image

    t0 = eng.new("alice", "explore", prompt="a desert", images=[png_image(32, 32, seed=3)], settings=SMALL)
    sid = t0["session_id"]
    eng.step("alice", sid, "walk north")
    eng.auto("alice", sid, 1)
    t3 = eng.step("alice", sid, "dig")
    turns = eng.store.turns(sid)
    v = engine_runtime.vocab
    codes = eng.store.get_image(t0["input"]["images"][0])["codes"]["2x2"]
    layout = Layout(engine_runtime.tokenizer, image_ids=lambda h: v.image_ids(codes))
    pending = {**turns[3], "output": [], "meta": {}}
    pieces = layout.turn_pieces("explore", turns[:3] + [pending], True)
    assert t3["meta"]["prompt_tokens"] == sum(len(p) for p in pieces)
    # each committed answer, re-laid out, is exactly the ids the model generated
    for t in turns:
        assert images_of(t) and t["meta"]["answer_ids"].count(v.boi) == len(images_of(t))


# ---- prefix cache --------------------------------------------------------------------------------------
def test_cache_reuse_and_recompute_give_the_same_turn(make_engine):
    from worldsim.runtime import Runtime

    eng = make_engine()
    sid = eng.new("alice", "explore", prompt="a snowy village", settings=SMALL)["session_id"]
    t1 = eng.step("alice", sid, "knock on a door")
    assert t1["meta"]["cached_tokens_reused"] > 0  # turn 1 reuses turn 0's cached prefix
    t2 = eng.step("alice", sid, "go inside")
    assert t2["meta"]["cached_tokens_reused"] > t1["meta"]["cached_tokens_reused"]
    reference = eng.store.turns(sid)[2]

    # 1) cache hit on a cropped prefix: delete turn 2 behind the engine's back and step again
    eng.store.delete_turns_from(sid, 2)
    hit = eng.step("alice", sid, "go inside")
    assert hit["meta"]["cached_tokens_reused"] > 0
    got = [(hit, eng.store.turns(sid)[2])]
    # 2) cache miss: undo forgets the session's cache; the same step is recomputed from scratch
    eng.undo("alice", sid)
    miss = eng.step("alice", sid, "go inside")
    assert miss["meta"]["cached_tokens_reused"] == 0
    got.append((miss, eng.store.turns(sid)[2]))
    # 3) a fresh runtime with identical weights (another process, after a restart)
    eng.close()
    eng2 = make_engine(runtime=Runtime.debug())
    eng2.store.delete_turns_from(sid, 2)
    fresh = eng2.step("alice", sid, "go inside")
    assert fresh["meta"]["cached_tokens_reused"] == 0
    got.append((fresh, eng2.store.turns(sid)[2]))
    for turn, stored in got:
        assert turn["seq"] == 2 and turn["meta"]["seed"] == reference["meta"]["seed"]
        assert stored["meta"]["answer_ids"] == reference["meta"]["answer_ids"]
        assert turn["output"] == reference["output"]


# ---- context budget ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_context_runtime():
    from model.config import preset
    from worldsim.runtime import Runtime

    return Runtime.debug(config=preset("debug").replace(max_position_embeddings=640))


def test_context_budget_drops_old_turns_but_keeps_the_opening(make_engine, tiny_context_runtime):
    from engine_helpers import png_image

    from worldsim.modes import turn_shape

    rt = tiny_context_runtime
    context = rt.model.config.max_position_embeddings
    eng = make_engine(runtime=rt)
    t0 = eng.new("alice", "explore", prompt="a maze of hedges", images=[png_image(32, 32, seed=4)], settings=SMALL)
    sid = t0["session_id"]
    for k in range(4):
        eng.step("alice", sid, f"take turn {k}")
        eng.auto("alice", sid, 2)
    turns = eng.store.turns(sid)
    assert len(turns) == 13
    dropped = [set(t["meta"]["dropped_turns"]) for t in turns]
    assert dropped[-1], "after 13 turns in a 640-token context, the newest turn must have dropped some"
    reserve = rt.reserve(turn_shape("explore", "instruction", SMALL), (2, 2))
    v = rt.vocab
    codes = eng.store.get_image(t0["input"]["images"][0])["codes"]["2x2"]
    layout = Layout(rt.tokenizer, image_ids=lambda h: v.image_ids(codes))
    for t, gone in zip(turns, dropped):
        seq = t["seq"]
        assert 0 not in gone and seq not in gone and gone <= set(range(1, seq))
        assert gone == set(range(1, 1 + len(gone))), f"turn {seq} dropped {sorted(gone)}: not the oldest ones"
        # what the model saw: turn 0 (prompt + first image), the kept turns, and this turn's question
        pending = {**t, "output": [], "meta": {}}
        kept = [x for x in turns[:seq] if x["seq"] not in gone] + [pending]
        assert t["meta"]["prompt_tokens"] == sum(len(p) for p in layout.turn_pieces("explore", kept, True))
        assert t["meta"]["prompt_tokens"] + reserve <= context
        assert len(images_of(t)) == 1 and t["meta"]["finish_reason"] == "eos"
    more = eng.step("alice", sid, "keep going")  # still works with a long history
    assert more["seq"] == 13 and len(images_of(more)) == 1 and 0 not in more["meta"]["dropped_turns"]
