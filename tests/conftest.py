"""Shared fixtures. Everything runs on the CPU by default; `gpu` tests skip without CUDA."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bpe():
    """The debug preset's byte-level BPE (512 text ids, 256 codes), trained on the built-in corpus."""
    from model.text_tokenizer import BPETokenizer, builtin_corpus

    return BPETokenizer.train(builtin_corpus(), 512, 256)


@pytest.fixture
def debug_model(bpe):
    """A randomly initialised debug-preset decoder in eval mode, with the BPE vocabulary attached."""
    from model.config import preset
    from model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(preset("debug")).eval()
    model.vocab, model.tokenizer = bpe.vocab, bpe
    return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Two random debug-preset checkpoints with their BPE and an IBQ: "good" (matching codebook) and
    "bad" (an IBQ with half the codebook), for train.evaluate and train.self_distill."""
    import dataclasses

    from model.checkpoint import save_pretrained
    from model.config import preset
    from model.text_tokenizer import BPETokenizer, builtin_corpus
    from model.transformer import Transformer
    from model.vision_tokenizer import IBQ, ibq_preset, save_ibq

    root = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    cfg = preset("debug")
    tok = BPETokenizer.train(builtin_corpus(), cfg.num_text_tokens, cfg.codebook_size)
    model = Transformer(cfg).eval()
    model.vocab, model.tokenizer = tok.vocab, tok
    good, bad = root / "good", root / "bad"
    for d, codebook in ((good, cfg.codebook_size), (bad, cfg.codebook_size // 2)):
        save_pretrained(model, str(d))
        save_ibq(IBQ(dataclasses.replace(ibq_preset("debug"), codebook_size=codebook)), str(d / "vision_tokenizer"))
    return {"good": str(good), "bad": str(bad)}


# ---- engine tests (tests/test_engine_*.py): real servers, a shared debug runtime --------------------
@pytest.fixture(scope="session")
def redis_service():
    """URL of a real Redis shared by the test session: CI's (WORLDSIM_TEST_REDIS_URL) or our own
    redis-server. Tests isolate themselves by key prefix (Hot(url, prefix=...))."""
    import os

    from engine_helpers import REDIS_BIN, RedisServer

    url = os.environ.get("WORLDSIM_TEST_REDIS_URL")
    if url:
        yield url
        return
    if REDIS_BIN is None:
        pytest.skip("no Redis: set WORLDSIM_TEST_REDIS_URL or install redis-server")
    server = RedisServer()
    yield server.url
    server.stop()


@pytest.fixture
def private_redis():
    """A redis-server owned by one test (to kill or flush it); skipped without the binary."""
    from engine_helpers import REDIS_BIN, RedisServer

    if REDIS_BIN is None:
        pytest.skip("no redis-server binary to start a private Redis")
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_service():
    """Admin URL of a real PostgreSQL: CI's (WORLDSIM_TEST_DATABASE_URL) or a cluster we start."""
    import os

    from engine_helpers import PostgresServer, pg_bin

    url = os.environ.get("WORLDSIM_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if pg_bin() is None:
        pytest.skip("no PostgreSQL: set WORLDSIM_TEST_DATABASE_URL or install postgresql")
    server = PostgresServer()
    yield server.url
    server.stop()


@pytest.fixture
def pg_url(postgres_service):
    """A fresh, empty PostgreSQL database for one test."""
    from engine_helpers import create_database, drop_database

    url = create_database(postgres_service)
    yield url
    drop_database(postgres_service, url)


@pytest.fixture(scope="session")
def engine_runtime():
    """One debug-preset Runtime (random weights) shared by the engine tests."""
    from worldsim.runtime import Runtime

    return Runtime.debug()


@pytest.fixture
def one_torch_thread():
    """Tiny models decode many times faster on one thread on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def make_engine(engine_runtime, tmp_path):
    """make(database_url=None, redis_url=None, workers=1, runtime=None, prefix=None) -> Engine, closed at
    teardown. Defaults: a SQLite file in tmp_path, no Redis, the shared debug runtime, and one Redis key
    prefix per test (engines of one test share it, other tests never see it)."""
    import uuid

    from worldsim.engine import Engine
    from worldsim.hot import Hot
    from worldsim.store import Store

    made, test_prefix = [], f"wstest-{uuid.uuid4().hex[:12]}:"

    def make(database_url=None, redis_url=None, *, workers=1, runtime=None, prefix=None):
        url = database_url or f"sqlite:///{tmp_path}/worldsim.db"
        hot = Hot(redis_url, prefix=prefix or test_prefix)
        engine = Engine(Store(url), hot, runtime if runtime is not None else engine_runtime, workers=workers)
        made.append(engine)
        return engine

    yield make
    for engine in reversed(made):
        engine.close()
