"""Loads the compiled extension ``fastrlhf._C`` once.

``import fastrlhf`` never fails because the extension is missing or broken: every op then runs
its pure-PyTorch reference and a single warning says why. ``build_info()`` tells how the
extension was built.
"""

from __future__ import annotations

import warnings
from typing import Any

_module = None
_error: str | None = None

try:
    import torch  # noqa: F401  (loads libtorch before the extension)

    from fastrlhf import _C as _module  # type: ignore[attr-defined]
except Exception as exc:  # ImportError, OSError (missing .so dependency), undefined symbols
    _error = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "fastrlhf: the compiled extension fastrlhf._C could not be loaded, so every op falls "
        f"back to its (slow) PyTorch reference. Reason: {_error}. Rebuild with "
        "`pip install --no-build-isolation -e .` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )

_build: dict[str, Any] | None = _module.build_info() if _module is not None else None


def extension_available() -> bool:
    """True when ``fastrlhf._C`` loaded and its ops are registered under ``torch.ops.fastrlhf``."""
    return _module is not None


def extension_error() -> str | None:
    """Why the extension failed to load, or None."""
    return _error


def build_info() -> dict[str, Any]:
    """How the extension was built: ``with_cuda``, ``cuda_version``, ``cuda_archs``,
    ``torch_version`` (built against), ``cpu_arch``, ``cpu_features``, ``compiler``.
    Without the extension: ``{"extension": False, "error": ...}``."""
    if _build is None:
        return {"extension": False, "error": _error, "with_cuda": False}
    return {"extension": True, **_build}


def cuda_compiled() -> bool:
    """True when the extension carries CUDA kernels."""
    return _build is not None and bool(_build["with_cuda"])
