"""Crash safety with real processes.

- A child process steps one session in a loop (engine API on a SQLite file, or on PostgreSQL), printing
  each committed turn; it is SIGKILLed mid-step, several times. After every restart: each reported turn
  is present and intact, no partial turn is visible, and the session continues at seq = last + 1.
- Two `python -m worldsim worker` processes and a client share one Redis and one PostgreSQL; the worker
  running a long job is SIGKILLed mid-job; the other finishes it once its heartbeat and session lock
  lapse, and the job completes exactly once.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from engine_helpers import REPO, python_env, run_cli, wait_for

SMALL = {"image_size": [2, 2]}

CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from worldsim.engine import Engine
from worldsim.runtime import Runtime

url, sid = sys.argv[1], sys.argv[2]
eng = Engine.open(database_url=url, workers=1, runtime=Runtime.debug())
def report(t):
    print(json.dumps({"seq": t["seq"], "session_id": t["session_id"], "output": t["output"],
                      "input": t["input"], "job_id": t["job_id"]}), flush=True)
if sid == "-":
    t = eng.new("crash", "explore", prompt="a long road", settings={"image_size": [2, 2]})
    sid = t["session_id"]
    report(t)
n = 0
while True:
    print(json.dumps({"begin": n}), flush=True)
    report(eng.step("crash", sid, f"step {n}"))
    n += 1
"""


def read_lines(proc, into: list, stop: threading.Event):
    for line in proc.stdout:
        if stop.is_set():
            break
        line = line.strip()
        if line.startswith("{"):
            into.append(json.loads(line))


def check_intact(store, sid, reported: dict) -> list[dict]:
    """Every reported turn is in SQL exactly as reported; turns are contiguous and whole."""
    import sqlalchemy as sa

    from worldsim import store as st

    turns = store.turns(sid)
    assert [t["seq"] for t in turns] == list(range(len(turns)))
    by_seq = {t["seq"]: t for t in turns}
    for seq, rep in reported.items():
        assert seq in by_seq, f"turn {seq} was reported committed but is missing"
        t = by_seq[seq]
        assert (t["output"], t["input"], t["job_id"]) == (rep["output"], rep["input"], rep["job_id"])
    with store.engine.connect() as conn:
        stored = set(conn.execute(sa.select(st.images.c.hash)).scalars())
    for t in turns:  # no partial turn: each has its one image, and the image row exists
        images = [s["image"] for s in t["output"] if s["type"] == "image"]
        assert len(images) == 1, t
        assert set(images) <= stored
        assert t["meta"]["finish_reason"] == "eos"
    return turns


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_sigkill_mid_step_loses_no_committed_turn(db, request, tmp_path, make_engine):
    url = request.getfixturevalue("pg_url") if db == "postgresql" else f"sqlite:///{tmp_path}/crash.db"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = random.Random(1234)
    sid, reported, expected_next = "-", {}, 0
    from worldsim.store import Store

    probe, stale = Store(url), set()  # stale: jobs of killed children, left "running" in SQL
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), url, sid], cwd=REPO, env=python_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines, stop = [], threading.Event()
        reader = threading.Thread(target=read_lines, args=(proc, lines, stop), daemon=True)
        reader.start()
        try:
            target = 3 + rng.randrange(3)
            # wait for a few commits, then for a step to begin, and kill it at a random point inside it
            wait_for(lambda: sum("seq" in x for x in lines) >= target and "begin" in lines[-1], 120,
                     f"round {round_}: {target} commits from the child")
            wait_for(lambda: any(j["status"] == "running" and j["id"] not in stale for j in probe.unfinished_jobs()),
                     30, "a running step")
            time.sleep(rng.uniform(0.0, 0.05))
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            stop.set()
            if proc.poll() is None:
                proc.kill()
        reader.join(10)
        commits = [x for x in lines if "seq" in x]
        if sid == "-":
            sid = commits[0]["session_id"]
        # the (re)started child first finishes the killed child's interrupted step, re-queued from SQL
        # (its turn is committed but not reported by this child), then continues right after it
        resumed = commits[0]["seq"] - expected_next
        assert resumed in ((0,) if round_ == 0 else (0, 1))
        first = expected_next + resumed
        assert [c["seq"] for c in commits] == list(range(first, first + len(commits)))
        for c in commits:
            assert c["session_id"] == sid and c["seq"] not in reported
            reported[c["seq"]] = c
        turns = check_intact(probe, sid, reported)
        stale |= {j["id"] for j in probe.unfinished_jobs()}
        # at most the killed step committed without being reported
        assert len(turns) - 1 in (commits[-1]["seq"], commits[-1]["seq"] + 1)
        expected_next = len(turns)

    # every interrupted step but the last (whose restart is below) was resumed, exactly once
    resumed_jobs = [probe.get_job(j) for j in stale]
    probe.close()
    assert stale, "no kill landed inside a step: the test did not test a crash mid-step"
    # the session continues after the last crash
    eng = make_engine(url)
    last = eng.store.turns(sid)[-1]["seq"]
    nxt = eng.step("crash", sid, "after the crash", timeout=60)
    assert nxt["seq"] in (last + 1, last + 2)  # the last killed step may be resumed first
    turns = check_intact(eng.store, sid, reported)
    for job in resumed_jobs:
        job = eng.store.get_job(job["id"])
        assert job["status"] == "done" and [t["job_id"] for t in turns].count(job["id"]) == 1


@pytest.fixture
def worker_pair(private_redis, pg_url, tmp_path):
    """Two `python -m worldsim worker` processes on one Redis and one PostgreSQL: {worker_id: Popen}.
    Their logs are in tmp_path/worker-N.log."""
    procs, ids = [], {}
    args = ["--redis-url", private_redis.url, "--database-url", pg_url]
    for n in range(2):
        with open(tmp_path / f"worker-{n}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "worldsim", "worker", *args], cwd=REPO,
                                          env=python_env(WORLDSIM_LOG="INFO"), stdout=subprocess.PIPE,
                                          stderr=log, text=True))
    try:
        for n, p in enumerate(procs):
            line = p.stdout.readline()
            assert line, f"worker {n} exited: {(tmp_path / f'worker-{n}.log').read_text()[-3000:]}"
            ids[json.loads(line)["worker"]] = p
        yield ids, args
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def test_killed_worker_job_completes_exactly_once(worker_pair, private_redis, pg_url, make_engine):
    ids, args = worker_pair
    # a client process: the CLI with no in-process worker creates the session; the workers run it
    rc, first, err = run_cli(["new", "--mode", "explore", "--prompt", "a port city", "--image-size", "4x4",
                              "--workers", "0", "--user", "alice", "--timeout", "120", *args], timeout=180)
    assert rc == 0, (first, err[-2000:])
    sid = first["session_id"]
    assert first["seq"] == 0
    client = make_engine(pg_url, private_redis.url, workers=0, prefix="ws:")
    job = client.auto("alice", sid, 10, wait=False)

    victim, seen = None, []
    for _, e in client.events("alice", job["id"], timeout=120):
        seen.append(e)
        if e["type"] == "started":
            victim = e["worker"]
        if e["type"] == "turn":  # mid-job: one turn committed, nine to go
            ids[victim].send_signal(signal.SIGKILL)
            ids[victim].wait(10)
            break
    assert victim in ids
    assert client.job("alice", job["id"])["status"] == "running"
    survivor = next(w for w in ids if w != victim)

    done = client.wait("alice", job["id"], timeout=150)
    assert done["status"] == "done" and done["worker"] == survivor and done["attempts"] == 2
    assert done["result"] == {"seqs": list(range(1, 11))}
    turns = client.store.turns(sid)
    assert [t["seq"] for t in turns] == list(range(11))  # contiguous, none twice
    assert all(t["job_id"] == job["id"] for t in turns[1:])
    assert all(sum(s["type"] == "image" for s in t["output"]) == 1 for t in turns)
    rc, shown, _ = run_cli(["show", sid, "--user", "alice", *args])
    assert rc == 0 and [t["seq"] for t in shown["turns"]] == list(range(11))
    # the survivor keeps serving
    assert client.step("alice", sid, "sail away", timeout=60)["seq"] == 11


@pytest.mark.slow
def test_sigkill_of_cli_step_loop(tmp_path, make_engine):
    """The same crash test through the CLI: a shell loop of `python -m worldsim step`, killed (the whole
    process group) while a step's job runs."""
    url = f"sqlite:///{tmp_path}/cli.db"
    common = ["--database-url", url, "--user", "crash"]
    rc, first, err = run_cli(["new", "--mode", "explore", "--prompt", "a quiet lane", "--image-size", "2x2", *common])
    assert rc == 0, err[-2000:]
    sid = first["session_id"]
    reported = {0: first}
    from worldsim.store import Store

    probe, stale, rng = Store(url), set(), random.Random(7)
    loop = (f"while true; do {sys.executable} -m worldsim step {sid} --instruction 'walk on' "
            + " ".join(common) + "; done")
    for round_ in range(2):
        proc = subprocess.Popen(["bash", "-c", loop], cwd=REPO, env=python_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        lines, stop = [], threading.Event()
        reader = threading.Thread(target=read_lines, args=(proc, lines, stop), daemon=True)
        reader.start()
        try:
            wait_for(lambda: len(lines) >= 2, 180, f"round {round_}: two steps from the CLI loop")
            wait_for(lambda: any(j["status"] == "running" and j["id"] not in stale for j in probe.unfinished_jobs()),
                     60, "a running step")
            time.sleep(rng.uniform(0.0, 0.05))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            stop.set()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        reader.join(10)
        for c in lines:
            assert "error" not in c, c
            assert c["session_id"] == sid and c["seq"] not in reported
            reported[c["seq"]] = c
        check_intact(probe, sid, reported)
        stale |= {j["id"] for j in probe.unfinished_jobs()}
    probe.close()
    from worldsim.runtime import Runtime

    eng = make_engine(url, runtime=Runtime.load())  # the CLI's model (the shipped demo): its ids fill the session
    last = eng.store.turns(sid)[-1]["seq"]
    # the killed step's job, still unfinished in SQL, may be resumed first (the engine re-queues it)
    assert eng.step("crash", sid, "after the crash", timeout=60)["seq"] in (last + 1, last + 2)
    check_intact(eng.store, sid, reported)
