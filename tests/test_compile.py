"""The optional torch.compile'd one-token decode step gives the eager step's logits, full and narrowed to an id
range (slow: ~30 s compile)."""

import pytest
import torch

from model.generate import compile_decode


@pytest.mark.slow
def test_compiled_decode_step_matches_eager(debug_model):
    torch.manual_seed(1)
    prompt = torch.randint(0, debug_model.config.vocab_size, (1, 12))
    step = compile_decode(debug_model)
    eager_cache, compiled_cache = debug_model.new_cache(1, 64), debug_model.new_cache(1, 64)
    with torch.no_grad():
        debug_model(prompt, cache=eager_cache)
        debug_model(prompt, cache=compiled_cache)
        token = torch.tensor([[7]])
        for _ in range(6):  # several lengths: the dynamic-shape graph must serve them all
            eager = debug_model(token, cache=eager_cache)
            compiled = step(token, compiled_cache)
            torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
            token = eager[:, -1].argmax(-1, keepdim=True)
    assert compiled_cache.length == eager_cache.length == 18
    lo, hi = debug_model.config.num_text_tokens, debug_model.config.vocab_size  # a narrow head, as in a grid
    with torch.no_grad():
        for _ in range(3):
            eager = debug_model(token, cache=eager_cache)
            compiled = step(token, compiled_cache, (lo, hi))
            torch.testing.assert_close(compiled, eager[..., lo:hi], atol=1e-5, rtol=1e-5)
            token = eager[:, -1].argmax(-1, keepdim=True)
