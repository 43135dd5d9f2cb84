"""The app driven through gradio_client, as API users drive it: two users in parallel, each with its
own identity cookie, can neither list, read nor fetch the media of the other's sessions; input is
refused before it is queued; generation streams, and a job whose client went away goes on and can
be re-attached. Runs the real `python app.py` (the embedded demo model, 4x4-token images)."""

from __future__ import annotations

import concurrent.futures
import io
import json
import secrets

import httpx
import pytest
from PIL import Image

from ui_helpers import AppServer

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

EMPTY = {"session": None, "job": None}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = AppServer(tmp_path_factory.mktemp("ui-api")).start()
    yield app
    app.kill()


def identity() -> str:
    return secrets.token_urlsafe(32)


def client(server, token: str) -> Client:
    return Client(server.url, headers={"Cookie": f"worldsim_uid={token}"}, verbose=False,
                  download_files=False)


def http(server, token: str | None) -> httpx.Client:
    return httpx.Client(base_url=server.url, cookies={"worldsim_uid": token} if token else None, timeout=30)


def png_file(tmp_path, name: str, seed: int) -> str:
    import random

    rng = random.Random(seed)
    im = Image.new("RGB", (48, 32))
    im.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(48 * 32)])
    path = tmp_path / name
    im.save(path)
    return str(path)


def image_urls(data: dict) -> list[str]:
    urls = [u for t in data["turns"] for u in t["input"]["images"]]
    return urls + [s["url"] for t in data["turns"] for s in t["output"] if s["type"] == "image"]


def make_sessions(server, token: str, tmp_path, who: str, seed: int) -> dict:
    """One user's work: an explore walk, a robot plan on an uploaded scene, a t2i image; a video.
    Images are stored by content, so users with different seeds make different images (with equal
    seeds the random-weight model may draw the same pixels, which both then own)."""
    c = client(server, token)
    view, status, current, data, _ = c.predict(EMPTY, f"{who}'s corridor", None, "4x4", seed,
                                               api_name="/explore_start")
    assert status.startswith("✓"), status
    view, status, current, data, _ = c.predict(current, "turn left", api_name="/explore_step")
    assert data["num_turns"] == 2 and status.startswith("✓")
    explore = data
    video_html, _ = c.predict(current, api_name="/explore_render")
    scene = png_file(tmp_path, f"{who}-scene.png", seed=len(who))
    _, status, plan_current, plan, _ = c.predict(EMPTY, "Franka Panda", f"{who} stacks cubes", 2, handle_file(scene),
                                                 "4x4", seed, api_name="/plan_start")
    assert status.startswith("✓") and len(plan["plan"]) == 2
    _, status, _, image = c.predict(EMPTY, f"{who}'s red cube", "16:9", [], 4, seed, api_name="/image_generate")
    assert status.startswith("✓")
    assert image["settings"]["image_size"] == [3, 5]  # 16:9 scaled to a 4x4-token area
    return {"explore": explore, "plan": plan, "image": image, "video": video_html, "current": current}


def test_two_users_in_parallel_cannot_see_each_other(server, tmp_path):
    tokens = {"alice": identity(), "bob": identity()}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {who: pool.submit(make_sessions, server, tok, tmp_path, who, seed)
                   for seed, (who, tok) in enumerate(tokens.items(), start=1)}
        made = {who: f.result(timeout=600) for who, f in futures.items()}

    for me, other in (("alice", "bob"), ("bob", "alice")):
        c = client(server, tokens[me])
        # list: exactly my three sessions
        _, listed = c.predict(api_name="/sessions_list")
        mine = {made[me][k]["session_id"] for k in ("explore", "plan", "image")}
        theirs = {made[other][k]["session_id"] for k in ("explore", "plan", "image")}
        assert {s["session_id"] for s in listed} == mine
        assert all(me in s["title"] for s in listed)
        # read: opening, attaching, stepping, exporting the other's session all fail or show nothing
        their_explore = made[other]["explore"]["session_id"]
        with pytest.raises(Exception, match="Not found"):
            c.predict(their_explore, api_name="/session_open")
        with pytest.raises(Exception, match="Not found"):
            c.predict(their_explore, "json", api_name="/session_export")
        view, _, current, data, _ = c.predict({"session": their_explore, "job": None}, api_name="/explore_attach")
        assert data is None and current["session"] is None and their_explore not in view
        with pytest.raises(Exception, match="Start a world first"):
            c.predict({"session": their_explore, "job": None}, "turn left", api_name="/explore_step")
        with pytest.raises(Exception, match="Not found"):
            c.predict(their_explore, api_name="/session_delete")
        # my own session opens
        opened = c.predict(made[me]["explore"]["session_id"], api_name="/session_open")
        assert made[me]["explore"]["session_id"] in json.dumps(opened)

        # media: mine is served, theirs is 404 exactly like a missing one
        with http(server, tokens[me]) as web:
            for url in image_urls(made[me]["explore"]) + image_urls(made[me]["plan"]) + image_urls(made[me]["image"]):
                r = web.get(url)
                assert r.status_code == 200 and r.headers["content-type"] == "image/png"
                Image.open(io.BytesIO(r.content)).verify()
            mine_urls = {u for k in ("explore", "plan", "image") for u in image_urls(made[me][k])}
            theirs_urls = set(image_urls(made[other]["explore"]) + image_urls(made[other]["plan"])) - mine_urls
            assert len(theirs_urls) >= 5  # 2 explore frames, the uploaded scene, 2 keyframes
            for url in theirs_urls:
                assert web.get(url).status_code == 404, url
            assert web.get("/media/image/" + "0" * 64 + ".png").status_code == 404
            for fmt in ("json", "html", "zip"):
                assert web.get(f"/media/export/{made[me]['explore']['session_id']}.{fmt}").status_code == 200
                assert web.get(f"/media/export/{their_explore}.{fmt}").status_code == 404
            assert web.get(f"/media/video/{made[me]['explore']['session_id']}.mp4").status_code == 200
            assert web.get(f"/media/video/{their_explore}.mp4").status_code == 404
            exported = web.get(f"/media/export/{made[me]['plan']['session_id']}.json").json()
            assert exported["plan"] and exported["settings"]["arm"] == "Franka Panda"
        assert theirs.isdisjoint(mine)

    # no identity at all: no media, and the API says what is missing
    with http(server, None) as web:
        url = image_urls(made["alice"]["explore"])[0]
        assert web.get(url).status_code == 404
        assert web.get(f"/media/export/{made['alice']['explore']['session_id']}.json").status_code == 404


def test_input_is_refused_before_it_is_queued(server, tmp_path):
    c = client(server, identity())
    with pytest.raises(Exception, match="prompt: must not be empty"):
        c.predict(EMPTY, "", None, "4x4", 0, api_name="/explore_start")
    with pytest.raises(Exception, match="over the limit of 4,000"):
        c.predict(EMPTY, "x" * 4001, None, "4x4", 0, api_name="/story_start")
    with pytest.raises(Exception, match="image size"):
        c.predict(EMPTY, "a fox", None, "0x4", 0, api_name="/story_start")
    text = tmp_path / "notes.png"
    text.write_bytes(b"this is not an image at all")
    with pytest.raises(Exception, match="not a readable image"):
        c.predict(EMPTY, "", handle_file(str(text)), "4x4", 0, api_name="/explore_start")
    bomb = tmp_path / "bomb.png"
    Image.new("L", (5000, 5000)).save(bomb)  # 25 MP of zeros: a few KB on disk
    assert bomb.stat().st_size < 200_000
    with pytest.raises(Exception, match="pixels is over the limit"):
        c.predict(EMPTY, "Franka Panda", "stack", 2, handle_file(str(bomb)), "4x4", 0, api_name="/plan_start")
    refs = [handle_file(png_file(tmp_path, f"r{i}.png", i)) for i in range(4)]
    with pytest.raises(Exception, match="at most 3"):
        c.predict(EMPTY, "make it night", "1:1", refs, 4, 0, api_name="/image_generate")
    _, listed = c.predict(api_name="/sessions_list")
    assert listed == []  # nothing was created by the refused calls


def test_explore_starts_from_an_uploaded_image(server, tmp_path):
    token = identity()
    c = client(server, token)
    start = png_file(tmp_path, "start.png", seed=9)
    view, status, current, data, _ = c.predict(EMPTY, "", handle_file(start), "4x4", 0, api_name="/explore_start")
    assert status.startswith("✓"), status
    first = data["turns"][0]
    assert first["input"]["text"] == "" and len(first["input"]["images"]) == 1
    assert [s["type"] for s in first["output"]].count("image") == 1
    with http(server, token) as web:
        up = Image.open(io.BytesIO(web.get(first["input"]["images"][0]).content))
    assert up.size == (48, 32)  # the upload as stored, served back to its owner


def test_plan_regenerate_keeps_the_steps_before_the_edit(server, tmp_path):
    c = client(server, identity())
    scene = handle_file(png_file(tmp_path, "regen-scene.png", seed=5))
    _, status, current, plan, _ = c.predict(EMPTY, "Franka Panda", "stack the cubes", 3, scene, "4x4", 0,
                                            api_name="/plan_start")
    assert status.startswith("✓") and len(plan["plan"]) == 3
    _, status, _, edited, _ = c.predict(current, 2, "grasp the red cube from above", api_name="/plan_regenerate")
    assert status.startswith("✓") and "Step 1 is kept as it was." in status and "original is kept" in status
    assert edited["session_id"] != plan["session_id"]
    assert edited["parent"] == {"session_id": plan["session_id"], "seq": -1}
    assert edited["turns"][0]["input"] == plan["turns"][0]["input"]  # the same question and scene
    assert len(edited["plan"]) == 3 and edited["plan"][0] == plan["plan"][0]  # step 1: text and keyframe
    assert edited["plan"][1]["subtask"] == "grasp the red cube from above"
    _, listed = c.predict(api_name="/sessions_list")
    assert {s["session_id"] for s in listed} == {plan["session_id"], edited["session_id"]}


def test_streams_and_reattaches_after_the_client_leaves(server):
    c = client(server, identity())
    _, _, current, data, _ = c.predict(EMPTY, "a long walk", None, "4x4", 0, api_name="/explore_start")
    job = c.submit(current, 4, api_name="/explore_auto")
    seen = None
    for update in job:  # leave as soon as the job id is in `current`
        if update[2] and update[2].get("job"):
            seen = update
            break
    assert seen is not None
    assert seen[1].startswith(("Waiting", "Generating")), seen[1]
    job.cancel()  # the client goes away; the engine job goes on
    attach = c.submit(seen[2], api_name="/explore_attach")
    outputs = list(attach)
    view, status, current, data, _ = outputs[-1]
    assert status.startswith("✓"), status
    assert data["num_turns"] == 1 + 4 and current["job"] is None
