"""generate's argument checks and per-request random streams."""

from __future__ import annotations

import pytest
import torch

from fastrlhf.generation import generate

from helpers.models import left_padded, tiny_model


def test_fractional_max_new_tokens_are_refused():
    model = tiny_model()
    ids, mask = left_padded(2, 5, 97, [5, 3])
    with pytest.raises(TypeError, match="max_new_tokens must hold integers"):
        generate(model, ids, mask, max_new_tokens=torch.tensor([2.5, 3.0]))
    with pytest.raises(TypeError, match="max_new_tokens must be an int"):
        generate(model, ids, mask, max_new_tokens=[2.5, 3])
    with pytest.raises(TypeError, match="max_new_tokens must be an int"):
        generate(model, ids, mask, max_new_tokens=2.0)


@pytest.mark.parametrize("stop", [97, [3, 500], [[1], [-2]]])
def test_stop_ids_outside_the_vocabulary_are_refused(stop):
    model = tiny_model()
    ids, mask = left_padded(2, 5, 97, [5, 3])
    with pytest.raises(ValueError, match="outside the vocabulary \\[0, 97\\)"):
        generate(model, ids, mask, max_new_tokens=2, stop_token_ids=stop)


def test_a_models_eos_outside_the_vocabulary_is_named():
    model = tiny_model(eos_token_id=400)
    ids, mask = left_padded(1, 4, 97, [4])
    with pytest.raises(ValueError, match="the model's eos_token_id"):
        generate(model, ids, mask, max_new_tokens=2)


def test_request_ids_make_a_request_reproducible_at_any_batch_position():
    model = tiny_model()
    ids, mask = left_padded(3, 6, 97, [6, 4, 5], seed=3)
    kw = dict(max_new_tokens=6, temperature=1.0, seed=11, stop_token_ids=[])
    out = generate(model, ids, mask, request_ids=[10, 11, 12], **kw)
    order = torch.tensor([2, 0, 1])  # the same requests, shuffled
    shuffled = generate(model, ids[order], mask[order], request_ids=[12, 10, 11], **kw)
    assert torch.equal(shuffled.responses, out.responses[order])
    alone = generate(model, ids[1:2], mask[1:2], request_ids=[11], **kw)
    assert torch.equal(alone.responses[0], out.responses[1])
    # by default the stream is the row index: the same prompt elsewhere draws other tokens
    default = generate(model, ids[order], mask[order], **kw)
    assert not torch.equal(default.responses, out.responses[order])


def test_request_ids_are_checked():
    model = tiny_model()
    ids, mask = left_padded(2, 5, 97, [5, 3])
    with pytest.raises(ValueError, match="request_ids must be an int or one per row"):
        generate(model, ids, mask, max_new_tokens=2, request_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="request_ids must be >= 0"):
        generate(model, ids, mask, max_new_tokens=2, request_ids=[1, -2])
