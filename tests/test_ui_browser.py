"""Every tab end to end in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright),
on the real `python app.py` with its embedded default, the shipped demo model (assets/demo; the images
must be drawn, not blank and not one colour). Also: a session persists across a page reload and a
server restart, a generation goes on when its tab closes and the reopened page re-attaches to it,
and another browser gets 404 for this one's media. Screenshots go to a temp dir and are copied to
/tmp/worldsim-ui-shots/ for a person to look at."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
from PIL import Image

from ui_helpers import AppServer

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = "/tmp/worldsim-ui-shots"
TIMEOUT = 120_000  # ms, for one generation on a busy 2-core machine

# about a minute on a busy 2-core machine: in the default suite (the `slow` marker is for > ~90 s)
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no Chromium at {CHROMIUM}: apt-get install chromium (Debian package)")

# Draws an <img> on a canvas in the page and measures what the browser decoded.
IMAGE_STATS = """img => {
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const x = c.getContext('2d'); x.drawImage(img, 0, 0);
  const d = x.getImageData(0, 0, c.width, c.height).data; const colours = new Set();
  let sum = 0, sq = 0, n = 0;
  for (let i = 0; i < d.length; i += 4) {
    colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
    const v = (d[i] + d[i + 1] + d[i + 2]) / 3; sum += v; sq += v * v; n++;
  }
  const m = sum / n;
  return {w: c.width, h: c.height, colours: colours.size, std: Math.sqrt(Math.max(0, sq / n - m * m))};
}"""


def noise_png(path, size=(48, 32), seed=0) -> str:
    rng = random.Random(seed)
    im = Image.new("RGB", size)
    im.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    im.save(path)
    return str(path)


class UI:
    def __init__(self, page, shots_dir):
        self.page, self.shots_dir, self.n = page, shots_dir, 0

    def shot(self, name: str) -> None:
        self.n += 1
        self.page.screenshot(path=os.path.join(self.shots_dir, f"{self.n:02d}-{name}.png"), full_page=True)

    def tab(self, name: str) -> None:
        self.page.get_by_role("tab", name=name).click()

    def count(self, selector: str) -> int:
        return self.page.locator(selector).count()

    def wait(self, tab: str, predicate: str = "true", status: str = "✓", timeout: int = TIMEOUT) -> None:
        """Until the tab's status line starts with `status` and the JS `predicate` holds."""
        js = (f"() => {{ const s = document.querySelector('#{tab}-status'); "
              f"return !!s && s.innerText.trim().startsWith({status!r}) && ({predicate}); }}")
        self.page.wait_for_function(js, timeout=timeout)

    def slider(self, elem_id: str, value: int) -> None:
        box = self.page.locator(f"#{elem_id} input[type=number]")
        box.fill(str(value))
        box.press("Enter")

    def choose(self, elem_id: str, index: int) -> str:
        """Pick option `index` of a gr.Dropdown; returns its label."""
        box = self.page.locator(f"#{elem_id} input[role=combobox]")
        box.click()
        listbox = box.get_attribute("aria-controls")
        option = self.page.locator(f"#{listbox} [role=option]").nth(index)
        label = option.get_attribute("aria-label") or option.inner_text()
        option.click()
        return label

    def upload(self, elem_id: str, *paths: str) -> None:
        self.page.set_input_files(f"#{elem_id} input[type=file]", list(paths))
        names = [os.path.splitext(os.path.basename(p))[0] for p in paths]  # a list shows "ref1" and ".png" apart
        self.page.wait_for_function(f"() => {{ const t = document.querySelector('#{elem_id}').innerText; "
                                    f"return {names!r}.every(n => t.includes(n)); }}", timeout=30_000)

    def check_images(self, container: str, at_least: int = 1) -> list[dict]:
        """Every model/media <img> in `container` is decoded by the browser and is not blank or flat."""
        imgs = self.page.locator(f"{container} img.ws-img")
        n = imgs.count()
        assert n >= at_least, f"{container}: {n} images, expected at least {at_least}"
        stats = []
        for i in range(n):
            img = imgs.nth(i)
            img.scroll_into_view_if_needed()
            self.page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle(),
                                        timeout=30_000)
            s = img.evaluate(IMAGE_STATS)
            assert s["colours"] > 1 and s["std"] > 2.0, f"{container} image {i} looks blank: {s}"
            stats.append(s)
        return stats

    def digests(self, container: str) -> list[str]:
        return self.page.eval_on_selector_all(f"{container} img.ws-img", "els => els.map(e => e.dataset.digest)")

    def check_video(self, container: str) -> None:
        self.page.wait_for_function(
            f"() => {{ const v = document.querySelector('{container} video'); "
            f"return !!v && v.readyState >= 1 && v.duration > 0; }}", timeout=60_000)


def frames(n):
    return f"document.querySelectorAll('#explore-view .ws-strip figure').length === {n}"


def explore(ui: UI):
    ui.page.fill("#explore-prompt textarea", "a stone corridor lit by torches")
    ui.page.click("#explore-start")
    ui.wait("explore", frames(1))
    ui.page.click("#explore-forward")
    ui.wait("explore", frames(2))
    assert "move forward" in ui.page.inner_text("#explore-view")
    ui.page.fill("#explore-instruction textarea", "walk to the door")
    ui.page.click("#explore-go")
    ui.wait("explore", frames(3))
    ui.slider("explore-auto-n", 2)
    ui.page.click("#explore-auto")
    ui.wait("explore", frames(5))
    ui.check_images("#explore-view", at_least=6)  # the current view + 5 timeline frames
    ui.shot("explore-walk")
    # branch from step 1: a new session with steps 0..1
    label = ui.choose("explore-step", 1)
    assert label.startswith("#1")
    ui.page.click("#explore-branch")
    ui.wait("explore", frames(2), status="Branched")
    ui.page.click("#explore-undo")
    ui.wait("explore", frames(1), status="↩")
    ui.page.click("#explore-turn_left")
    ui.wait("explore", frames(2))
    ui.page.click("#explore-render")
    ui.check_video("#explore-video")
    ui.check_images("#explore-view", at_least=3)
    ui.shot("explore-branch-video")


def story(ui: UI, tmp_path):
    ui.tab("Story")
    ui.page.fill("#story-prompt textarea", "a fox finds a lantern in the snow")
    ui.upload("story-image", noise_png(tmp_path / "fox.png", seed=4))
    ui.page.click("#story-start")
    ui.wait("story", "document.querySelectorAll('#story-view .ws-beat').length === 1")
    ui.page.click("#story-continue")
    ui.wait("story", "document.querySelectorAll('#story-view .ws-beat').length === 2")
    before = ui.digests("#story-view .ws-beat")
    ui.page.click("#story-reroll")  # the selected beat: the last one, re-rolled in place
    ui.wait("story", "document.querySelectorAll('#story-view .ws-beat').length === 2 && "
                     f"!document.querySelector('#story-view img[data-digest=\"{before[-1]}\"]')")
    after = ui.digests("#story-view .ws-beat")
    assert after[0] == before[0] and after[-1] != before[-1]
    assert ui.count("#story-view .ws-premise img.ws-img") == 1  # the picture it started from
    ui.check_images("#story-view", at_least=3)
    ui.shot("story")


def guide(ui: UI):
    ui.tab("Guide")
    ui.page.fill("#guide-question textarea", "How do I make a paper airplane?")
    ui.slider("guide-max-steps", 2)
    ui.page.click("#guide-start")
    ui.wait("guide", "document.querySelectorAll('#guide-view .ws-step img').length >= 1")
    steps = ui.count("#guide-view li.ws-step")
    assert 1 <= steps <= 3  # 1-2 images; text after the last image is one more item
    ui.check_images("#guide-view", at_least=1)
    ui.shot("guide")


def plan(ui: UI, tmp_path):
    ui.tab("Robot plan")
    ui.page.fill("#plan-goal textarea", "put the red cube in the bowl")
    ui.slider("plan-steps", 3)
    ui.upload("plan-scene", noise_png(tmp_path / "scene.png", seed=1))
    ui.page.click("#plan-start")
    ui.wait("plan", "document.querySelectorAll('#plan-view table tr').length === 4")
    assert ui.count("#plan-view .ws-strip figure") == 3
    ui.check_images("#plan-view", at_least=1 + 3 + 3)  # scene, table keyframes, strip
    ui.shot("plan")
    ui.choose("plan-pick", 1)
    # choosing fills the box with that subtask's text (the table's row 2); edit once it is there
    ui.page.wait_for_function("() => document.querySelector('#plan-edit textarea').value.trim() === "
                              "document.querySelectorAll('#plan-view table tr')[2].querySelector('.ws-text')"
                              ".firstChild.textContent.trim()")
    row_text = ("(i => document.querySelectorAll('#plan-view table tr')[i].querySelector('.ws-text')"
                ".firstChild.textContent.trim())")
    kept = ui.page.evaluate(f"{row_text}(1)")
    ui.page.fill("#plan-edit textarea", "grasp the red cube from above")
    ui.page.click("#plan-regenerate")
    # a new plan: step 1 exactly as before, step 2 the edited text, then a regenerated step 3
    ui.wait("plan", f"{row_text}(2) === 'grasp the red cube from above' && {row_text}(1) === {json.dumps(kept)} "
                    "&& document.querySelectorAll('#plan-view table tr').length === 4")
    ui.check_images("#plan-view", at_least=7)
    ui.page.click("#plan-render")
    ui.check_video("#plan-video")
    ui.page.click("#plan-export")
    ui.page.wait_for_function("() => document.querySelector('#plan-json').innerText.includes('\"subtask\"')")
    ui.shot("plan-edited-video-json")


def image(ui: UI, tmp_path):
    ui.tab("Image")
    ui.page.fill("#image-prompt textarea", "a lighthouse at dusk")
    ui.page.get_by_label("16:9").check()
    ui.slider("image-side", 12)
    # streaming shows a progress placeholder while the image decodes; DiDA can finish in under a second, too
    # fast to poll for, so an observer records every placeholder put into the view
    ui.page.evaluate("""() => { window.wsPlaceholderSeen = false;
        new MutationObserver(records => { for (const r of records) for (const n of r.addedNodes)
            if (n.nodeType === 1 && r.target.closest && r.target.closest('#image-view')
                && (n.matches('.ws-placeholder') || n.querySelector('.ws-placeholder')))
              window.wsPlaceholderSeen = true; }).observe(document.body, {childList: true, subtree: true}); }""")
    ui.page.click("#image-generate")
    ui.wait("image", "document.querySelectorAll('#image-view .ws-card img.ws-img').length === 1")
    assert ui.page.evaluate("() => window.wsPlaceholderSeen"), "no progress placeholder while the image decoded"
    ui.shot("image-generated")
    (s,) = ui.check_images("#image-view")
    assert s["w"] > s["h"]  # 16:9
    ui.slider("image-side", 4)
    ui.upload("image-refs", noise_png(tmp_path / "ref1.png", seed=2), noise_png(tmp_path / "ref2.png", seed=3))
    ui.page.fill("#image-prompt textarea", "make it night")
    ui.page.click("#image-generate")
    ui.wait("image", "document.querySelectorAll('#image-view .ws-card .ws-ref').length === 2")
    ui.check_images("#image-view", at_least=3)
    ui.shot("image-edit")


def session_labels(ui: UI) -> list[str]:
    return ui.page.locator("#sessions-list label").all_inner_texts()


def test_every_tab_end_to_end_and_sessions_persist(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    shots = tmp_path / "shots"
    shots.mkdir()
    server = AppServer(tmp_path / "data", image_size=None).start()  # the demo's own image size
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            page_errors = []
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(server.url)
            page.wait_for_selector("#explore-view")
            ui = UI(page, str(shots))
            ui.shot("first-visit")
            try:
                explore(ui)
                story(ui, tmp_path)
                guide(ui)
                plan(ui, tmp_path)
                image(ui, tmp_path)
            except Exception:
                ui.shot("FAILED")
                raise

            page.click("#sessions-refresh")
            page.wait_for_function("() => document.querySelectorAll('#sessions-list label').length === 8")
            shown = {tab: ui.digests(f"#{tab}-view") for tab in ("explore", "story", "guide", "plan", "image")}

            def same_sessions_shown(when: str):
                page.wait_for_selector("#explore-view .ws-current img.ws-img", timeout=60_000)
                page.wait_for_function("() => document.querySelectorAll('#sessions-list label').length === 8")
                for tab, digests in shown.items():
                    ui.tab({"explore": "Explore", "story": "Story", "guide": "Guide", "plan": "Robot plan",
                            "image": "Image"}[tab])
                    try:
                        page.wait_for_function(f"() => document.querySelectorAll('#{tab}-view img.ws-img').length "
                                               f"=== {len(digests)}")
                    except Exception:
                        ui.shot(f"FAILED-{tab}-after-{when}")
                        raise AssertionError(f"{tab} after {when}: {ui.digests(f'#{tab}-view')} != {digests}")
                    assert ui.digests(f"#{tab}-view") == digests, f"{tab} after {when}"
                ui.tab("Robot plan")
                ui.check_images("#plan-view", at_least=7)
                ui.tab("Explore")
                ui.check_images("#explore-view", at_least=3)
                ui.shot(f"after-{when}")

            page.reload()
            same_sessions_shown("reload")

            server.kill()
            server = AppServer(tmp_path / "data", port=server.port, image_size=None).start()
            page.reload()
            same_sessions_shown("restart")

            # close the tab mid-generation: the job goes on, and a new page re-attaches to it while it
            # runs (bigger images and more steps than elsewhere, so it runs for several seconds)
            page.locator("#explore-options").get_by_text("Options").click()
            page.locator("#explore-size textarea, #explore-size input").first.fill("16x16")
            page.fill("#explore-prompt textarea", "a long walk through a forest")
            page.click("#explore-start")
            ui.wait("explore", frames(1))
            ui.slider("explore-auto-n", 16)
            page.click("#explore-auto")
            ui.wait("explore", "true", status="Generating")
            page.close()
            page = context.new_page()
            page.goto(server.url)
            ui.page = page
            ui.wait("explore", "true", status="Generating")  # attached to the running job
            ui.shot("reattached-running")
            # 16 steps at 16x16 tokens: allow a slow, shared CPU (it overran 120 s once inside the full suite)
            ui.wait("explore", frames(1 + 16), timeout=3 * TIMEOUT)
            ui.check_images("#explore-view", at_least=18)
            ui.shot("reattached-done")

            # the Sessions panel: open a session in its tab, delete one
            page.locator("#sessions-list label", has_text="a fox finds a lantern").click()
            page.click("#sessions-open")
            ui.wait("story", "document.querySelectorAll('#story-view .ws-beat').length === 2", status="Opened")
            assert page.get_by_role("tab", name="Story").get_attribute("aria-selected") == "true"
            page.locator("#sessions-list label", has_text="paper airplane").click()
            assert "/media/export/" in page.inner_html("#sessions-export")
            page.click("#sessions-delete")
            page.wait_for_function("() => document.querySelectorAll('#sessions-list label').length === 8")
            ui.tab("Guide")
            page.wait_for_function("() => !!document.querySelector('#guide-view .ws-empty')")
            ui.shot("sessions-after-delete")

            # another browser is another user: an empty list, and 404 for this one's media
            other = browser.new_context()
            other_page = other.new_page()
            other_page.goto(server.url)
            other_page.wait_for_selector("#explore-view .ws-empty")
            assert other_page.locator("#sessions-list label").count() == 0
            mine = shown["plan"][0]
            assert context.request.get(f"{server.url}/media/image/{mine}.png").status == 200
            assert other.request.get(f"{server.url}/media/image/{mine}.png").status == 404
            assert not page_errors, page_errors
            browser.close()
    finally:
        server.kill()
        os.makedirs(SHOTS, exist_ok=True)
        for f in sorted(os.listdir(shots)):
            shutil.copy(os.path.join(shots, f), SHOTS)
