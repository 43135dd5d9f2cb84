"""The UI's event handlers: every tab's actions on top of the public Engine API.

A handler names the acting user (app/identity.py), checks its input, submits an engine job with
wait=False and follows the job's events (app/stream.py), yielding the tab's outputs as they change.
The only thing the browser keeps is `current` = {"session": id, "job": id} per tab (a gr.BrowserState,
encrypted in localStorage); everything else is read back from the engine, so a reload or a server
restart re-renders the same session, and an unfinished job is re-attached (`attach`).

Each tab's outputs are, in order, KEYS[tab]: its view (HTML), a status line (Markdown), `current`,
the session as JSON (media as URLs on our owner-checked routes), and for some tabs a selector of
steps. Handlers return `self.pack(tab, key=value, ...)`; keys left out are not updated.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid

import gradio as gr

from app import checks, render
from app.identity import NoIdentity, user_of
from app.stream import TERMINAL, Live, follow
from worldsim import export as wexport
from worldsim import video as wvideo
from worldsim.engine import MAX_AUTO_STEPS, JobFailed
from worldsim.modes import MAX_VLA_STEPS
from worldsim.store import NotFound

EMPTY = {"session": None, "job": None}
TABS = {"explore": ("explore",), "story": ("story",), "guide": ("howto",), "plan": ("vla",), "image": ("t2i", "x2i")}
TAB_OF_MODE = {m: tab for tab, modes in TABS.items() for m in modes}
KEYS = {"explore": ("view", "status", "current", "data", "selector"),
        "story": ("view", "status", "current", "data", "selector"),
        "guide": ("view", "status", "current", "data"),
        "plan": ("view", "status", "current", "data", "selector"),
        "image": ("view", "status", "current", "data")}
# Explore's buttons and free text share one path: a button sends its instruction sentence, the phrasing
# of the demo model's step-by-step training sessions (train/sim/doom.ACTIONS).
ACTIONS = {"forward": "move forward", "back": "move backward", "turn_left": "turn left",
           "turn_right": "turn right", "strafe_left": "strafe left", "strafe_right": "strafe right"}
# SPEC §3's t2i aspect presets (h x w tokens at the official 64x64 area); smaller models scale them.
ASPECTS = {"1:1": (64, 64), "4:3": (55, 73), "3:4": (73, 55), "16:9": (47, 85), "9:16": (85, 47),
           "3:2": (52, 78), "2:3": (78, 52), "21:9": (41, 97)}
MAX_GUIDE_STEPS = 8
BRANCH_NOTE = "Re-rolled in a new branch (the later turns stay in the original, kept in Sessions)."
MAX_STORY_BEATS = 5


def aspect_size(aspect: str, side: int) -> list[int]:
    """A preset scaled so a square would be side x side tokens (about the same area for every preset)."""
    if aspect not in ASPECTS:
        raise gr.Error(f"aspect: unknown {aspect!r}; allowed: {', '.join(ASPECTS)}")
    h, w = ASPECTS[aspect]
    return [max(1, min(99, round(h * side / 64))), max(1, min(99, round(w * side / 64)))]


@contextlib.contextmanager
def user_errors():
    """Engine errors -> a gr.Error the user can act on."""
    try:
        yield
    except NoIdentity as e:
        raise gr.Error(str(e)) from None
    except NotFound:
        raise gr.Error("Not found: that session was deleted, or it belongs to another browser.") from None
    except JobFailed as e:
        raise gr.Error(f"The generation failed: {e}") from None
    except ValueError as e:
        raise gr.Error(str(e)) from None


def check(*errors) -> None:
    for err in errors:
        if err:
            raise gr.Error(err)


def norm(current) -> dict:
    if not isinstance(current, dict):
        return dict(EMPTY)
    return {"session": current.get("session") if isinstance(current.get("session"), str) else None,
            "job": current.get("job") if isinstance(current.get("job"), str) else None}


def public(session: dict | None) -> dict | None:
    """A session as the API returns it: media as URLs on the owner-checked route."""
    if session is None:
        return None

    def seg(s):
        return {**s, "url": render.image_url(s["image"])} if s["type"] == "image" else s

    keep = ("seconds", "seed", "finish_reason", "image_size", "model", "sampler", "rerolled")
    turns = [{"seq": t["seq"], "kind": t["kind"],
              "input": {"text": t["input"].get("text", ""),
                        "images": [render.image_url(h) for h in t["input"].get("images", [])]},
              "output": [seg(s) for s in t["output"]],
              "meta": {k: t["meta"][k] for k in keep if k in t["meta"]}} for t in session["turns"]]
    plan = [{**p, "url": render.image_url(p["image"])} for p in session["plan"]] if session.get("plan") else None
    fields = ("session_id", "mode", "title", "settings", "parent", "num_turns", "created_at", "updated_at")
    return {**{k: session[k] for k in fields}, "turns": turns, "plan": plan}


class Handlers:
    def __init__(self, engine, data_dir: str, max_jobs_per_user: int = 2, max_side: int = 64,
                 default_side: int = 16):
        self.engine = engine
        self.video_dir = os.path.join(os.path.abspath(data_dir), "videos")
        self.max_jobs_per_user = max_jobs_per_user
        self.max_side, self.default_side = max_side, default_side

    # ---- plumbing ------------------------------------------------------------------------------
    def pack(self, tab: str, **values) -> tuple:
        unknown = set(values) - set(KEYS[tab])
        assert not unknown, f"{tab} has no outputs {unknown}"
        return tuple(values[k] if k in values else gr.skip() for k in KEYS[tab])

    @staticmethod
    def user(request) -> str:
        with user_errors():
            return user_of(request)

    def session(self, user: str, current, tab: str) -> dict | None:
        """The tab's current session, or None (never set, deleted, or not this user's)."""
        sid = norm(current)["session"]
        if not sid:
            return None
        try:
            s = self.engine.show(user, sid)
        except NotFound:
            return None
        return s if s["mode"] in TABS[tab] else None

    def require(self, user: str, current, tab: str, what: str) -> dict:
        s = self.session(user, current, tab)
        if s is None:
            raise gr.Error(f"Start {what} first (or open one from Sessions).")
        return s

    def idle(self, user: str, current) -> None:
        job_id = norm(current)["job"]
        if job_id:
            try:
                if self.engine.job(user, job_id)["status"] not in TERMINAL:
                    raise gr.Error("A generation is still running in this tab; wait for it or press Stop.")
            except NotFound:
                pass

    def check_quota(self, user: str) -> None:
        # the engine has no per-user job query; its store lists unfinished jobs (few: they are live)
        mine = [j for j in self.engine.store.unfinished_jobs() if j["owner"] == user]
        if len(mine) >= self.max_jobs_per_user:
            raise gr.Error(f"You already have {len(mine)} generation(s) running (the limit is "
                           f"{self.max_jobs_per_user}); wait for one to finish or press Stop.")

    def selector(self, tab: str, s: dict | None):
        turns = s["turns"] if s else []
        if tab == "explore":
            choices = [(f"#{t['seq']} · {render.instruction_of(t)[:40]}", t["seq"]) for t in turns]
        elif tab == "story":
            choices = [(f"Beat {i + 1}", t["seq"]) for i, t in enumerate(turns)]
        else:  # plan
            choices = [(f"{p['step']}. {p['subtask'][:40]}", p["step"]) for p in (s or {}).get("plan") or []]
            return gr.update(choices=choices, value=None)
        return gr.update(choices=choices, value=choices[-1][1] if choices else None)

    def motion(self, user: str, plan: list[dict]) -> list[float | None]:
        """Mean absolute change (0-255, grey, 32x32) from each keyframe to the next: a robot world
        model often draws an arm that does not move."""
        from PIL import Image, ImageChops, ImageStat

        out, prev = [], None
        for p in plan:
            im = Image.open(io.BytesIO(self.engine.image(user, p["image"]))).convert("L").resize((32, 32))
            out.append(None if prev is None else ImageStat.Stat(ImageChops.difference(im, prev)).mean[0])
            prev = im
        return out

    def snapshot(self, tab: str, user: str, s: dict | None, status: str = "") -> tuple:
        mode = s["mode"] if s else TABS[tab][0]
        kw = {"motion": self.motion(user, s["plan"])} if s and s.get("plan") else {}
        values = {"view": render.view(mode, s["turns"] if s else [], **kw), "status": status,
                  "current": {"session": s["session_id"] if s else None, "job": None}, "data": public(s)}
        if "selector" in KEYS[tab]:
            values["selector"] = self.selector(tab, s)
        return self.pack(tab, **values)

    def run(self, tab: str, user: str, submit, note: str = ""):
        """Submit a job (submit() -> job dict) and stream it; `note` is added to the final status."""
        self.check_quota(user)
        with user_errors():
            job = submit()
        yield from self.stream(tab, user, job, note)

    def stream(self, tab: str, user: str, job: dict, note: str = ""):
        sid = job["session_id"]
        with user_errors():
            s = self.engine.show(user, sid)
        current = {"session": sid, "job": job["id"]}
        live = None
        for live in follow(self.engine, user, job, s["turns"]):
            yield self.pack(tab, view=render.view(s["mode"], live.turns_for_view()), status=live.status_text(),
                            current=current)
        try:
            final = self.engine.show(user, sid)
        except NotFound:  # the engine removes a session whose first turn failed
            final = None
        status = live.status_text() + (f" {note}" if note and live.status == "done" else "")
        yield self.snapshot(tab, user, final, status=status)

    def settings(self, image_size, seed, **extra) -> dict:
        with user_errors():
            size = checks.parse_size(image_size)
        out = {"seed": int(seed), **extra}
        if size:
            out["image_size"] = size
        return out

    # ---- every tab -------------------------------------------------------------------------------
    def attach(self, tab: str, current, request):
        """Page load: show the tab's session; if its job is still running, follow it again."""
        user = self.user(request)
        current = norm(current)
        status = ""
        if current["job"]:
            try:
                job = self.engine.job(user, current["job"])
            except NotFound:
                job = None
            if job and job["status"] not in TERMINAL:
                yield from self.stream(tab, user, job)
                return
            if job:  # it ended while the page was away: say how
                status = Live(job, []).status_text()
                current["session"] = job["session_id"]
        yield self.snapshot(tab, user, self.session(user, current, tab), status=status)

    def cancel(self, tab: str, current, request):
        user = self.user(request)
        job_id = norm(current)["job"]
        if not job_id:
            return self.pack(tab, status="Nothing is running in this tab.")
        with user_errors():
            job = self.engine.cancel(user, job_id)
        return self.pack(tab, status="■ Stopping…" if job["status"] not in TERMINAL else "■ Stopped.")

    def render_video(self, tab: str, current, request, progress):
        """The session's keyframes -> MP4 with gr.Progress: in-betweens from the video decoder when one is
        installed (assets/video_decoder or $WORLDSIM_VIDEO_DECODER), else the slideshow."""
        user = self.user(request)
        s = self.require(user, current, tab, "a session")
        frames = wexport.keyframes(s)
        if not frames:
            raise gr.Error("This session has no keyframes to render yet.")
        sid = s["session_id"]
        path = self.video_path(user, sid)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp.mp4"
        progress((0, len(frames)), desc="Rendering video", unit="keyframes")
        try:
            with user_errors():
                info = wvideo.render(
                    s, lambda h: self.engine.image(user, h), tmp, fps=8, seconds_per_image=0.5,
                    data_dir=os.path.dirname(self.video_dir),
                    progress=lambda i, n: progress((i, n), desc="Rendering video", unit="frames"))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return render.video(sid, os.path.getmtime(path)), (f"Rendered {info['keyframes']} keyframes to video"
                                                       f" ({info['renderer'].replace('_', ' ')}).")

    def video_path(self, user: str, session_id: str) -> str:
        return os.path.join(self.video_dir, user, f"{session_id}.mp4")

    # ---- explore ---------------------------------------------------------------------------------
    def explore_start(self, current, prompt, image, image_size, seed, request: gr.Request):
        user = self.user(request)
        check(checks.text(prompt, "prompt", required=not image), checks.upload(image, "image"),
              checks.image_size(image_size), checks.seed(seed))
        settings = self.settings(image_size, seed)
        images = [checks.read_file(image)] if image else []
        yield from self.run("explore", user, lambda: self.engine.new(
            user, "explore", prompt=prompt or "", images=images, settings=settings, wait=False))

    def explore_step(self, current, instruction, request: gr.Request):
        user = self.user(request)
        check(checks.text(instruction, "instruction"))
        s = self.require(user, current, "explore", "a world")
        self.idle(user, current)
        yield from self.run("explore", user, lambda: self.engine.step(user, s["session_id"], instruction, wait=False))

    def _auto(self, tab: str, what: str, field: str, limit: int, current, n, request):
        """`n` more turns on the model's own (explore steps, story beats)."""
        user = self.user(request)
        check(checks.integer(n, field, 1, limit))
        s = self.require(user, current, tab, what)
        self.idle(user, current)
        yield from self.run(tab, user, lambda: self.engine.auto(user, s["session_id"], int(n), wait=False))

    def _reroll(self, tab: str, what: str, field: str, current, index, request):
        """Re-roll turn `index`: the last in place; an earlier one in a new branch (the original stays)."""
        user = self.user(request)
        s = self.require(user, current, tab, what)
        self.idle(user, current)
        check(checks.integer(index, field, 0, max(0, s["num_turns"] - 1)))
        yield from self.run(tab, user, lambda: self.engine.reroll(user, s["session_id"], int(index), wait=False),
                            note=BRANCH_NOTE if int(index) < s["num_turns"] - 1 else "")

    def explore_auto(self, current, steps, request: gr.Request):
        yield from self._auto("explore", "a world", "steps", MAX_AUTO_STEPS, current, steps, request)

    def explore_reroll(self, current, step, request: gr.Request):
        yield from self._reroll("explore", "a world", "step", current, step, request)

    def explore_undo(self, current, request: gr.Request):
        user = self.user(request)
        s = self.require(user, current, "explore", "a world")
        self.idle(user, current)
        with user_errors():
            s = self.engine.undo(user, s["session_id"])
        return self.snapshot("explore", user, s, status="↩ Undid the last step.")

    def explore_rewind(self, current, step, request: gr.Request):
        """Undo every step after `step` (the engine undoes one turn at a time)."""
        user = self.user(request)
        s = self.require(user, current, "explore", "a world")
        self.idle(user, current)
        check(checks.integer(step, "step", 0, max(0, s["num_turns"] - 1)))
        with user_errors():
            while s["num_turns"] > int(step) + 1:
                s = self.engine.undo(user, s["session_id"])
        return self.snapshot("explore", user, s, status=f"↩ Rewound to step {int(step)}.")

    def explore_branch(self, current, step, request: gr.Request):
        user = self.user(request)
        s = self.require(user, current, "explore", "a world")
        check(checks.integer(step, "step", 0, max(0, s["num_turns"] - 1)))
        with user_errors():
            new = self.engine.branch(user, s["session_id"], int(step))
        return self.snapshot("explore", user, new, status=f"Branched at step {int(step)}: this is a new session; "
                                                          f"the original is kept in Sessions.")

    # ---- story -----------------------------------------------------------------------------------
    def story_start(self, current, prompt, image, image_size, seed, request: gr.Request):
        user = self.user(request)
        check(checks.text(prompt, "prompt", required=not image), checks.upload(image, "image"),
              checks.image_size(image_size), checks.seed(seed))
        settings = self.settings(image_size, seed)
        images = [checks.read_file(image)] if image else []
        yield from self.run("story", user, lambda: self.engine.new(
            user, "story", prompt=prompt or "", images=images, settings=settings, wait=False))

    def story_continue(self, current, beats, request: gr.Request):
        yield from self._auto("story", "a story", "beats", MAX_STORY_BEATS, current, beats, request)

    def story_reroll(self, current, beat, request: gr.Request):
        yield from self._reroll("story", "a story", "beat", current, beat, request)

    # ---- guide -----------------------------------------------------------------------------------
    def guide_start(self, current, question, max_steps, image_size, seed, request: gr.Request):
        user = self.user(request)
        check(checks.text(question, "question"), checks.integer(max_steps, "max steps", 1, MAX_GUIDE_STEPS),
              checks.image_size(image_size), checks.seed(seed))
        settings = self.settings(image_size, seed, max_steps=int(max_steps))
        yield from self.run("guide", user, lambda: self.engine.new(
            user, "howto", prompt=question, settings=settings, wait=False))

    def guide_reroll(self, current, request: gr.Request):
        user = self.user(request)
        s = self.require(user, current, "guide", "a guide")
        self.idle(user, current)
        yield from self.run("guide", user, lambda: self.engine.reroll(user, s["session_id"], wait=False))

    # ---- robot plan ------------------------------------------------------------------------------
    def plan_start(self, current, arm, goal, steps, scene, image_size, seed, request: gr.Request):
        user = self.user(request)
        check(checks.text(arm, "arm", limit=200), checks.text(goal, "goal"),
              checks.integer(steps, "steps", 1, MAX_VLA_STEPS), checks.upload(scene, "scene image"),
              checks.image_size(image_size), checks.seed(seed))
        settings = self.settings(image_size, seed)
        images = [checks.read_file(scene)] if scene else []
        title = f"{goal.strip()[:70]} · {arm.strip()[:30]}"
        yield from self.run("plan", user, lambda: self.engine.new(
            user, "vla", arm=arm, goal=goal, steps=int(steps), images=images, settings=settings, title=title,
            wait=False))

    def plan_pick(self, current, step, request: gr.Request):
        """The chosen subtask's text, to edit."""
        user = self.user(request)
        s = self.session(user, current, "plan")
        for p in (s or {}).get("plan") or []:
            if p["step"] == step:
                return p["subtask"]
        return ""

    def plan_regenerate(self, current, step, subtask, request: gr.Request):
        """Edit subtask `step` and plan again from there (Engine.replan): a new plan session (the
        original stays in Sessions) whose subtasks 1..step-1 are the original's, texts and keyframes
        exactly; the edited subtask's keyframe and the later steps are generated anew."""
        user = self.user(request)
        s = self.require(user, current, "plan", "a plan")
        self.idle(user, current)
        plan = s["plan"] or []
        check(None if step else "subtask: choose the one to edit", checks.integer(step, "step", 1, max(1, len(plan))),
              checks.text(subtask, "subtask", limit=300))
        step = int(step)
        kept = {1: "", 2: "Step 1 is kept as it was. "}.get(step, f"Steps 1-{step - 1} are kept as they were. ")
        yield from self.run("plan", user, lambda: self.engine.replan(user, s["session_id"], step, subtask, wait=False),
                            note=kept + "This is a new plan; the original is kept in Sessions.")

    def plan_export(self, current, request: gr.Request):
        user = self.user(request)
        s = self.require(user, current, "plan", "a plan")
        cfg = s["settings"]
        doc = {"session_id": s["session_id"], "arm": cfg.get("arm"), "goal": cfg.get("goal"),
               "steps": cfg.get("steps"), "plan": public(s)["plan"]}
        link = (f"<a class='ws-export' href='{render.export_url(s['session_id'], 'json')}' download>"
                f"Download the whole session as JSON</a>")
        return json.dumps(doc, indent=2), link

    # ---- image -----------------------------------------------------------------------------------
    def image_generate(self, current, prompt, aspect, references, side, seed, request: gr.Request):
        """t2i (no references) or x2i (1-3 references). Results with the same mode and size go on
        in the tab's current session; otherwise a new session starts."""
        user = self.user(request)
        references = [r for r in (references or []) if r is not None]
        check(checks.text(prompt, "prompt"), checks.uploads(references, "reference images"),
              checks.integer(side, "size", 1, self.max_side), checks.seed(seed))
        size = aspect_size(aspect, int(side))
        mode = "x2i" if references else "t2i"
        images = [checks.read_file(r) for r in references]
        s = self.session(user, current, "image")
        self.idle(user, current)
        same = s and s["mode"] == mode and s["settings"].get("image_size") == size and s["settings"].get("seed") == seed
        if same:
            submit = lambda: self.engine.step(user, s["session_id"], prompt, images=images, wait=False)  # noqa: E731
        else:
            submit = lambda: self.engine.new(user, mode, prompt=prompt, images=images,  # noqa: E731
                                             settings={"seed": int(seed), "image_size": size}, wait=False)
        yield from self.run("image", user, submit)

    # ---- sessions --------------------------------------------------------------------------------
    def listing(self, user: str) -> tuple[list, list[dict]]:
        with user_errors():
            sessions = self.engine.list(user)
        return [(render.session_label(s), s["session_id"]) for s in sessions], sessions

    def sessions_list(self, request: gr.Request):
        """The user's sessions, newest first: (the panel's choices, the list as JSON)."""
        choices, sessions = self.listing(self.user(request))
        return gr.update(choices=choices), sessions

    def session_selected(self, session_id, request: gr.Request):
        return session_id or "", render.export_links(session_id or None)

    def session_open(self, session_id, request: gr.Request):
        """Open a session in its tab. Outputs: the tab switch, then every tab's outputs."""
        user = self.user(request)
        if not session_id:
            raise gr.Error("Select a session first.")
        with user_errors():
            s = self.engine.show(user, session_id)
        target = TAB_OF_MODE[s["mode"]]
        out = [gr.update(selected=target)]
        for tab in TABS:
            if tab == target:
                out += self.snapshot(tab, user, s, status=f"Opened “{s['title'][:60]}”.")
            else:
                out += [gr.skip()] * len(KEYS[tab])
        return tuple(out)

    def session_delete(self, session_id, request: gr.Request):
        """Delete a session (and its video). Outputs: the sessions list, its JSON, the export links."""
        user = self.user(request)
        if not session_id:
            raise gr.Error("Select a session first.")
        with user_errors():
            self.engine.delete(user, session_id)
        video = self.video_path(user, session_id)
        if os.path.exists(video):
            os.remove(video)
        choices, sessions = self.listing(user)
        return gr.update(choices=choices, value=None), sessions, render.export_links(None)

    def session_export(self, session_id: str, fmt: str, request: gr.Request) -> str:
        """The owner-checked download URL of a session's export (json, html or zip)."""
        user = self.user(request)
        if fmt not in wexport.FORMATS:
            raise gr.Error(f"format: unknown {fmt!r}; allowed: {', '.join(wexport.FORMATS)}")
        with user_errors():
            self.engine.show(user, session_id or "")
        return render.export_url(session_id, fmt)

    def refresh_tab(self, tab: str, current, request):
        """After a delete: a tab whose session is gone goes back to empty."""
        user = self.user(request)
        if self.session(user, current, tab) is None and norm(current)["session"]:
            return self.snapshot(tab, user, None)
        return self.pack(tab)
