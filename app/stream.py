"""Following an engine job from the UI: its events folded into a live view of the session.

The job runs in the engine's worker, never in the Gradio event, so closing the tab stops only this
follower; `Engine.events` replays a job's events from the start, which is how a reloaded page
re-attaches. `Live` keeps the committed turns plus the turn being generated (text so far, a
placeholder per image with the rows decoded); `follow` yields it as events arrive, at most every
`interval` seconds except for the events that change the picture (an image starts or lands, a turn
commits, the job ends).
"""

from __future__ import annotations

import time

TERMINAL = ("done", "failed", "cancelled")


class Live:
    def __init__(self, job: dict, turns: list[dict]):
        self.job = job
        replace = job["action"] == "reroll"
        self.turns = [dict(t) for t in (turns[:-1] if replace and turns else turns)]
        payload = job.get("payload") or {}
        self.next_kind = "continue" if job["action"] == "auto" else payload.get("kind", "prompt")
        self.next_input = {} if job["action"] == "auto" else payload.get("input", {})
        self.pending: dict | None = None
        self.status = job["status"] if job["status"] in TERMINAL else "queued"
        self.error: str | None = job.get("error")
        self.num_text = 0
        self.t0 = job["created_at"]
        self.t_end = job["updated_at"] if job["status"] in TERMINAL else None
        self.total_turns = payload.get("steps", 1) if job["action"] == "auto" else 1
        self.committed = 0

    # ---- events --------------------------------------------------------------------------------
    def _pending(self) -> dict:
        if self.pending is None:
            seq = (self.turns[-1]["seq"] + 1) if self.turns else 0
            self.pending = {"seq": seq, "kind": self.next_kind, "input": self.next_input, "output": [],
                            "meta": {}, "pending": True}
        return self.pending

    def feed(self, event: dict) -> bool:
        """Fold one engine event in. True when the picture changed enough to show at once."""
        kind = event.get("type")
        if kind == "started":
            self.status = "running"
            return True
        if kind == "text":
            self.status = "running"
            out = self._pending()["output"]
            if out and out[-1]["type"] == "text":
                out[-1]["text"] += event["text"]
            else:
                out.append({"type": "text", "text": event["text"]})
            self.num_text += 1
            return False
        if kind == "image_started":
            self._pending()["output"].append({"type": "placeholder", "height": event["height"],
                                              "width": event["width"], "rows_done": 0,
                                              "rows_total": event["height"]})
            return True
        if kind == "image_progress":
            for seg in reversed(self._pending()["output"]):
                if seg["type"] == "placeholder":
                    seg["rows_done"], seg["rows_total"] = event["rows_done"], event["rows_total"]
                    break
            return False
        if kind == "image":
            # stored, but its turn is not committed yet: the media route (owner-checked through the
            # user's turns) would say 404, so the placeholder stays, full, until the "turn" event
            for seg in self._pending()["output"]:
                if seg["type"] == "placeholder" and not seg.get("image"):
                    seg.update(image=event["image"], rows_done=seg["rows_total"])
                    break
            return True
        if kind == "turn":
            turn = event["turn"]
            self.turns = [t for t in self.turns if t["seq"] != turn["seq"]] + [turn]
            self.turns.sort(key=lambda t: t["seq"])
            self.pending = None
            self.committed += 1
            return True
        if kind == "error":
            self.error = event.get("error")
            return True
        if kind == "done":
            self.status = event.get("status", "done")
            self.t_end = self.t_end or time.time()
            return True
        return False

    # ---- what to show --------------------------------------------------------------------------
    def turns_for_view(self) -> list[dict]:
        return self.turns + ([self.pending] if self.pending is not None else [])

    def status_text(self) -> str:
        secs = (self.t_end or time.time()) - self.t0
        if self.status == "queued":
            return "Waiting for the model (the job is queued)…"
        if self.status == "running":
            part = f" — turn {self.committed + 1} of {self.total_turns}" if self.total_turns > 1 else ""
            decoding = ""
            for seg in (self.pending or {}).get("output", []):
                if seg["type"] == "placeholder":
                    decoding = f", decoding an image ({seg['rows_done']}/{seg['rows_total']} rows)"
            return f"Generating{part}{decoding}… {secs:.0f} s"
        if self.status == "done":
            return f"✓ Done in {secs:.1f} s."
        if self.status == "cancelled":
            return "■ Stopped. The turns finished before the stop are kept."
        return f"✗ Failed: {self.error or 'unknown error'}"


def follow(engine, user: str, job: dict, turns: list[dict], interval: float = 0.2):
    """Yield the same `Live` as `job`'s events arrive (first at once, last when the job has ended)."""
    live = Live(job, turns)
    yield live
    last = time.monotonic()
    for _, event in engine.events(user, job["id"]):
        urgent = live.feed(event)
        now = time.monotonic()
        if urgent or now - last >= interval:
            last = now
            yield live
    if live.status not in TERMINAL:  # the stream ended without "done" (should not happen): read SQL
        final = engine.job(user, job["id"])
        live.status, live.error = final["status"], final.get("error")
    yield live
