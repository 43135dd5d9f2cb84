"""Jobs: event streams (attach, re-attach without repeats), cancel, and Redis trouble: a flushed Redis
(events rebuilt from SQL, unfinished jobs re-queued at startup) and a Redis killed mid-run (the engine
carries on from SQL and logs a warning)."""

import logging
import threading

import pytest

from worldsim.engine import JobFailed
from worldsim.store import NotFound

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"image_size": [2, 2]}


@pytest.fixture(params=["local", "redis"])
def eng(request, make_engine):
    redis_url = request.getfixturevalue("redis_service") if request.param == "redis" else None
    return make_engine(None, redis_url)


def collect(events):
    return [(i, e) for i, e in events]


def ids_increase(pairs):
    keys = [tuple(int(x) for x in i.split("-")) for i, _ in pairs]
    return keys == sorted(keys) and len(set(keys)) == len(keys)


# ---- events --------------------------------------------------------------------------------------------
def test_event_stream_of_a_turn(eng):
    job = eng.new("alice", "explore", prompt="a windmill", settings=SMALL, wait=False)
    got = collect(eng.events("alice", job["id"], timeout=120))
    types = [e["type"] for _, e in got]
    assert types[0] == "started" and types[-1] == "done" and types.count("done") == 1
    for kind in ("text", "image_started", "image_progress", "image", "turn"):
        assert kind in types, (kind, types)
    assert types.index("image_started") < types.index("image_progress") < types.index("image") < types.index("turn")
    assert ids_increase(got)
    done = got[-1][1]
    assert done == {"type": "done", "status": "done", "seqs": [0]}
    turn = next(e["turn"] for _, e in got if e["type"] == "turn")
    stored = eng.show("alice", job["session_id"])["turns"][0]
    assert (turn["seq"], turn["output"], turn["job_id"]) == (0, stored["output"], job["id"])
    image = next(e for _, e in got if e["type"] == "image")
    assert image["image"] == next(s["image"] for s in stored["output"] if s["type"] == "image")
    progress = [e for _, e in got if e["type"] == "image_progress"]
    assert progress[-1]["rows_done"] == progress[-1]["rows_total"] == 2
    assert "".join(e["text"] for _, e in got if e["type"] == "text").strip()


def test_reattach_resumes_without_repeats(eng):
    sid = eng.new("alice", "explore", prompt="an orchard", settings=SMALL)["session_id"]
    job = eng.auto("alice", sid, 4, wait=False)
    first = []
    for pair in eng.events("alice", job["id"], timeout=120):
        first.append(pair)
        if pair[1]["type"] == "turn":  # disconnect mid-job, after the first committed turn
            break
    rest = collect(eng.events("alice", job["id"], after=first[-1][0], timeout=120))
    full = collect(eng.events("alice", job["id"], timeout=120))
    assert first + rest == full
    assert ids_increase(full)
    assert [e["turn"]["seq"] for _, e in full if e["type"] == "turn"] == [1, 2, 3, 4]
    assert full[-1][1] == {"type": "done", "status": "done", "seqs": [1, 2, 3, 4]}


# ---- cancel --------------------------------------------------------------------------------------------
def test_cancel_a_long_job(eng):
    sid = eng.new("alice", "explore", prompt="an endless plain", settings=SMALL)["session_id"]
    job = eng.auto("alice", sid, 50, wait=False)
    seen = []
    for _, e in eng.events("alice", job["id"], timeout=120):
        seen.append(e)
        if e["type"] == "turn" and e["turn"]["seq"] == 2:
            break
    eng.cancel("alice", job["id"])
    with pytest.raises(JobFailed) as failed:
        eng.wait("alice", job["id"], timeout=60)
    assert failed.value.job["status"] == "cancelled"
    events = [e for _, e in eng.events("alice", job["id"], timeout=30)]
    assert events[-1]["type"] == "done" and events[-1]["status"] == "cancelled"
    turns = eng.show("alice", sid)["turns"]
    n = len(turns)
    assert 3 <= n < 51, "the job was cancelled: it must stop well before its 50 steps"
    assert [t["seq"] for t in turns] == list(range(n))
    for t in turns:  # only whole turns: each with its image, stored
        images = [s["image"] for s in t["output"] if s["type"] == "image"]
        assert len(images) == 1 and eng.image("alice", images[0])[:4] == b"\x89PNG"
    committed = [e["turn"]["seq"] for e in events if e["type"] == "turn"]
    assert committed == list(range(1, n))  # every committed turn was announced, none after the cancel
    threading.Event().wait(1.0)
    assert len(eng.show("alice", sid)["turns"]) == n  # nothing more is committed later
    assert eng.job("alice", job["id"])["status"] == "cancelled"
    assert eng.cancel("alice", job["id"])["status"] == "cancelled"  # idempotent
    after = eng.step("alice", sid, "stop here")  # the session is usable
    assert after["seq"] == n


def test_cancel_a_queued_job(make_engine, engine_runtime):
    from worldsim.worker import Worker

    eng = make_engine(workers=0)
    job = eng.new("alice", "explore", prompt="a pier", settings=SMALL, wait=False)
    assert eng.cancel("alice", job["id"])["status"] == "cancelled"
    Worker(eng.store, eng.hot, engine_runtime).execute(job["id"])  # a worker that picks it later skips it
    assert eng.job("alice", job["id"])["status"] == "cancelled"
    assert eng.show("alice", job["session_id"])["turns"] == []
    with pytest.raises(NotFound):
        eng.cancel("bob", job["id"])


# ---- Redis flushed -------------------------------------------------------------------------------------
def test_events_rebuilt_from_sql_after_flush(make_engine, private_redis):
    import redis

    eng = make_engine(None, private_redis.url)
    sid = eng.new("alice", "explore", prompt="a quarry", settings=SMALL)["session_id"]
    job = eng.auto("alice", sid, 2, wait=False)
    live = collect(eng.events("alice", job["id"], timeout=120))
    redis.Redis.from_url(private_redis.url).flushall()
    for after in ("0", live[3][0]):  # a new reader, and one re-attaching with an old id
        rebuilt = [e for _, e in eng.events("alice", job["id"], after=after, timeout=30)]
        assert [e["type"] for e in rebuilt] == ["turn", "turn", "done"]
        assert [e["turn"]["seq"] for e in rebuilt[:2]] == [1, 2]
        stored = eng.store.turns(sid)
        assert [e["turn"] for e in rebuilt[:2]] == stored[1:]
        assert rebuilt[-1] == {"type": "done", "status": "done", "seqs": [1, 2]}


def test_flushed_redis_requeues_unfinished_jobs_at_startup(make_engine, private_redis, caplog):
    import redis

    client = make_engine(None, private_redis.url, workers=0)
    queued = [client.new("alice", "explore", prompt=f"island {i}", settings=SMALL, wait=False) for i in range(2)]
    # a job a worker had claimed when everything was lost
    running = client.new("alice", "story", prompt="a shipwreck", settings=SMALL, wait=False)
    client.store.claim_job(running["id"], "a-worker-that-died")
    redis.Redis.from_url(private_redis.url).flushall()
    with caplog.at_level(logging.WARNING, logger="worldsim.engine"):
        server = make_engine(None, private_redis.url, workers=1)
    assert any("re-queued 3" in r.getMessage() for r in caplog.records)
    for job in queued + [running]:
        done = server.wait("alice", job["id"], timeout=120)
        assert done["status"] == "done" and [t["seq"] for t in done["turns"]] == [0]
    assert len(client.list("alice")) == 3
    assert all(s["num_turns"] == 1 for s in client.list("alice"))


# ---- Redis killed --------------------------------------------------------------------------------------
def test_redis_killed_between_steps(make_engine, private_redis, caplog):
    eng = make_engine(None, private_redis.url)
    sid = eng.new("alice", "explore", prompt="a canyon", settings=SMALL)["session_id"]
    eng.step("alice", sid, "climb")
    private_redis.kill()
    with caplog.at_level(logging.WARNING, logger="worldsim.hot"):
        t2 = eng.step("alice", sid, "jump", timeout=60)
        job = eng.auto("alice", sid, 2, wait=False)
        events = [e for _, e in eng.events("alice", job["id"], timeout=60)]
    assert t2["seq"] == 2
    assert events[-1] == {"type": "done", "status": "done", "seqs": [3, 4]}
    assert [t["seq"] for t in eng.show("alice", sid)["turns"]] == [0, 1, 2, 3, 4]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("unreachable" in w for w in warnings), warnings
    assert len([w for w in warnings if "unreachable" in w]) == 1  # once per outage, not per call


def test_redis_killed_during_a_job(make_engine, private_redis, caplog):
    eng = make_engine(None, private_redis.url)
    sid = eng.new("alice", "explore", prompt="a glacier", settings=SMALL)["session_id"]
    job = eng.auto("alice", sid, 6, wait=False)
    with caplog.at_level(logging.WARNING, logger="worldsim.hot"):
        for _, e in eng.events("alice", job["id"], timeout=60):
            if e["type"] == "turn":
                private_redis.kill()  # mid-job, a turn committed and more to come
                break
        done = eng.wait("alice", job["id"], timeout=120)
    assert done["status"] == "done" and done["result"] == {"seqs": [1, 2, 3, 4, 5, 6]}
    turns = eng.show("alice", sid)["turns"]
    assert [t["seq"] for t in turns] == list(range(7))
    assert all(t["job_id"] == job["id"] for t in turns[1:])
    assert any("unreachable" in r.getMessage() for r in caplog.records)
    # with Redis still gone, a new job runs and its outcome can be read
    nxt = eng.step("alice", sid, "rest", timeout=60)
    assert nxt["seq"] == 7
    events = [e for _, e in eng.events("alice", nxt["job_id"], timeout=30)]
    assert events[-1]["type"] == "done" and events[-1]["status"] == "done"


@pytest.mark.parametrize("eng", ["local", "redis"], indirect=True)
def test_reattach_after_done_repeats_nothing(eng):
    job = eng.new("alice", "explore", prompt="a tower", settings=SMALL, wait=False)
    full = collect(eng.events("alice", job["id"], timeout=60))
    assert full[-1][1]["type"] == "done"
    again = [e for _, e in eng.events("alice", job["id"], after=full[-1][0], timeout=10)]
    assert [e for e in again if e["type"] == "turn"] == []


def test_a_live_workers_long_job_is_not_taken_over(make_engine, redis_service, monkeypatch):
    import worldsim.hot

    monkeypatch.setattr(worldsim.hot, "HEARTBEAT_MS", 1000)  # idle workers beat every <= 0.5 s
    eng = make_engine(None, redis_service, workers=2)
    sid = eng.new("alice", "explore", prompt="a clock tower", settings=SMALL)["session_id"]
    # hold the session's lock so the step's job runs (blocked) for 4.5 s: a long generation, as far
    # as liveness is concerned
    with eng.hot.lock(sid):
        job = eng.step("alice", sid, "wait for noon", wait=False)
        threading.Event().wait(4.5)
    done = eng.wait("alice", job["id"], timeout=60)
    started = [e for _, e in eng.events("alice", job["id"], timeout=30) if e["type"] == "started"]
    assert done["attempts"] == 1 and len(started) == 1, (done["attempts"], started)


def test_redis_back_after_an_outage(make_engine, private_redis, caplog):
    """Redis killed, steps run from SQL and in-process state, Redis restarted empty: the engine uses it
    again (it says so) and nothing queued during the outage is lost."""
    import redis

    eng = make_engine(None, private_redis.url)
    sid = eng.new("alice", "explore", prompt="a lagoon", settings=SMALL)["session_id"]
    private_redis.kill()
    with caplog.at_level(logging.WARNING, logger="worldsim.hot"):
        assert eng.step("alice", sid, "swim", timeout=60)["seq"] == 1
        queued = eng.auto("alice", sid, 2, wait=False)  # may be taken from the in-process queue
        private_redis.start()
        assert eng.wait("alice", queued["id"], timeout=60)["result"] == {"seqs": [2, 3]}
        t = eng.step("alice", sid, "dive", timeout=60)
    assert t["seq"] == 4
    events = [e for _, e in eng.events("alice", t["job_id"], timeout=30)]
    assert events[-1] == {"type": "done", "status": "done", "seqs": [4]}
    assert redis.Redis.from_url(private_redis.url).exists(f"{eng.hot.p}events:{t['job_id']}")  # in Redis again
    messages = [r.getMessage() for r in caplog.records]
    assert any("unreachable" in m for m in messages) and any("is back" in m for m in messages)
    assert [x["seq"] for x in eng.show("alice", sid)["turns"]] == [0, 1, 2, 3, 4]
