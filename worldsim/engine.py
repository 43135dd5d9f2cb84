"""The engine API: sessions, turns and jobs for every mode, for many users.

Every call names the acting user; another user's session is "not found". Input is validated before
anything is queued or stored (mode, texts, images, step counts, sampling settings). Generation runs
as a job in a worker (in-process threads, or `python -m worldsim worker` processes sharing Redis and
SQL), never in the caller: a client can wait, attach to the event stream, re-attach, or cancel.

Stores: SQL is the system of record (worldsim.store), Redis the hot state (worldsim.hot); with no
Redis URL the engine runs on SQL plus in-process queues and events, and says so in the README.
"""

from __future__ import annotations

import logging
import os
import time

from worldsim.hot import Hot
from worldsim.media import load_upload, png_bytes
from worldsim.modes import MAX_REFERENCE_IMAGES, check_mode, check_text, vla_question
from worldsim.store import NotFound, Store, default_database_url

log = logging.getLogger("worldsim.engine")
MAX_AUTO_STEPS = 50
TERMINAL = ("done", "failed", "cancelled")


class JobFailed(RuntimeError):
    def __init__(self, job: dict):
        super().__init__(job.get("error") or f"job {job['id']} {job['status']}")
        self.job = job


class Engine:
    def __init__(self, store: Store, hot: Hot, runtime=None, workers: int = 1):
        self.store, self.hot, self.runtime = store, hot, runtime
        self.workers, self._threads = [], []
        if workers and runtime is None:
            raise ValueError("workers: in-process workers need a model runtime")
        from worldsim.worker import Worker

        for i in range(workers):
            w = Worker(store, hot, runtime, worker_id=f"{os.getpid()}-inproc-{i}")
            self._threads.append(w.start_thread())
            self.workers.append(w)
        requeued = hot.rebuild([j["id"] for j in store.unfinished_jobs()])
        if requeued:
            log.warning("re-queued %d unfinished job(s) found in SQL", requeued)

    @classmethod
    def open(cls, *, data_dir: str | None = None, database_url: str | None = None, redis_url: str | None = None,
             checkpoint: str | None = None, device: str = "cpu", workers: int = 1, runtime=None) -> "Engine":
        """Engine from settings (arguments, else WORLDSIM_DATA_DIR / DATABASE_URL / REDIS_URL)."""
        data_dir = data_dir or os.environ.get("WORLDSIM_DATA_DIR", "data")
        database_url = database_url or os.environ.get("DATABASE_URL") or default_database_url(data_dir)
        redis_url = redis_url or os.environ.get("REDIS_URL") or None
        if workers and runtime is None:
            from worldsim.runtime import Runtime

            runtime = Runtime.load(checkpoint, device=device)
        return cls(Store(database_url), Hot(redis_url), runtime, workers)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        for t in self._threads:  # a job in progress finishes its current token, then the loop exits
            t.join(timeout=10)
        self.store.close()

    # ---- sessions ------------------------------------------------------------------------------
    def new(self, user: str, mode: str, *, prompt: str = "", images: list[bytes] = (), arm: str | None = None,
            goal: str | None = None, steps: int | None = None, settings: dict | None = None,
            title: str | None = None, wait: bool = True, timeout: float | None = None):
        """Create a session and run its first turn. Returns the committed turn (wait=True) or the job."""
        user = _check_user(user)
        mode = check_mode(mode)
        settings = self._check_settings(mode, dict(settings or {}))
        max_images = MAX_REFERENCE_IMAGES if mode == "x2i" else 1
        if len(images) > max_images:
            raise ValueError(f"images: {mode} takes at most {max_images} image(s), got {len(images)}")
        if mode == "x2i" and not images:
            raise ValueError("images: x2i needs 1 to 3 reference images")
        if mode == "vla":
            text = vla_question(arm, goal, steps)
            settings["steps"], settings["arm"], settings["goal"] = steps, arm.strip(), goal.strip()
        else:
            text = check_text(prompt, "prompt", required=not images or mode in ("t2i", "x2i", "howto"))
        hashes = self._store_uploads(images)
        session = self.store.create_session(user, mode, settings, title=check_text(title or text[:80], "title", False))
        job = self._submit(user, session["session_id"], "turn",
                           {"kind": "prompt", "input": {"text": text, "images": hashes}})
        return self._finish(user, job, wait, timeout)

    def step(self, user: str, session_id: str, instruction: str, images: list[bytes] = (), wait: bool = True,
             timeout: float | None = None):
        """One user turn: an instruction (explore step, follow-up) with an optional image."""
        session = self.store.get_session(_check_user(user), session_id)
        text = check_text(instruction, "instruction", required=not images)
        max_images = MAX_REFERENCE_IMAGES if session["mode"] == "x2i" else 1
        if len(images) > max_images:
            raise ValueError(f"images: at most {max_images} image(s) per turn, got {len(images)}")
        if session["mode"] == "vla":
            raise ValueError("mode: a vla session is one plan; branch or re-roll it instead of stepping")
        kind = "prompt" if session["mode"] in ("t2i", "x2i") else "instruction"
        if session["mode"] == "x2i" and not images:
            raise ValueError("images: x2i needs 1 to 3 reference images")
        job = self._submit(user, session_id, "turn",
                           {"kind": kind, "input": {"text": text, "images": self._store_uploads(images)}})
        return self._finish(user, job, wait, timeout)

    def auto(self, user: str, session_id: str, steps: int, wait: bool = True, timeout: float | None = None):
        """Free exploration / story continuation: `steps` turns the model takes on its own."""
        session = self.store.get_session(_check_user(user), session_id)
        if session["mode"] not in ("explore", "story", "howto"):
            raise ValueError(f"mode: auto continues explore, story and howto sessions, not {session['mode']}")
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_AUTO_STEPS:
            raise ValueError(f"steps: must be an integer in [1, {MAX_AUTO_STEPS}], got {steps!r}")
        if session["num_turns"] == 0:
            raise ValueError("session: it has no turns yet")
        job = self._submit(user, session_id, "auto", {"steps": steps})
        return self._finish(user, job, wait, timeout)

    def reroll(self, user: str, session_id: str, seq: int | None = None, wait: bool = True,
               timeout: float | None = None):
        """Generate turn `seq` again with a new seed. The last turn is replaced in place; an earlier
        turn is re-rolled in a new branch (the later turns stay in the original session)."""
        user = _check_user(user)
        turns = self.show(user, session_id)["turns"]
        if not turns:
            raise ValueError("seq: the session has no turns to re-roll")
        seq = turns[-1]["seq"] if seq is None else seq
        target = self._turn(turns, seq)
        if seq != turns[-1]["seq"]:
            branch = self.branch(user, session_id, seq - 1) if seq > 0 else self._empty_branch(user, session_id)
            job = self._submit(user, branch["session_id"], "turn", {"kind": target["kind"], "input": target["input"]})
        else:
            job = self._submit(user, session_id, "reroll", {"kind": target["kind"], "input": target["input"]})
        return self._finish(user, job, wait, timeout)

    def replan(self, user: str, session_id: str, step: int, subtask: str, wait: bool = True,
               timeout: float | None = None):
        """Edit subtask `step` (1-based) of a vla plan and plan again from there.

        The new plan's answer starts with the exact ids of subtasks 1..step-1 (their texts and
        keyframes copied, not regenerated), then "Current Step: {subtask}" forced; the model draws that
        subtask's keyframe and plans the rest under the plan's FSM rules (n keyframes in all; see
        modes.replan_shape). Like re-rolling the opening turn, it goes to a new session (parent: this
        one, seq -1, title marked) holding one plan turn with the same input, and this session's plan
        is untouched; the new turn's meta has `replanned_from` {session_id, seq, step}. Returns the
        committed turn (wait=True) or the job."""
        user = _check_user(user)
        session = self.store.get_session(user, session_id)
        if session["mode"] != "vla":
            raise ValueError(f"mode: replan edits a vla (robot plan) session; this one is {session['mode']}")
        n = session["settings"]["steps"]
        if not isinstance(step, int) or isinstance(step, bool) or not 1 <= step <= n:
            raise ValueError(f"step: must be an integer in [1, {n}] (the plan's steps), got {step!r}")
        subtask = check_text(subtask, "subtask")
        turns = self.store.turns(session_id)
        if not turns:
            raise ValueError("session: it has no plan yet to edit")
        plan = plan_of(session, turns)
        if step - 1 > len(plan):  # a plan cut short (stopped, out of room) has fewer keyframes to keep
            raise ValueError(f"step: the plan has only {len(plan)} keyframe(s), so it can be edited at steps "
                             f"[1, {len(plan) + 1}], got {step}")
        target = turns[-1]
        branch = self.store.create_session(user, "vla", session["settings"], parent=(session_id, -1),
                                           title=f"{session['title']} (step {step} edited)")
        job = self._submit(user, branch["session_id"], "replan",
                           {"kind": target["kind"], "input": target["input"],
                            "replan": {"session_id": session_id, "seq": target["seq"], "step": step,
                                       "subtask": subtask}})
        return self._finish(user, job, wait, timeout)

    def undo(self, user: str, session_id: str) -> dict:
        """Remove the last turn."""
        session = self.store.get_session(_check_user(user), session_id)
        if session["num_turns"] == 0:
            raise ValueError("session: nothing to undo")
        self._forget_cache(session_id)
        self.store.delete_turns_from(session_id, session["num_turns"] - 1)
        return self.show(user, session_id)

    def branch(self, user: str, session_id: str, seq: int) -> dict:
        """A new session sharing turns 0..seq of this one."""
        session = self.store.get_session(_check_user(user), session_id)
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < session["num_turns"]:
            raise ValueError(f"seq: must be a turn of the session, in [0, {session['num_turns'] - 1}], got {seq!r}")
        new = self.store.create_session(user, session["mode"], session["settings"],
                                        title=f"{session['title']} (branch at {seq})", parent=(session_id, seq))
        self.store.copy_turns(session_id, new["session_id"], seq)
        return self.show(user, new["session_id"])

    def _empty_branch(self, user: str, session_id: str) -> dict:
        s = self.store.get_session(user, session_id)
        return self.store.create_session(user, s["mode"], s["settings"], title=f"{s['title']} (re-roll)",
                                         parent=(session_id, -1))

    def show(self, user: str, session_id: str) -> dict:
        session = self.store.get_session(_check_user(user), session_id)
        turns = [_public(t) for t in self.store.turns(session_id)]
        return {**session, "turns": turns, "plan": plan_of(session, turns)}

    def list(self, user: str) -> list[dict]:
        return self.store.list_sessions(_check_user(user))

    def delete(self, user: str, session_id: str) -> None:
        self.store.delete_session(_check_user(user), session_id)
        self._forget_cache(session_id)

    def image(self, user: str, digest: str) -> bytes:
        """PNG bytes of an image used in one of the user's sessions (else NotFound)."""
        if not self.store.image_owned_by(_check_user(user), digest):
            raise NotFound(f"image: no image {digest!r} for user {user!r}")
        return self.store.get_image(digest)["png"]

    # ---- jobs ----------------------------------------------------------------------------------
    def job(self, user: str, job_id: str) -> dict:
        return self.store.get_job(job_id, owner=_check_user(user))

    def wait(self, user: str, job_id: str, timeout: float | None = None) -> dict:
        """Block until the job ends; return it with the turns it committed. JobFailed if it failed."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            job = self.job(user, job_id)
            if job["status"] in TERMINAL:
                break
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"job_id: {job_id} still {job['status']} after {timeout} s")
            time.sleep(0.05)
        if job["status"] != "done":
            raise JobFailed(job)
        seqs = (job["result"] or {}).get("seqs", [])
        turns = [_public(t) for t in self.store.turns(job["session_id"]) if t["seq"] in seqs]
        return {**job, "turns": turns}

    def events(self, user: str, job_id: str, after: str = "0", timeout: float | None = None):
        """Yield (event_id, event) for a job from `after` on, until its "done" event. Re-attach by
        passing the last event id seen. If the stream is gone (Redis flushed or down elsewhere), the
        job's outcome is rebuilt from SQL."""
        self.job(user, job_id)  # ownership
        deadline = None if timeout is None else time.time() + timeout
        while deadline is None or time.time() < deadline:
            got = self.hot.read(job_id, after, timeout=0.5)
            if not got and got is not None and after != "0" and self.job(user, job_id)["status"] in TERMINAL:
                return  # re-attached at (or after) the end of a stream that is still there
            if got is None or (not got and self.job(user, job_id)["status"] in TERMINAL):
                yield from self._events_from_sql(user, job_id)
                return
            for event_id, event in got:
                after = event_id
                yield event_id, event
                if event["type"] == "done":
                    return

    def _events_from_sql(self, user: str, job_id: str):
        job = self.job(user, job_id)
        while job["status"] not in TERMINAL:
            time.sleep(0.1)
            job = self.job(user, job_id)
        seqs = (job["result"] or {}).get("seqs", [])
        for t in self.store.turns(job["session_id"]):
            if t["seq"] in seqs:
                yield "sql", {"type": "turn", "turn": t}
        if job["error"]:
            yield "sql", {"type": "error", "error": job["error"]}
        yield "sql", {"type": "done", "status": job["status"], "seqs": seqs}

    def cancel(self, user: str, job_id: str) -> dict:
        job = self.job(user, job_id)
        if job["status"] in TERMINAL:
            return job
        self.hot.cancel(job_id)
        if job["status"] == "queued":
            self.store.update_job(job_id, status="cancelled")
            self.hot.publish(job_id, {"type": "done", "status": "cancelled"})
        return self.job(user, job_id)

    # ---- helpers -------------------------------------------------------------------------------
    def _submit(self, user: str, session_id: str, action: str, payload: dict) -> dict:
        job = self.store.create_job(session_id, user, action, payload)
        self.hot.enqueue(job["id"])
        return job

    def _finish(self, user: str, job: dict, wait: bool, timeout: float | None):
        if not wait:
            return job
        done = self.wait(user, job["id"], timeout)
        return {**done["turns"][-1], "job_id": job["id"]} if done["turns"] else done

    def _store_uploads(self, images) -> list[str]:
        hashes = []
        for i, data in enumerate(images):
            image = load_upload(data, field=f"images[{i}]")
            hashes.append(self.store.put_image(png_bytes(image), image.width, image.height, codes=None))
        return hashes

    def _forget_cache(self, session_id: str) -> None:
        if self.runtime is not None:
            self.runtime.forget(session_id)

    @staticmethod
    def _turn(turns: list[dict], seq) -> dict:
        for t in turns:
            if t["seq"] == seq:
                return t
        raise ValueError(f"seq: no turn {seq!r}; the session has turns 0..{turns[-1]['seq']}")

    @staticmethod
    def _check_settings(mode: str, settings: dict) -> dict:
        from model.sampling import task_defaults

        allowed = {"seed", "image_size", "sampling", "max_steps", "dida_steps"}
        unknown = set(settings) - allowed
        if unknown:
            raise ValueError(f"settings: unknown {sorted(unknown)}; allowed: {sorted(allowed)}")
        seed = settings.setdefault("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"settings.seed: must be a non-negative integer, got {seed!r}")
        size = settings.get("image_size")
        if size is not None:
            if (not isinstance(size, (list, tuple)) or len(size) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 99 for x in size)):
                raise ValueError(f"settings.image_size: must be [h, w] in tokens, each 1..99, got {size!r}")
            settings["image_size"] = list(size)
        k = settings.get("dida_steps")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 256):
            raise ValueError(f"settings.dida_steps: must be an integer in [0, 256] (0: autoregressive), got {k!r}")
        task_defaults(mode).replace(**settings.get("sampling", {}))  # validates the overrides
        return settings


def _public(turn: dict) -> dict:
    """A turn as callers see it: the exact token ids in its meta are the model's business."""
    return {**turn, "meta": {k: v for k, v in turn["meta"].items() if k != "answer_ids"}}


def _check_user(user) -> str:
    if not isinstance(user, str) or not user.strip() or len(user) > 128:
        raise ValueError("user: must be a non-empty name of at most 128 characters")
    return user.strip()


def plan_of(session: dict, turns: list[dict]) -> list[dict] | None:
    """A vla session's subtasks: [{"step", "subtask", "image"}] from its plan turn."""
    if session["mode"] != "vla" or not turns:
        return None
    steps, text = [], ""
    for seg in turns[-1]["output"]:
        if seg["type"] == "text":
            text = seg["text"]
        elif seg["type"] == "image":
            subtask = text.split("Current Step:", 1)[-1].strip()
            steps.append({"step": len(steps) + 1, "subtask": subtask, "image": seg["image"]})
            text = ""
    return steps
