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
