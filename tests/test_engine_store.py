"""The store contract, run against every backend: SQLite and a real PostgreSQL server, each without
Redis (in-process queue and events) and with a real redis-server (DESIGN: "one contract test runs
against SQLite, PostgreSQL and Redis, the real servers").

Covers sessions (create/list/show), idempotent commits and job retries, undo, branch, re-roll,
concurrent steps on different sessions and on one session, isolation between users, and images
stored once by content hash.
"""

import hashlib
import threading

import pytest

from worldsim.modes import Layout
from worldsim.store import Conflict, NotFound
from worldsim.worker import Worker

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"image_size": [2, 2]}


@pytest.fixture(params=[("sqlite", False), ("sqlite", True), ("postgresql", False), ("postgresql", True)],
                ids=["sqlite", "sqlite+redis", "postgresql", "postgresql+redis"])
def backend(request, make_engine):
    """make(workers=1) -> an Engine on this backend; every engine of one test shares the database."""
    db, with_redis = request.param
    url = request.getfixturevalue("pg_url") if db == "postgresql" else None
    redis_url = request.getfixturevalue("redis_service") if with_redis else None

    def make(workers=1):
        return make_engine(url, redis_url, workers=workers)

    return make


def seqs_of(engine, user, sid):
    return [t["seq"] for t in engine.show(user, sid)["turns"]]


def image_segments(turn):
    return [s for s in turn["output"] if s["type"] == "image"]


# ---- sessions ------------------------------------------------------------------------------------------
def test_create_list_show(backend):
    eng = backend()
    assert eng.list("alice") == []
    first = eng.new("alice", "explore", prompt="a red room with a door", settings=SMALL)
    assert first["seq"] == 0 and first["kind"] == "prompt"
    assert first["input"] == {"text": "a red room with a door", "images": []}
    assert len(image_segments(first)) == 1
    second = eng.new("alice", "story", prompt="a fox in the snow", settings={**SMALL, "seed": 3})

    listed = eng.list("alice")
    assert [s["session_id"] for s in listed] == [second["session_id"], first["session_id"]]  # newest first
    assert [(s["mode"], s["num_turns"], s["owner"]) for s in listed] == [("story", 1, "alice"), ("explore", 1, "alice")]

    shown = eng.show("alice", first["session_id"])
    assert shown["mode"] == "explore" and shown["owner"] == "alice" and shown["parent"] is None
    assert shown["settings"]["image_size"] == [2, 2]
    assert [t["seq"] for t in shown["turns"]] == [0]
    assert shown["turns"][0]["output"] == first["output"]
    assert "answer_ids" not in shown["turns"][0]["meta"]
    assert eng.show("alice", second["session_id"])["settings"]["seed"] == 3

    eng.delete("alice", first["session_id"])
    assert [s["session_id"] for s in eng.list("alice")] == [second["session_id"]]
    with pytest.raises(NotFound):
        eng.show("alice", first["session_id"])


def test_commit_turn_is_idempotent_per_job(backend):
    store = backend(workers=0).store
    sid = store.create_session("alice", "explore", {"seed": 0})["session_id"]
    out = [{"type": "text", "text": "hello"}]
    t = store.commit_turn(sid, 0, "prompt", {"text": "hi", "images": []}, out, {"k": 1}, job_id="job-a")
    again = store.commit_turn(sid, 0, "prompt", {"text": "hi", "images": []}, out, {"k": 1}, job_id="job-a")
    assert again == t
    with pytest.raises(Conflict):
        store.commit_turn(sid, 0, "prompt", {"text": "other", "images": []}, out, {}, job_id="job-b")
    with pytest.raises(Conflict):  # a gap: seq 2 before seq 1
        store.commit_turn(sid, 2, "instruction", {"text": "x", "images": []}, out, {}, job_id="job-c")
    t1 = store.commit_turn(sid, 1, "instruction", {"text": "go", "images": []}, out, {}, job_id="job-d")
    assert t1["seq"] == 1
    turns = store.turns(sid)
    assert [(x["seq"], x["job_id"], x["input"]["text"]) for x in turns] == [(0, "job-a", "hi"), (1, "job-d", "go")]


def test_racing_commits_of_one_seq_exactly_one_wins(backend):
    store = backend(workers=0).store
    sid = store.create_session("alice", "explore", {"seed": 0})["session_id"]
    n = 6
    barrier, results = threading.Barrier(n), [None] * n

    def commit(i):
        barrier.wait()
        try:
            store.commit_turn(sid, 0, "prompt", {"text": f"t{i}", "images": []}, [], {}, job_id=f"job-{i}")
            results[i] = "ok"
        except Conflict:
            results[i] = "conflict"

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["conflict"] * (n - 1) + ["ok"]
    turns = store.turns(sid)
    assert len(turns) == 1 and turns[0]["job_id"] == f"job-{results.index('ok')}"


def test_retried_job_commits_nothing_twice(backend, engine_runtime):
    """A job whose worker died after committing is run again: it finds its own turns and completes
    with the same seqs (the worker reads the SQL record, not its memory)."""
    eng = backend(workers=0)
    worker = Worker(eng.store, eng.hot, engine_runtime, worker_id="w-test")
    job = eng.new("alice", "explore", prompt="a hall", settings=SMALL, wait=False)
    worker.execute(job["id"])
    sid = job["session_id"]
    auto = eng.auto("alice", sid, 2, wait=False)
    worker.execute(auto["id"])
    before = eng.store.turns(sid)
    assert [t["seq"] for t in before] == [0, 1, 2]
    # the worker "died" before recording the outcome: the job is queued again and re-run
    eng.store.update_job(auto["id"], status="queued", result=None)
    worker.execute(auto["id"])
    after = eng.store.turns(sid)
    assert after == before
    done = eng.job("alice", auto["id"])
    assert done["status"] == "done" and done["result"] == {"seqs": [1, 2]} and done["attempts"] == 2
    # half done: one of its two turns committed, then death; the retry makes only the missing one
    eng.store.delete_turns_from(sid, 2)
    eng.store.update_job(auto["id"], status="running", result=None)
    worker.execute(auto["id"])
    turns = eng.store.turns(sid)
    assert [t["seq"] for t in turns] == [0, 1, 2] and turns[1] == before[1]
    assert [t["job_id"] for t in turns[1:]] == [auto["id"]] * 2
    assert turns[2]["meta"]["seed"] == before[2]["meta"]["seed"] and turns[2]["output"] == before[2]["output"]
    assert eng.job("alice", auto["id"])["result"] == {"seqs": [1, 2]}


# ---- undo, branch, re-roll -----------------------------------------------------------------------------
def test_undo(backend):
    eng = backend()
    sid = eng.new("alice", "explore", prompt="a garden", settings=SMALL)["session_id"]
    eng.step("alice", sid, "walk to the tree")
    last = eng.step("alice", sid, "look up")
    assert seqs_of(eng, "alice", sid) == [0, 1, 2]
    shown = eng.undo("alice", sid)
    assert [t["seq"] for t in shown["turns"]] == [0, 1] and shown["num_turns"] == 2
    again = eng.step("alice", sid, "look down")
    assert again["seq"] == 2 and again["input"]["text"] == "look down" and again["job_id"] != last["job_id"]
    eng.undo("alice", sid)
    eng.undo("alice", sid)
    eng.undo("alice", sid)
    assert eng.show("alice", sid)["turns"] == []
    with pytest.raises(ValueError, match="session"):
        eng.undo("alice", sid)


def test_branch_shares_prefix_and_diverges(backend):
    eng = backend()
    sid = eng.new("alice", "explore", prompt="a corridor", settings=SMALL)["session_id"]
    eng.step("alice", sid, "turn left")
    eng.step("alice", sid, "go forward")
    original = eng.show("alice", sid)["turns"]

    branch = eng.branch("alice", sid, 1)
    bid = branch["session_id"]
    assert bid != sid and branch["parent"] == {"session_id": sid, "seq": 1}
    assert [t["seq"] for t in branch["turns"]] == [0, 1]
    for copied, orig in zip(branch["turns"], original[:2]):
        assert (copied["kind"], copied["input"], copied["output"]) == (orig["kind"], orig["input"], orig["output"])
        assert copied["meta"]["copied_from"] == {"session_id": sid, "seq": orig["seq"]}
    assert {s["session_id"] for s in eng.list("alice")} == {sid, bid}

    b2 = eng.step("alice", bid, "turn right")
    assert b2["seq"] == 2 and b2["session_id"] == bid
    assert eng.show("alice", sid)["turns"] == original  # the parent is untouched
    o3 = eng.step("alice", sid, "open the door")
    assert o3["seq"] == 3
    assert seqs_of(eng, "alice", bid) == [0, 1, 2]
    assert eng.show("alice", bid)["turns"][2]["input"]["text"] == "turn right"
    # a branch of the first turn only, and deleting the parent keeps the branch
    b0 = eng.branch("alice", sid, 0)
    assert [t["seq"] for t in b0["turns"]] == [0]
    eng.delete("alice", sid)
    assert seqs_of(eng, "alice", bid) == [0, 1, 2]


def test_reroll_last_turn_replaces_it(backend):
    eng = backend()
    sid = eng.new("alice", "explore", prompt="a cave", settings=SMALL)["session_id"]
    old = eng.step("alice", sid, "light a torch")
    new = eng.reroll("alice", sid)
    assert new["session_id"] == sid and new["seq"] == 1
    assert new["meta"]["rerolled"] == 1 and new["meta"]["seed"] != old["meta"]["seed"]
    assert new["input"] == old["input"] and new["kind"] == old["kind"]
    assert new["output"] != old["output"]
    turns = eng.show("alice", sid)["turns"]
    assert [t["seq"] for t in turns] == [0, 1] and turns[1]["job_id"] == new["job_id"]
    newer = eng.reroll("alice", sid, 1)
    assert newer["meta"]["rerolled"] == 2 and newer["meta"]["seed"] not in (old["meta"]["seed"], new["meta"]["seed"])
    assert seqs_of(eng, "alice", sid) == [0, 1]


def test_reroll_earlier_turn_makes_a_branch(backend):
    eng = backend()
    sid = eng.new("alice", "explore", prompt="a beach", settings=SMALL)["session_id"]
    eng.step("alice", sid, "walk to the sea")
    eng.step("alice", sid, "look at the sky")
    before = eng.show("alice", sid)["turns"]

    turn = eng.reroll("alice", sid, 1)
    bid = turn["session_id"]
    assert bid != sid and turn["seq"] == 1 and turn["input"] == before[1]["input"]
    branch = eng.show("alice", bid)
    assert branch["parent"] == {"session_id": sid, "seq": 0}
    assert [t["seq"] for t in branch["turns"]] == [0, 1]
    assert branch["turns"][0]["output"] == before[0]["output"]
    assert eng.show("alice", sid)["turns"] == before

    first = eng.reroll("alice", sid, 0)  # the opening turn: a new session from the same prompt
    assert first["session_id"] not in (sid, bid) and first["seq"] == 0 and first["input"] == before[0]["input"]
    assert seqs_of(eng, "alice", first["session_id"]) == [0]
    with pytest.raises(ValueError, match="seq"):
        eng.reroll("alice", sid, 7)


# ---- concurrency ---------------------------------------------------------------------------------------
def test_concurrent_steps_on_different_sessions(backend):
    eng = backend(workers=2)
    sids = [eng.new("alice", "explore", prompt=f"room {i}", settings=SMALL)["session_id"] for i in range(4)]
    errors = []

    def walk(i, sid):
        try:
            for k in range(2):
                eng.step("alice", sid, f"step {k} of walker {i}", timeout=120)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=walk, args=(i, sid)) for i, sid in enumerate(sids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert errors == []
    for i, sid in enumerate(sids):
        turns = eng.show("alice", sid)["turns"]
        assert [t["seq"] for t in turns] == [0, 1, 2]
        assert [t["input"]["text"] for t in turns[1:]] == [f"step 0 of walker {i}", f"step 1 of walker {i}"]
        assert len({t["job_id"] for t in turns}) == 3
        assert all(len(image_segments(t)) == 1 for t in turns)


def test_concurrent_steps_on_one_session_never_interleave(backend, engine_runtime):
    eng = backend(workers=2)
    sid = eng.new("alice", "explore", prompt="a market", settings=SMALL)["session_id"]
    jobs = []
    barrier = threading.Barrier(2)

    def submit(text):
        barrier.wait()
        jobs.append(eng.step("alice", sid, text, wait=False))

    threads = [threading.Thread(target=submit, args=(x,)) for x in ("buy bread", "sell fish")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for job in jobs:
        eng.wait("alice", job["id"], timeout=120)
    turns = eng.store.turns(sid)  # with answer_ids, to rebuild what each turn was conditioned on
    assert [t["seq"] for t in turns] == [0, 1, 2]
    assert sorted(t["input"]["text"] for t in turns[1:]) == ["buy bread", "sell fish"]
    assert sorted(t["job_id"] for t in turns[1:]) == sorted(j["id"] for j in jobs)
    # each turn was generated on the complete history before it: its prompt is exactly the layout of
    # the earlier turns plus its own question (an interleaved step would have seen a shorter history)
    layout = Layout(engine_runtime.tokenizer, image_ids=None)
    for seq in (1, 2):
        pending = {"kind": turns[seq]["kind"], "input": turns[seq]["input"], "output": [], "meta": {}}
        pieces = layout.turn_pieces("explore", turns[:seq] + [pending], conditional=True)
        assert turns[seq]["meta"]["prompt_tokens"] == sum(len(p) for p in pieces)
        assert turns[seq]["meta"]["seed"] == seq * 7  # settings.seed 0: seed = seq * 7
    for job in jobs:
        assert eng.job("alice", job["id"])["result"]["seqs"] in ([1], [2])


# ---- users ---------------------------------------------------------------------------------------------
def test_users_never_see_each_other(backend):
    eng = backend()
    a = eng.new("alice", "explore", prompt="alice's secret room", settings=SMALL)
    sid = a["session_id"]
    digest = image_segments(a)[0]["image"]
    before = eng.show("alice", sid)

    for call in (lambda: eng.show("bob", sid), lambda: eng.step("bob", sid, "walk"),
                 lambda: eng.branch("bob", sid, 0), lambda: eng.delete("bob", sid),
                 lambda: eng.undo("bob", sid), lambda: eng.auto("bob", sid, 1),
                 lambda: eng.reroll("bob", sid), lambda: eng.image("bob", digest),
                 lambda: eng.job("bob", a["job_id"]), lambda: list(eng.events("bob", a["job_id"], timeout=5))):
        with pytest.raises(NotFound):
            call()
    assert eng.list("bob") == []
    b = eng.new("bob", "explore", prompt="bob's room", settings=SMALL)
    assert [s["session_id"] for s in eng.list("bob")] == [b["session_id"]]
    assert [s["session_id"] for s in eng.list("alice")] == [sid]
    with pytest.raises(NotFound):
        eng.show("alice", b["session_id"])
    assert eng.show("alice", sid) == before
    png = eng.image("alice", digest)
    assert hashlib.sha256(png).hexdigest() == digest and png[:8] == b"\x89PNG\r\n\x1a\n"


# ---- images --------------------------------------------------------------------------------------------
def test_images_stored_once_by_content_hash(backend):
    from engine_helpers import png_image, snapshot

    eng = backend()
    upload = png_image(40, 24, seed=5)
    s1 = eng.new("alice", "explore", prompt="this place", images=[upload], settings=SMALL)
    s2 = eng.new("alice", "story", prompt="the same place", images=[upload], settings=SMALL)
    h1, h2 = s1["input"]["images"][0], s2["input"]["images"][0]
    assert h1 == h2
    rows = snapshot(eng.store)["images"]
    stored = eng.store.get_image(h1)
    assert hashlib.sha256(stored["png"]).hexdigest() == h1 and (stored["width"], stored["height"]) == (40, 24)
    for turn in (s1, s2):
        for seg in image_segments(turn):
            png = eng.store.get_image(seg["image"])["png"]
            assert hashlib.sha256(png).hexdigest() == seg["image"]
    # storing the same bytes again adds no row
    assert eng.store.put_image(stored["png"], 40, 24) == h1
    assert snapshot(eng.store)["images"] == rows
    assert eng.image("alice", h1) == stored["png"]

