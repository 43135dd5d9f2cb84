"""The Gradio 6 layout: five tabs (Explore, Story, Guide, Robot plan, Image) and a Sessions panel,
wired to app/handlers.py.

Rules the wiring follows (shared/NOTES.md, "Gradio 6"):
- every event that submits model work shares one concurrency_id ("model") with the same explicit
  concurrency_limit; light events (undo, branch, cancel, lists) share another ("ui"), video
  rendering a third ("render"), page-load re-attaches a fourth ("attach");
- inputs are checked by a `validator=` before the event is queued (a clear message on the field),
  and again in the handler;
- the browser keeps only {"session", "job"} ids per tab, in gr.BrowserState with a fixed storage key
  and a secret kept in the data directory, so they survive a reload and a server restart;
- every tab has named API endpoints (`api_name`); UI-only helpers are private.
"""

from __future__ import annotations

import os

import gradio as gr

from app import checks, render
from app.handlers import ACTIONS, ASPECTS, EMPTY, KEYS, MAX_GUIDE_STEPS, MAX_STORY_BEATS, TABS, Handlers
from worldsim.engine import MAX_AUTO_STEPS
from worldsim.modes import MAX_TEXT_CHARS, MAX_VLA_STEPS

ARMS = ["Franka Panda", "UR5e", "xArm 7", "Kinova Gen3", "ALOHA (bimanual)"]
# The embedded demo model knows ViZDoom, PyBullet (Franka Panda) and Crafter: its examples come first,
# with held-out frames from those simulators (assets/examples/); the others suit a large checkpoint.
EXAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "examples")
DOOM, PANDA, CRAFTER = (os.path.join(EXAMPLE_DIR, f"{n}.png") for n in ("doom", "panda", "crafter"))
EXAMPLES = {
    "explore": [["Explore this place.", DOOM], ["a stone corridor lit by torches", None],
                ["a sunny beach with palm trees", None]],
    "story": [["Tell the story of the player's day in this Crafter world.", CRAFTER],
              ["a fox finds a lantern in the snow", None]],
    "guide": ["How to make a wood pickaxe", "How to make a stone pickaxe", "How do I make a paper airplane?"],
    "plan": [["put the white cube on the orange pad", 5, PANDA], ["stack the blue block on the green block", 4, None]],
    "image": ["A first-person view inside a Doom level (my way home).", "A top-down view of a Crafter world.",
              "a red cube on a blue table"],
}
MOVES = [("forward", "⬆ Forward"), ("back", "⬇ Back"), ("turn_left", "↶ Turn left"), ("turn_right", "↷ Turn right"),
         ("strafe_left", "⇠ Strafe left"), ("strafe_right", "⇢ Strafe right")]
INTRO = ("Pick a tab, describe something and press its button. Everything you make is kept in **Your sessions** "
         "(this browser only); a generation keeps running if you close the tab, and comes back when you return.")


def _v(*errors):
    """A validator's answer: one gr.validate per input, in order (None: that input is fine)."""
    return [gr.validate(e is None, e or "") for e in errors]


def _start_check(current, prompt, image, size, seed):
    return _v(None, checks.text(prompt, "prompt", not image), checks.upload(image, "image"),
              checks.image_size(size), checks.seed(seed))


class Builder:
    """Creates one tab's components and wires its events; `tabs_out[tab]` is the tab's outputs in
    handlers.KEYS order."""

    def __init__(self, h: Handlers, concurrency: int, default_size: str):
        self.h, self.default_size = h, default_size
        self.model = dict(concurrency_id="model", concurrency_limit=concurrency, show_progress="minimal")
        self.light = dict(concurrency_id="ui", concurrency_limit=16, show_progress="hidden")
        self.private = dict(api_visibility="private", **self.light)
        self.currents: dict[str, gr.BrowserState] = {}
        self.tabs_out: dict[str, list] = {}
        self.changes = []  # events that make or change a session: the Sessions list refreshes after them

    # ---- pieces every tab has --------------------------------------------------------------------
    def outputs(self, tab, view, status, data, selector=None) -> list:
        found = {"view": view, "status": status, "current": self.currents[tab], "data": data, "selector": selector}
        self.tabs_out[tab] = [found[k] for k in KEYS[tab]]
        return self.tabs_out[tab]

    def options(self, tab):
        with gr.Accordion("Options", open=False, elem_id=f"{tab}-options"):
            with gr.Row():
                size = gr.Textbox(label="Image size in tokens (HxW, or auto)", value=self.default_size, max_lines=1,
                                  elem_id=f"{tab}-size")
                seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id=f"{tab}-seed")
        return size, seed

    def status_row(self, tab):
        with gr.Row(equal_height=True):
            status = gr.Markdown(elem_id=f"{tab}-status")
            stop = gr.Button("Stop", variant="stop", size="sm", scale=0, min_width=80, elem_id=f"{tab}-stop")
        return status, stop

    def data_box(self, tab):
        with gr.Accordion("Session data (JSON, media as URLs)", open=False):
            return gr.JSON(elem_id=f"{tab}-data")

    def wire_common(self, tab, stop, render_btn=None, video=None, status=None):
        h, current = self.h, self.currents[tab]

        def cancel(current, request: gr.Request):
            return h.cancel(tab, current, request)

        stop.click(cancel, [current], self.tabs_out[tab], api_name=f"{tab}_cancel", **self.light)
        if render_btn is not None:
            def render_video(current, request: gr.Request, progress=gr.Progress()):
                return h.render_video(tab, current, request, progress)

            render_btn.click(render_video, [current], [video, status], api_name=f"{tab}_render",
                             concurrency_id="render", concurrency_limit=2)

    def on(self, trigger, fn, inputs, outputs, *, kind="model", track=True, **kw):
        """trigger(fn, ...) with the event group's settings; tracked events refresh the Sessions list."""
        group = {"model": self.model, "light": self.light}[kind]
        dep = trigger(fn, inputs, outputs, **group, **kw)
        if track:
            self.changes.append(dep)
        return dep

    # ---- tabs ------------------------------------------------------------------------------------
    def explore(self):
        h, cur = self.h, self.currents["explore"]
        with gr.Row():
            prompt = gr.Textbox(label="Describe a world to start from", lines=2, scale=3, max_length=MAX_TEXT_CHARS,
                                elem_id="explore-prompt", placeholder=EXAMPLES["explore"][0][0])
            image = gr.File(label="…or start from an image (PNG, JPEG, WebP, BMP)", scale=2,
                            file_types=checks.UPLOAD_TYPES, type="filepath", elem_id="explore-image")
        size, seed = self.options("explore")
        gr.Examples(EXAMPLES["explore"], [prompt, image], label="Examples")
        start = gr.Button("Start world", variant="primary", elem_id="explore-start")
        status, stop = self.status_row("explore")
        view = gr.HTML(render.explore([]), elem_id="explore-view")
        with gr.Row():
            moves = {k: gr.Button(label, size="sm", min_width=90, elem_id=f"explore-{k}") for k, label in MOVES}
        with gr.Row():
            instruction = gr.Textbox(label="…or tell the camera what to do", scale=4, max_lines=2,
                                     max_length=MAX_TEXT_CHARS, elem_id="explore-instruction",
                                     placeholder="walk to the door")
            go = gr.Button("Go", scale=1, elem_id="explore-go")
        with gr.Row():
            auto_n = gr.Slider(1, min(20, MAX_AUTO_STEPS), value=3, step=1, label="Auto-explore steps",
                               elem_id="explore-auto-n")
            auto = gr.Button("Auto-explore", elem_id="explore-auto")
        with gr.Row():
            step = gr.Dropdown(label="Timeline step", choices=[], elem_id="explore-step", scale=2)
            branch = gr.Button("Branch from this step", size="sm", elem_id="explore-branch")
            rewind = gr.Button("Rewind to this step", size="sm", elem_id="explore-rewind")
            reroll = gr.Button("Re-roll this step", size="sm", elem_id="explore-reroll")
            undo = gr.Button("Undo last step", size="sm", elem_id="explore-undo")
        with gr.Row():
            render_btn = gr.Button("Render path to video", elem_id="explore-render")
            video = gr.HTML(elem_id="explore-video")
        data = self.data_box("explore")
        out = self.outputs("explore", view, status, data, step)
        self.wire_common("explore", stop, render_btn, video, status)

        self.on(start.click, h.explore_start, [cur, prompt, image, size, seed], out, api_name="explore_start",
                validator=_start_check)
        self.on(go.click, h.explore_step, [cur, instruction], out, api_name="explore_step",
                validator=lambda c, t: _v(None, checks.text(t, "instruction")))
        self.on(instruction.submit, h.explore_step, [cur, instruction], out, api_visibility="private")
        for key, btn in moves.items():  # a button is its canonical sentence, through the same handler
            def move(current, request: gr.Request, _sentence=ACTIONS[key]):
                yield from h.explore_step(current, _sentence, request)

            self.on(btn.click, move, [cur], out, api_visibility="private")
        self.on(auto.click, h.explore_auto, [cur, auto_n], out, api_name="explore_auto")
        self.on(reroll.click, h.explore_reroll, [cur, step], out, api_name="explore_reroll")
        self.on(undo.click, h.explore_undo, [cur], out, kind="light", api_name="explore_undo")
        self.on(rewind.click, h.explore_rewind, [cur, step], out, kind="light", api_name="explore_rewind")
        self.on(branch.click, h.explore_branch, [cur, step], out, kind="light", api_name="explore_branch")

    def story(self):
        h, cur = self.h, self.currents["story"]
        with gr.Row():
            prompt = gr.Textbox(label="Story premise", lines=2, scale=3, max_length=MAX_TEXT_CHARS,
                                elem_id="story-prompt", placeholder=EXAMPLES["story"][0][0])
            image = gr.File(label="Optional picture to start from", scale=2, file_types=checks.UPLOAD_TYPES,
                            type="filepath", elem_id="story-image")
        size, seed = self.options("story")
        gr.Examples(EXAMPLES["story"], [prompt, image], label="Examples")
        start = gr.Button("Tell the story", variant="primary", elem_id="story-start")
        status, stop = self.status_row("story")
        view = gr.HTML(render.story([]), elem_id="story-view")
        with gr.Row():
            beats = gr.Slider(1, MAX_STORY_BEATS, value=1, step=1, label="Beats to add", elem_id="story-beats")
            cont = gr.Button("Continue", elem_id="story-continue")
            beat = gr.Dropdown(label="Beat", choices=[], elem_id="story-beat")
            reroll = gr.Button("Re-roll this beat", elem_id="story-reroll")
        data = self.data_box("story")
        out = self.outputs("story", view, status, data, beat)
        self.wire_common("story", stop)
        self.on(start.click, h.story_start, [cur, prompt, image, size, seed], out, api_name="story_start",
                validator=_start_check)
        self.on(cont.click, h.story_continue, [cur, beats], out, api_name="story_continue")
        self.on(reroll.click, h.story_reroll, [cur, beat], out, api_name="story_reroll")

    def guide(self):
        h, cur = self.h, self.currents["guide"]
        question = gr.Textbox(label="How do I…?", lines=2, max_length=MAX_TEXT_CHARS, elem_id="guide-question",
                              placeholder=EXAMPLES["guide"][0])
        max_steps = gr.Slider(1, MAX_GUIDE_STEPS, value=4, step=1, label="At most this many steps",
                              elem_id="guide-max-steps")
        size, seed = self.options("guide")
        gr.Examples([[e] for e in EXAMPLES["guide"]], [question], label="Examples")
        with gr.Row():
            start = gr.Button("Write the guide", variant="primary", elem_id="guide-start")
            reroll = gr.Button("Re-roll the guide", elem_id="guide-reroll")
        status, stop = self.status_row("guide")
        view = gr.HTML(render.guide([]), elem_id="guide-view")
        data = self.data_box("guide")
        out = self.outputs("guide", view, status, data)
        self.wire_common("guide", stop)
        self.on(start.click, h.guide_start, [cur, question, max_steps, size, seed], out, api_name="guide_start",
                validator=lambda c, q, m, s, n: _v(None, checks.text(q, "question"), None, checks.image_size(s),
                                                   checks.seed(n)))
        self.on(reroll.click, h.guide_reroll, [cur], out, api_name="guide_reroll")

    def plan(self):
        h, cur = self.h, self.currents["plan"]
        with gr.Row():
            with gr.Column(scale=3):
                arm = gr.Dropdown(ARMS, value=ARMS[0], allow_custom_value=True, label="Arm type", elem_id="plan-arm")
                goal = gr.Textbox(label="Goal", lines=2, max_length=MAX_TEXT_CHARS, elem_id="plan-goal",
                                  placeholder=EXAMPLES["plan"][0][0])
                nsteps = gr.Slider(1, MAX_VLA_STEPS, value=4, step=1, label="Number of steps", elem_id="plan-steps")
            scene = gr.File(label="Scene image (optional)", scale=2, file_types=checks.UPLOAD_TYPES, type="filepath",
                            elem_id="plan-scene")
        size, seed = self.options("plan")
        gr.Examples(EXAMPLES["plan"], [goal, nsteps, scene], label="Examples")
        start = gr.Button("Plan", variant="primary", elem_id="plan-start")
        status, stop = self.status_row("plan")
        view = gr.HTML(render.plan([]), elem_id="plan-view")
        with gr.Row():
            pick = gr.Dropdown(label="Subtask to edit", choices=[], elem_id="plan-pick", scale=1)
            edit = gr.Textbox(label="New text for that subtask", scale=3, max_lines=2, elem_id="plan-edit")
            regen = gr.Button("Regenerate from this step", elem_id="plan-regenerate", scale=1)
        with gr.Row():
            render_btn = gr.Button("Render plan to video", elem_id="plan-render")
            export_btn = gr.Button("Export JSON", elem_id="plan-export")
        video = gr.HTML(elem_id="plan-video")
        export_link = gr.HTML(elem_id="plan-export-link")
        export_json = gr.Code(language="json", label="Plan (JSON)", elem_id="plan-json")
        data = self.data_box("plan")
        out = self.outputs("plan", view, status, data, pick)
        self.wire_common("plan", stop, render_btn, video, status)
        self.on(start.click, h.plan_start, [cur, arm, goal, nsteps, scene, size, seed], out, api_name="plan_start",
                validator=lambda c, a, g, k, sc, s, n: _v(
                    None, checks.text(a, "arm", limit=200), checks.text(g, "goal"), None,
                    checks.upload(sc, "scene image"), checks.image_size(s), checks.seed(n)))
        pick.change(h.plan_pick, [cur, pick], [edit], **self.private)
        # no validator here: Gradio runs validators without the session's state, so a dropdown whose
        # choices an event has set would be refused there; the handler checks instead
        self.on(regen.click, h.plan_regenerate, [cur, pick, edit], out, api_name="plan_regenerate")
        export_btn.click(h.plan_export, [cur], [export_json, export_link], api_name="plan_export", **self.light)

    def image(self):
        h, cur = self.h, self.currents["image"]
        prompt = gr.Textbox(label="Describe the image (or the edit, with reference images)", lines=2,
                            max_length=MAX_TEXT_CHARS, elem_id="image-prompt", placeholder=EXAMPLES["image"][0])
        with gr.Row():
            aspect = gr.Radio(list(ASPECTS), value="1:1", label="Aspect", elem_id="image-aspect", scale=3)
            side = gr.Slider(1, h.max_side, value=h.default_side, step=1, scale=2,
                             label="Size (tokens on the side of a square)", elem_id="image-side")
        refs = gr.File(label="Reference images for editing (x2i, up to 3; leave empty for t2i)", file_count="multiple",
                       file_types=checks.UPLOAD_TYPES, type="filepath", elem_id="image-refs")
        seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="image-seed")
        gr.Examples([[e] for e in EXAMPLES["image"]], [prompt], label="Examples")
        start = gr.Button("Generate", variant="primary", elem_id="image-generate")
        status, stop = self.status_row("image")
        view = gr.HTML(render.images([]), elem_id="image-view")
        data = self.data_box("image")
        out = self.outputs("image", view, status, data)
        self.wire_common("image", stop)
        self.on(start.click, h.image_generate, [cur, prompt, aspect, refs, side, seed], out, api_name="image_generate",
                validator=lambda c, p, a, r, sd, n: _v(
                    None, checks.text(p, "prompt"), None, checks.uploads(r, "reference images"),
                    checks.integer(sd, "size", 1, h.max_side), checks.seed(n)))

    def sessions(self, tabs):
        """The Sessions panel: the user's sessions, open one in its tab, delete, export links."""
        h = self.h
        gr.Markdown("### Your sessions\nPrivate to this browser; they survive reloads and restarts.")
        sessions = gr.Radio([], label="Sessions", elem_id="sessions-list", elem_classes=["ws-sessions"])
        with gr.Row():
            open_btn = gr.Button("Open", size="sm", elem_id="sessions-open")
            delete_btn = gr.Button("Delete", size="sm", variant="stop", elem_id="sessions-delete")
            refresh_btn = gr.Button("Refresh", size="sm", elem_id="sessions-refresh")
        # the id the buttons act on: a plain text input, so API clients can pass any id of theirs
        selected = gr.Textbox(visible=False, label="session_id")
        links = gr.HTML(render.export_links(None), elem_id="sessions-export")
        with gr.Accordion("Sessions (JSON)", open=False):
            sessions_json = gr.JSON(elem_id="sessions-json")

        listing = [sessions, sessions_json]
        refresh_btn.click(h.sessions_list, None, listing, api_name="sessions_list", **self.light)
        sessions.change(h.session_selected, [sessions], [selected, links], **self.private)
        all_tabs = [x for tab in TABS for x in self.tabs_out[tab]]
        open_btn.click(h.session_open, [selected], [tabs] + all_tabs, api_name="session_open", **self.light)
        delete_btn.click(h.session_delete, [selected], listing + [links], api_name="session_delete", **self.light)
        gr.api(h.session_export, api_name="session_export", concurrency_id="ui", concurrency_limit=16)
        return listing, delete_btn


def build(handlers: Handlers, *, title: str, model_note: str, secret: str, concurrency: int,
          default_size: str = "auto") -> gr.Blocks:
    b = Builder(handlers, concurrency, default_size)
    h = handlers
    with gr.Blocks(title=title, delete_cache=(1800, 3600), analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\n{model_note}\n\n{INTRO}", elem_id="ws-header")
        # outside the tabs: a tab's content mounts only when first shown, and an unmounted
        # BrowserState would hand its load event the default instead of the stored ids
        for tab in TABS:
            b.currents[tab] = gr.BrowserState(dict(EMPTY), storage_key=f"worldsim-{tab}", secret=secret)
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                with gr.Tabs(selected="explore") as tabs:
                    for tab, name in (("explore", "Explore"), ("story", "Story"), ("guide", "Guide"),
                                      ("plan", "Robot plan"), ("image", "Image")):
                        with gr.Tab(name, id=tab):
                            getattr(b, tab)()
            with gr.Column(scale=1, min_width=260):
                listing, delete_btn = b.sessions(tabs)

        # page load: the sessions list, then every tab re-attaches to its session and its job
        demo.load(h.sessions_list, None, listing, api_visibility="private", **b.light)
        for tab in TABS:
            def attach(current, request: gr.Request, _tab=tab):
                yield from h.attach(_tab, current, request)

            def refresh(current, request: gr.Request, _tab=tab):
                return h.refresh_tab(_tab, current, request)

            b.changes.append(demo.load(attach, [b.currents[tab]], b.tabs_out[tab], api_name=f"{tab}_attach",
                                       concurrency_id="attach", concurrency_limit=32, show_progress="hidden"))
            delete_btn.click(refresh, [b.currents[tab]], b.tabs_out[tab], **b.private)  # its session may be gone
        for dep in b.changes:  # a new session or a new turn shows in the list
            dep.then(h.sessions_list, None, listing, **b.private)
    return demo
