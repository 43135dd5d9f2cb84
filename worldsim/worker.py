"""The model worker: takes jobs from the queue and runs them, one at a time.

A job is one user action on one session ("turn": a prompt, instruction or continue; "auto": N
continue turns; "reroll": the last turn again with a new seed; "replan": a vla plan turn whose answer
starts with ids forced from another session's plan, see `Worker._replan_prefix`). It runs under the
session's lock, streams events while it generates, and commits each finished turn in one SQL
transaction stamped with the job id. A retried job (its worker died) skips the turns it already
committed, so nothing is committed twice. `python -m worldsim worker` runs this loop as its own process; the embedded default
runs one in a thread of the app.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback

from worldsim.modes import Layout, replan_shape, turn_shape, vla_step_text

log = logging.getLogger("worldsim.worker")


def segments_from_ids(ids: list[int], vocab, tokenizer, image_hashes: list[str]) -> list[dict]:
    """A generated answer -> [{"type": "text"|"cot"|"image", ...}]. Stop ids are not content."""
    segments, run, in_cot, images = [], [], False, iter(image_hashes)

    def flush():
        text = tokenizer.decode(run).strip()
        if text:
            segments.append({"type": "cot" if in_cot else "text", "text": text})
        run.clear()

    i = 0
    while i < len(ids):
        t = ids[i]
        if t == vocab.boi:
            flush()
            end = ids.index(vocab.eoi, i)
            h, w = vocab.parse_header(ids[i + 1:ids.index(vocab.img, i)])
            segments.append({"type": "image", "image": next(images), "height": h, "width": w})
            i = end + 1
            continue
        if t in (vocab.cot_start, vocab.cot_end):
            flush()
            in_cot = t == vocab.cot_start
        elif t not in (vocab.answer_end, vocab.eos):
            run.append(t)
        i += 1
    flush()
    return segments


class Worker:
    def __init__(self, store, hot, runtime, worker_id: str | None = None):
        self.store, self.hot, self.runtime = store, hot, runtime
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident() % 100000}"
        self._stop = threading.Event()

    # ---- loop ----------------------------------------------------------------------------------
    def _beat(self) -> None:
        """Heartbeat on its own thread, so a long job never looks like a dead worker."""
        from worldsim.hot import HEARTBEAT_MS

        while not self._stop.is_set():
            self.hot.heartbeat(self.id)
            self._stop.wait(HEARTBEAT_MS / 3000)

    def run_forever(self, poll_s: float = 0.5) -> None:
        log.info("worker %s started", self.id)
        self.hot.heartbeat(self.id)
        threading.Thread(target=self._beat, name=f"heartbeat-{self.id}", daemon=True).start()
        last_reap = 0.0
        while not self._stop.is_set():
            if time.time() - last_reap > 2.0:
                last_reap = time.time()
                for job_id in self.hot.reap():
                    log.warning("re-queued job %s of a dead worker", job_id)
            job_id = self.hot.dequeue(self.id, poll_s)
            if job_id is not None:
                self.execute(job_id)

    def start_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.run_forever, name=f"worker-{self.id}", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()

    # ---- one job -------------------------------------------------------------------------------
    def execute(self, job_id: str) -> None:
        job = self.store.claim_job(job_id, self.id)
        if job is None:  # finished, cancelled or unknown: nothing to do
            self.hot.ack(self.id, job_id)
            return
        emit = lambda e: self.hot.publish(job_id, e)  # noqa: E731
        try:
            if self.hot.is_cancelled(job_id):
                raise _Cancelled()
            emit({"type": "started", "worker": self.id, "attempt": job["attempts"]})
            with self.hot.lock(job["session_id"]) as lock:
                seqs = self._run(job, emit, lock)
            self.store.update_job(job_id, status="done", result={"seqs": seqs}, error=None)
            emit({"type": "done", "status": "done", "seqs": seqs})
        except _Cancelled:
            self.store.update_job(job_id, status="cancelled")
            emit({"type": "done", "status": "cancelled"})
        except (ValueError, LookupError) as e:
            self.store.update_job(job_id, status="failed", error=str(e))
            self._drop_if_empty(job)
            emit({"type": "error", "error": str(e)})
            emit({"type": "done", "status": "failed"})
        except Exception as e:  # a bug: keep the worker alive, record it on the job
            log.error("job %s failed: %s", job_id, traceback.format_exc())
            self.store.update_job(job_id, status="failed", error=f"internal error: {type(e).__name__}: {e}")
            emit({"type": "error", "error": f"internal error: {type(e).__name__}"})
            emit({"type": "done", "status": "failed"})
        finally:
            self.hot.ack(self.id, job_id)

    def _drop_if_empty(self, job: dict) -> None:
        """A session whose first turn was refused (e.g. its prompt overflows the context) is removed,
        so a failed `new` leaves nothing behind."""
        if job["action"] in ("turn", "replan") and job["payload"].get("kind") == "prompt":
            try:
                if self.store.get_session(job["owner"], job["session_id"])["num_turns"] == 0:
                    self.store.delete_session(job["owner"], job["session_id"])
            except LookupError:
                pass

    def _run(self, job: dict, emit, lock) -> list[int]:
        session = self.store.get_session(job["owner"], job["session_id"])
        payload, action = job["payload"], job["action"]
        mine = [t["seq"] for t in self.store.turns(session["session_id"]) if t["job_id"] == job["id"]]
        if action == "turn":
            plan = [(payload["kind"], payload["input"], False)]
        elif action == "auto":
            plan = [("continue", {}, False)] * payload["steps"]
        elif action == "reroll":
            plan = [(payload["kind"], payload["input"], True)]
        elif action == "replan":
            plan = [(payload["kind"], payload["input"], False)]
        else:
            raise ValueError(f"action: unknown {action!r}")
        seqs = list(mine)
        for kind, turn_input, replace in plan[len(mine):]:
            turn = self._one_turn(job, session, kind, turn_input, replace, emit, lock)
            seqs.append(turn["seq"])
            emit({"type": "turn", "turn": turn})
        return seqs

    def _one_turn(self, job, session, kind, turn_input, replace, emit, lock) -> dict:
        from model.sampling import SamplingParams, task_defaults

        sid, settings, mode = session["session_id"], session["settings"], session["mode"]
        history = self.store.turns(sid)
        if replace:
            history = history[:-1]
        seq = len(history)
        if kind != "prompt" and not history:
            raise ValueError("session: it has no turns yet; its first turn must be a prompt")
        params = task_defaults(mode if mode != "vla" else "vla").replace(**settings.get("sampling", {}))
        assert isinstance(params, SamplingParams)
        inputs = [turn_input] if mode in ("t2i", "x2i") else [t["input"] for t in history] + [turn_input]
        size = tuple(settings["image_size"]) if settings.get("image_size") else \
            self.runtime.default_image_size(params.image_area, self._upload_shape(inputs))
        shape = turn_shape(mode, kind, settings)
        forced, forced_hashes = [], []  # the answer's start, given rather than generated (a replan's)
        replan = job["payload"].get("replan") if job["action"] == "replan" else None
        if replan is not None:
            forced, forced_hashes = self._replan_prefix(job["owner"], replan, size)
            shape = replan_shape(settings, replan["step"])
            self._emit_forced(forced, forced_hashes, emit)
        # Layout ends the prompt with the pending turn's answer ids: the forced ones go through the
        # KV cache like the rest of the prompt, and the model goes on after them
        pending = {"kind": kind, "input": turn_input, "output": [], "meta": {"answer_ids": forced}}
        turns = [pending] if mode in ("t2i", "x2i") else history + [pending]
        seqs = [seq] if mode in ("t2i", "x2i") else [t["seq"] for t in history] + [seq]
        # the same seed on a retry (same turn), a new one per re-roll
        rerolls = history_rerolls(self.store.turns(sid), seq) + 1 if replace else 0
        seed = int(settings.get("seed", 0)) * 100003 + seq * 7 + rerolls * 7919
        checked = [0.0]

        def should_stop():
            now = time.time()
            if now - checked[0] < 0.2:
                return False
            checked[0] = now
            lock.reacquire()
            return self.hot.is_cancelled(job["id"])

        result = self.runtime.run_turn(
            session_id=sid, mode=mode, turns=turns, seqs=seqs, shape=shape,
            params=params, seed=seed, image_size=size, image_ids=lambda h: self._image_ids(h, size),
            on_event=emit, should_stop=should_stop,
            already_dropped=history[-1]["meta"].get("dropped_turns", []) if history and mode not in ("t2i", "x2i") else [],
            dida_steps=settings.get("dida_steps"))
        if result["reason"] == "cancelled":
            raise _Cancelled()
        hashes = list(forced_hashes)
        from worldsim.media import png_bytes

        for codes, image in result["images"]:
            digest = self.store.put_image(png_bytes(image), image.width, image.height, codes=codes.tolist())
            hashes.append(digest)
            emit({"type": "image", "image": digest, "height": int(codes.shape[0]), "width": int(codes.shape[1])})
        ids = forced + result["ids"]
        output = segments_from_ids(ids, self.runtime.vocab, self.runtime.tokenizer, hashes)
        answer_ids = [t for t in ids if t not in (self.runtime.vocab.answer_end, self.runtime.vocab.eos)]
        meta = {**result["meta"], "answer_ids": answer_ids}
        if replace:
            meta["rerolled"] = rerolls
        if replan is not None:
            meta["replanned_from"] = {k: replan[k] for k in ("session_id", "seq", "step")}
            meta["forced_tokens"] = len(forced)
        return self.store.commit_turn(sid, seq, kind, turn_input, output, meta, job_id=job["id"], replace=replace)

    def _replan_prefix(self, owner: str, replan: dict, size: tuple[int, int]) -> tuple[list[int], list[str]]:
        """A replan's forced answer and the hashes of the keyframes in it: the original plan turn's
        exact ids up to the end of keyframe step-1 (subtasks 1..step-1, texts and keyframes), then the
        edited "Current Step: {subtask}". The original is read when the job runs, under its owner."""
        self.store.get_session(owner, replan["session_id"])  # NotFound once it is deleted
        turn = next((t for t in self.store.turns(replan["session_id"]) if t["seq"] == replan["seq"]), None)
        if turn is None:
            raise LookupError(f"seq: the plan turn {replan['seq']} of session {replan['session_id']} is gone")
        ids = turn["meta"].get("answer_ids")
        if ids is None:  # a turn stored without its ids: serialize its segments as a layout does
            layout = Layout(self.runtime.tokenizer, lambda h: self._image_ids(h, size))
            ids = layout.encode(layout.answer(turn["output"]))
        keep = replan["step"] - 1
        ends = [i for i, t in enumerate(ids) if t == self.runtime.vocab.eoi]  # each keyframe's last id
        hashes = [s["image"] for s in turn["output"] if s["type"] == "image"][:keep]
        if len(ends) < keep or len(hashes) < keep:
            raise ValueError(f"step: the plan has only {len(ends)} keyframe(s); cannot keep {keep}")
        kept = ids[:ends[keep - 1] + 1] if keep else []
        text = self.runtime.tokenizer.encode(vla_step_text(replan["subtask"]), allow_special=False)
        return kept + text, hashes

    def _emit_forced(self, ids: list[int], hashes: list[str], emit) -> None:
        """Stream the forced start of an answer as if it had been generated, so a live view shows it."""
        for seg in segments_from_ids(ids, self.runtime.vocab, self.runtime.tokenizer, hashes):
            if seg["type"] == "image":
                emit({"type": "image_started", "height": seg["height"], "width": seg["width"]})
                emit({"type": "image", "image": seg["image"], "height": seg["height"], "width": seg["width"]})
            elif seg["type"] == "text":  # a kept subtask or the edited one
                emit({"type": "text", "text": seg["text"]})

    def _upload_shape(self, inputs: list) -> tuple[int, int] | None:
        """(width, height) of the first uploaded image among turn inputs: the views of a world started
        from a picture keep its frame."""
        from worldsim.media import probe

        for turn_input in inputs:
            for digest in (turn_input or {}).get("images", []):
                row = self.store.get_image(digest)
                if not isinstance(row["codes"], list):  # an upload (the model's own images hold their grid)
                    _, width, height = probe(row["png"])  # the header: stored uploads were validated
                    return width, height
        return None

    def _image_ids(self, digest: str, size: tuple[int, int]) -> list[int]:
        """Serialized ids of a stored image: its own codes when the model made it, else the input
        image encoded at `size` (cached in the image row)."""
        from worldsim.media import load_upload

        row = self.store.get_image(digest)
        codes = row["codes"]
        if isinstance(codes, dict):  # an uploaded image: codes per requested size
            codes = codes.get(f"{size[0]}x{size[1]}")
        if codes is None:
            grid, _ = self.runtime.encode_image(load_upload(row["png"]), size)
            self.store.set_image_codes(digest, f"{size[0]}x{size[1]}", grid)
            codes = grid
        return self.runtime.vocab.image_ids(codes)


def history_rerolls(turns: list[dict], seq: int) -> int:
    for t in turns:
        if t["seq"] == seq:
            return int(t["meta"].get("rerolled", 0))
    return 0


class _Cancelled(Exception):
    pass
