"""The devices every op test runs on: ``"cpu"``, plus ``"cuda"`` (marked ``cuda``), which skips
itself without a GPU or a CUDA build of the extension."""

from __future__ import annotations

import pytest
import torch

import fastrlhf

# ---- devices ------------------------------------------------------------------------------

CUDA_AVAILABLE = bool(torch.cuda.is_available() and fastrlhf.build_info().get("with_cuda", False))

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA GPU and a CUDA build of fastrlhf._C"),
        ],
    ),
]
devices = DEVICES  # the same list under the name used in the test plan
