"""The package face: build info, the extension loading (and failing to load gracefully), and the
kernel / reference switch (impl=, FASTRLHF_FORCE_REFERENCE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastrlhf
from fastrlhf import _ext
from fastrlhf.ops import _common


def test_build_info():
    info = fastrlhf.build_info()
    for key in ("with_cuda", "torch_version", "cuda_archs", "cpu_features"):
        assert key in info, f"build_info() lacks {key!r}: {info}"
    assert info["extension"] is True
    assert isinstance(info["with_cuda"], bool)
    assert isinstance(info["cpu_features"], list) and all(isinstance(f, str) for f in info["cpu_features"])
    assert isinstance(info["cuda_archs"], str)
    if info["with_cuda"]:
        assert info["cuda_archs"], "a CUDA build must list the archs it was compiled for"
    # the extension must have been built against the torch that runs it (no ABI across versions)
    assert torch.__version__.split("+")[0] == str(info["torch_version"]).split("+")[0]


def test_extension_available():
    assert fastrlhf.extension_available() is True
    assert _ext.extension_error() is None
    for op in ("gae", "discounted_returns", "group_advantages", "whiten", "td_targets", "q_update"):
        assert hasattr(torch.ops.fastrlhf, op), f"torch.ops.fastrlhf.{op} is not registered"


def test_version():
    assert isinstance(fastrlhf.__version__, str) and fastrlhf.__version__.count(".") == 2


_NO_EXTENSION_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    sys.modules["fastrlhf._C"] = None  # makes `from fastrlhf import _C` raise ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import fastrlhf
        import fastrlhf.ops
        from fastrlhf.ops import reference
        g = torch.Generator().manual_seed(0)
        r, v = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
        m = torch.rand(3, 6, generator=g) < 0.7
        adv, ret = fastrlhf.ops.gae(r, v, m, gamma=0.9, lam=0.8)
        ref_adv, ref_ret = reference.gae(r, v, m, gamma=0.9, lam=0.8)
        scores = torch.randn(8, generator=g)
        ga = fastrlhf.ops.group_advantages(scores, 4)
        ga_ref = reference.group_advantages(scores, 4)
        x = torch.randn(5, generator=g, requires_grad=True)
        fastrlhf.ops.whiten(x).sum().backward()
        try:
            fastrlhf.ops.gae(r, v, gamma=0.9, impl="kernel")
            kernel_error = None
        except RuntimeError as e:
            kernel_error = str(e)
    ours = [w for w in caught if "fastrlhf" in str(w.message)]
    print(json.dumps(dict(
        n_warnings=len(ours),
        categories=[w.category.__name__ for w in ours],
        message=str(ours[0].message) if ours else "",
        available=fastrlhf.extension_available(),
        build_info=fastrlhf.build_info(),
        gae_equal=bool(torch.equal(adv, ref_adv) and torch.equal(ret, ref_ret)),
        ga_equal=bool(torch.equal(ga, ga_ref)),
        whiten_grad_finite=bool(torch.isfinite(x.grad).all()),
        kernel_error=kernel_error,
    )))
    """
)


def test_import_without_extension_falls_back_to_reference():
    out = subprocess.run([sys.executable, "-c", _NO_EXTENSION_SCRIPT], capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items() if k != "FASTRLHF_FORCE_REFERENCE"})
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n_warnings"] == 1, res
    assert res["categories"] == ["RuntimeWarning"]
    assert "fastrlhf._C" in res["message"] and "reference" in res["message"]
    assert res["available"] is False
    assert res["build_info"]["extension"] is False and res["build_info"]["with_cuda"] is False
    assert res["build_info"]["error"]
    assert res["gae_equal"] and res["ga_equal"] and res["whiten_grad_finite"]
    assert res["kernel_error"] is not None and "extension is not loaded" in res["kernel_error"]
    assert "impl='kernel'" in res["kernel_error"]


def test_force_reference_env(monkeypatch):
    cpu = torch.device("cpu")
    assert _common.use_kernel("gae", "auto", cpu, torch.float32) is True
    assert _common.use_kernel("gae", "kernel", cpu, torch.float32) is True
    assert _common.use_kernel("gae", "reference", cpu, torch.float32) is False
    for off in ("0", ""):
        monkeypatch.setenv("FASTRLHF_FORCE_REFERENCE", off)
        assert _common.use_kernel("gae", "auto", cpu, torch.float32) is True
    monkeypatch.setenv("FASTRLHF_FORCE_REFERENCE", "1")
    assert _common.force_reference() is True
    assert _common.use_kernel("gae", "auto", cpu, torch.float32) is False
    assert _common.use_kernel("gae", "kernel", cpu, torch.float32) is False  # even impl="kernel"
    with pytest.raises(ValueError, match="impl"):  # a bad impl is still an error
        _common.use_kernel("gae", "fast", cpu, torch.float32)


def test_force_reference_env_routes_calls_to_reference(monkeypatch):
    """With the env var set, even impl="kernel" runs the reference (spied), never the op."""
    from fastrlhf.ops import reference

    calls = []
    real = reference.gae

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    def boom(*args, **kwargs):
        raise AssertionError("the kernel ran although FASTRLHF_FORCE_REFERENCE=1")

    monkeypatch.setattr(reference, "gae", spy)
    r, v = torch.randn(2, 4), torch.randn(2, 4)
    fastrlhf.ops.gae(r, v, gamma=0.9, impl="kernel")
    assert calls == []  # without the env var the kernel runs

    monkeypatch.setenv("FASTRLHF_FORCE_REFERENCE", "1")
    monkeypatch.setattr(torch.ops.fastrlhf.gae, "default", boom)
    adv, _ = fastrlhf.ops.gae(r, v, gamma=0.9, impl="kernel")
    assert calls == [1]
    assert torch.equal(adv, real(r, v, gamma=0.9, lam=0.95)[0])


def test_kernel_supports():
    assert _common.kernel_supports(torch.device("cpu"), torch.float16)
    assert not _common.kernel_supports(torch.device("cpu"), torch.int64)
    assert not _common.kernel_supports(torch.device("meta"), torch.float32)
    assert _common.kernel_supports(torch.device("cuda"), torch.float32) == fastrlhf.build_info()["with_cuda"]
    with pytest.raises(RuntimeError, match="no kernel for device meta"):
        _common.use_kernel("whiten", "kernel", torch.device("meta"), torch.float32)
