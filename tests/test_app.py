"""`python app.py`: its settings (flags win over environment variables, which win over the defaults),
refusal of bad values, and the server it starts (the UI at /, an identity cookie, 404 for media
without one). The UI itself is tested in tests/test_ui_*.py."""

import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from app.server import Settings, parse_args
from ui_helpers import AppServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_without_arguments():
    s = parse_args([], environ={})
    assert s == Settings()
    assert (s.host, s.port, s.data_dir, s.device) == ("127.0.0.1", 7860, "data", "cpu")
    assert s.checkpoint is None and s.database_url is None and s.redis_url is None


def test_environment_then_flags():
    env = {"WORLDSIM_HOST": "0.0.0.0", "WORLDSIM_PORT": "9000", "WORLDSIM_CHECKPOINT": "/ckpt",
           "DATABASE_URL": "postgresql://db/ws", "REDIS_URL": "redis://r:6379/0", "WORLDSIM_DEVICE": "cuda",
           "WORLDSIM_DATA_DIR": "/srv/ws", "WORLDSIM_IMAGE_SIZE": "8x8"}
    s = parse_args([], environ=env)
    assert (s.host, s.port, s.checkpoint, s.database_url, s.redis_url, s.device, s.data_dir, s.image_size) == (
        "0.0.0.0", 9000, "/ckpt", "postgresql://db/ws", "redis://r:6379/0", "cuda", "/srv/ws", "8x8")
    s = parse_args(["--host", "::1", "--port", "7000", "--checkpoint", "/other", "--database-url", "sqlite:///x.db",
                    "--redis-url", "redis://other/1", "--device", "cpu", "--data-dir", "d", "--image-size", "auto"],
                   environ=env)
    assert (s.host, s.port, s.checkpoint, s.database_url, s.redis_url, s.device, s.data_dir, s.image_size) == (
        "::1", 7000, "/other", "sqlite:///x.db", "redis://other/1", "cpu", "d", "auto")


@pytest.mark.parametrize("argv, needle", [(["--image-size", "0x4"], "--image-size"),
                                          (["--image-size", "4x5x6"], "--image-size"),
                                          (["--port", "0"], "--port"), (["--concurrency", "0"], "--concurrency"),
                                          (["--workers", "-1"], "--workers"), (["--port", "eighty"], "--port")])
def test_bad_settings_are_refused(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv, environ={})
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_help_runs_without_loading_a_model():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "app.py"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--database-url" in proc.stdout and "--redis-url" in proc.stdout


def test_serves_the_ui_with_an_identity_cookie(tmp_path):
    server = AppServer(tmp_path / "data").start()
    try:
        with urllib.request.urlopen(server.url + "/") as r:
            page = r.read().decode()
            cookie = r.headers["set-cookie"]
        assert "Worldsim" in page
        assert cookie.startswith("worldsim_uid=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
        with pytest.raises(urllib.error.HTTPError) as e:  # no identity: no media, like a missing file
            urllib.request.urlopen(server.url + "/media/image/" + "a" * 64 + ".png")
        assert e.value.code == 404
        assert os.path.exists(tmp_path / "data" / "worldsim.db")  # SQLite in the data directory
        assert oct(os.stat(tmp_path / "data" / "ui-secret").st_mode & 0o777) == "0o600"
    finally:
        server.kill()
