"""Shared test helpers (a package: ``from helpers import ...``; ``tests/`` is on ``sys.path``
through pyproject's ``pythonpath``). Fixtures stay in ``conftest.py``.

* ``DEVICES``: ``"cpu"`` always, plus ``"cuda"`` (marked ``cuda``) that skips itself when there
  is no GPU or the extension was built without CUDA. Use ``@pytest.mark.parametrize("device",
  DEVICES)``.
* ``TOLERANCES`` / ``assert_close``: one table of per-dtype tolerances for every op test;
  ``assert_as_accurate_as``: a low-precision kernel's error within a factor of PyTorch's own.
* ``make_mask`` / ``MASK_KINDS``: random ``[B, T]`` validity masks of every pattern the ops
  must handle (left / right padding, holes, all-masked rows, ragged spans).
* ``lm_head_inputs``: hidden states, an LM-head weight / bias and tokens for the LM-head ops.
* ``helpers.models``: tiny models and left-padded prompts.
"""

from helpers.asserts import LOW_PRECISION, TOLERANCES, assert_as_accurate_as, assert_close, runs_at_thread_counts
from helpers.devices import CUDA_AVAILABLE, DEVICES, devices
from helpers.inputs import lm_head_inputs
from helpers.masks import MASK_KINDS, make_mask

__all__ = ["CUDA_AVAILABLE", "DEVICES", "devices", "LOW_PRECISION", "TOLERANCES", "assert_close",
           "assert_as_accurate_as", "lm_head_inputs", "MASK_KINDS", "make_mask", "runs_at_thread_counts"]
