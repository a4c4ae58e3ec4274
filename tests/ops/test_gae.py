"""fastrlhf.ops.gae / discounted_returns: kernel vs reference, textbook values, equivalence with
the GAE loops of CleanRL and verl, opcheck, torch.compile, determinism and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrlhf
from fastrlhf.ops import GAE, discounted_returns, gae

from helpers import DEVICES, LOW_PRECISION, MASK_KINDS, assert_close, make_mask

GAMMA, LAM = 0.99, 0.95


def make_inputs(B, T, *, dtype=torch.float64, device="cpu", mask_kind="holes", done_p=0.0,
                last_values=False, seed=0):
    """Random gae arguments: rewards/values ~ N(0, 1), a mask of ``mask_kind``, dones with
    probability ``done_p``, optional last_values."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64).to(device, dtype)
    values = torch.randn(B, T, generator=g, dtype=torch.float64).to(device, dtype)
    mask = make_mask(mask_kind, B, T, generator=g, device=device)
    dones = (torch.rand(B, T, generator=g) < done_p).to(device) if done_p > 0 else None
    lv = torch.randn(B, generator=g, dtype=torch.float64).to(device, dtype) if last_values else None
    return dict(rewards=rewards, values=values, mask=mask, dones=dones, last_values=lv)


def sample_inputs(device, dtype):
    """Small inputs covering every combination of optional tensors; feeds the correctness,
    opcheck and torch.compile tests. Yields gae keyword arguments (gamma, lam included)."""
    cases = [
        dict(B=4, T=7, mask_kind="none", done_p=0.0, last_values=False),
        dict(B=4, T=7, mask_kind="holes", done_p=0.3, last_values=True),
        dict(B=3, T=5, mask_kind="left", done_p=0.0, last_values=True),
        dict(B=9, T=13, mask_kind="right", done_p=0.2, last_values=False),
        dict(B=1, T=1, mask_kind="none", done_p=0.0, last_values=True),
    ]
    for i, c in enumerate(cases):
        yield dict(**make_inputs(**c, dtype=dtype, device=device, seed=i), gamma=0.9, lam=0.8)


def kernel_and_reference(inp, **kw):
    return gae(**inp, **kw, impl="kernel"), gae(**inp, **kw, impl="reference")


def to64(inp):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inp.items()}


# ---- kernel vs reference ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_sample_inputs_kernel_matches_reference(device):
    for inp in sample_inputs(device, torch.float64):
        k = gae(**inp, impl="kernel")
        r = gae(**inp, impl="reference")
        assert_close(k.advantages, r.advantages, what="advantages")
        assert_close(k.returns, r.returns, what="returns")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("done_p", [0.0, 0.1])
@pytest.mark.parametrize("last_values", [False, True])
def test_gae_kernel_matches_reference_fp64(device, mask_kind, done_p, last_values):
    inp = make_inputs(6, 50, device=device, mask_kind=mask_kind, done_p=done_p, last_values=last_values)
    k, r = kernel_and_reference(inp, gamma=GAMMA, lam=LAM)
    assert_close(k.advantages, r.advantages, what="advantages")
    assert_close(k.returns, r.returns, what="returns")
    # invalid steps give 0; returns == advantages + values at valid steps
    valid = inp["mask"] if inp["mask"] is not None else torch.ones_like(inp["rewards"], dtype=torch.bool)
    assert (k.advantages[~valid] == 0).all() and (k.returns[~valid] == 0).all()
    assert torch.equal(k.returns[valid], (k.advantages + inp["values"])[valid])
    assert torch.equal(r.returns[valid], (r.advantages + inp["values"])[valid])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("done_p", [0.0, 0.1])
def test_discounted_returns_kernel_matches_reference_fp64(device, mask_kind, done_p):
    inp = make_inputs(6, 50, device=device, mask_kind=mask_kind, done_p=done_p)
    args = (inp["rewards"], inp["mask"], inp["dones"])
    k = discounted_returns(*args, gamma=GAMMA, impl="kernel")
    r = discounted_returns(*args, gamma=GAMMA, impl="reference")
    assert_close(k, r)
    if inp["mask"] is not None:
        assert (k[~inp["mask"]] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,T", [(1, 1), (1, 9), (5, 1), (37, 45), (37, 64), (16, 8)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shapes_kernel_matches_reference(device, B, T, dtype):
    """B=1, T=1, B not a multiple of the 8 interleaved rows (and of the AVX2 lanes), T not a
    multiple of the 8-step AVX2 blocks."""
    for kind, done_p, lv in [("none", 0.0, False), ("holes", 0.1, True), ("all_masked_rows", 0.05, True)]:
        inp = make_inputs(B, T, dtype=dtype, device=device, mask_kind=kind, done_p=done_p, last_values=lv)
        k, r = kernel_and_reference(inp, gamma=GAMMA, lam=LAM)
        assert_close(k.advantages, r.advantages, what=f"advantages ({kind})")
        assert_close(k.returns, r.returns, what=f"returns ({kind})")
        dr_k = discounted_returns(inp["rewards"], inp["mask"], inp["dones"], gamma=GAMMA, impl="kernel")
        dr_r = discounted_returns(inp["rewards"], inp["mask"], inp["dones"], gamma=GAMMA, impl="reference")
        assert_close(dr_k, dr_r, what=f"discounted_returns ({kind})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,T", [(0, 5), (4, 0), (0, 0)])
def test_empty(device, B, T):
    inp = make_inputs(B, T, device=device, mask_kind="holes", done_p=0.5, last_values=True)
    for impl in ("kernel", "reference"):
        adv, ret = gae(**inp, gamma=GAMMA, lam=LAM, impl=impl)
        assert adv.shape == (B, T) and ret.shape == (B, T) and adv.dtype == torch.float64
        dr = discounted_returns(inp["rewards"], inp["mask"], inp["dones"], gamma=GAMMA, impl=impl)
        assert dr.shape == (B, T)


@pytest.mark.parametrize(
    "B,T,mask_kind,done_p,last_values",
    [(3, 20000, "holes", 0.01, True), (7, 8192, "ragged", 0.0, True), (1, 10001, "none", 0.001, False)],
)
def test_long_rows_chunked_cpu_path(B, T, mask_kind, done_p, last_values):
    """B < 8 and T >= 8192 take the chunked CPU path (2048-step chunks stitched by affine maps):
    it must agree with the sequential reference in fp64, and fp32 must stay close."""
    inp = make_inputs(B, T, mask_kind=mask_kind, done_p=done_p, last_values=last_values, seed=B)
    r = gae(**inp, gamma=GAMMA, lam=LAM, impl="reference")
    k = gae(**inp, gamma=GAMMA, lam=LAM, impl="kernel")
    assert_close(k.advantages, r.advantages, rtol=1e-9, atol=1e-9, what="advantages")
    assert_close(k.returns, r.returns, rtol=1e-9, atol=1e-9, what="returns")
    inp32 = {k_: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
             for k_, v in inp.items()}
    k32 = gae(**inp32, gamma=GAMMA, lam=LAM, impl="kernel")
    # long fp32 recurrences accumulate ~T_eff * 6e-8 relative error (T_eff = 1/(1-gamma*lam))
    assert_close(k32.advantages, r.advantages, torch.float32, atol=1e-4, what="fp32 advantages")
    dr_r = discounted_returns(inp["rewards"], inp["mask"], inp["dones"], gamma=GAMMA, impl="reference")
    dr_k = discounted_returns(inp["rewards"], inp["mask"], inp["dones"], gamma=GAMMA, impl="kernel")
    assert_close(dr_k, dr_r, rtol=1e-9, atol=1e-9, what="discounted_returns")


# csrc/kernels/cpu/gae.cpp takes the chunked path for B < kChunkedMaxRows = 8 rows of
# T >= kChunkedMinT = 4 * 2048 steps: 2048-step chunks, each reduced to an affine map (compose in
# csrc/kernels/gae.h), chained right to left into every chunk's carry-in state. Without episode
# ends nothing cuts that chain. A composed map's input coefficients are products of ~2048 factors
# (gamma * lam)^n and gamma^n: with gamma = 0.99, lam = 0.95 they are ~1e-55, so a wrong
# coefficient is invisible; gamma * lam close to 1 keeps them O(0.1 .. 1).
CHUNKED_SHAPES = [(2, 4 * 2048), (3, 10001)]
LONG_DISCOUNTS = [(1.0, 1.0), (0.9999, 0.999)]


def long_row_inputs(B, T, dtype, seed):
    """Rewards, values, a holes mask and last_values, no dones; the last row has a whole masked
    chunk (an identity map) and a masked tail across a chunk boundary (its last_values is carried
    back through it); row 0 has holes on both sides of the first chunk boundaries."""
    inp = make_inputs(B, T, dtype=dtype, mask_kind="holes", done_p=0.0, last_values=True, seed=seed)
    m = inp["mask"]
    m[-1, 2048:2 * 2048] = False
    m[-1, T - 3000:] = False
    m[0, 2047] = m[0, 2048] = m[0, 4095] = m[0, 4096] = False
    return inp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gamma,lam", LONG_DISCOUNTS)
@pytest.mark.parametrize("B,T", CHUNKED_SHAPES)
def test_chunked_long_rows_without_dones(B, T, gamma, lam, dtype):
    """The chunked CPU path (few long rows, no episode ends, holes, last_values) against the
    sequential fp64 reference on the same (rounded) inputs, for gae and discounted_returns."""
    inp = long_row_inputs(B, T, dtype, seed=T)
    assert inp["dones"] is None and not inp["mask"].all()
    k = gae(**inp, gamma=gamma, lam=lam, impl="kernel")
    r = gae(**to64(inp), gamma=gamma, lam=lam, impl="reference")
    dr_k = discounted_returns(inp["rewards"], inp["mask"], gamma=gamma, impl="kernel")
    dr_r = discounted_returns(inp["rewards"].double(), inp["mask"], gamma=gamma, impl="reference")
    assert k.advantages.dtype == dtype and dr_k.dtype == dtype
    # Tolerances relative to the outputs' scale (sums of up to T terms: ~60 .. 150). fp64: the
    # chunked and sequential scans round differently, ~T * 1e-16. fp32: ~T_eff * 6e-8, T_eff = the
    # horizon min(T, 1 / (1 - gamma)) ~ 1e4, gamma itself rounded to fp32 included (measured
    # <= 4e-5 of the scale; a mis-composed chunk map is off by O(0.1) of it).
    rel = 1e-10 if dtype == torch.float64 else 2e-4
    for what, got, want in (("advantages", k.advantages, r.advantages), ("returns", k.returns, r.returns),
                            ("discounted_returns", dr_k, dr_r)):
        assert_close(got, want, torch.float64, rtol=rel, atol=rel * float(want.abs().max()), what=what)
        assert torch.equal(got[~inp["mask"]], torch.zeros_like(got[~inp["mask"]])), what


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_carries_last_values_across_chunks(dtype):
    """gamma = lam = 1, zero rewards and values: every valid step's advantage is exactly
    last_values[b] (delta = nv - v telescopes), carried back through all chunks and holes;
    discounted returns of unit rewards count the valid steps to the end of the row."""
    B, T = 3, 5 * 2048 + 17
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[1, 2048:3 * 2048] = False  # two whole masked chunks
    mask[2, -2500:] = False  # a masked tail longer than a chunk
    zeros = torch.zeros(B, T, dtype=dtype)
    lv = torch.tensor([1.5, -2.0, 0.25], dtype=dtype)
    out = gae(zeros, zeros, mask, last_values=lv, gamma=1.0, lam=1.0, impl="kernel")
    want = torch.where(mask, lv[:, None], torch.zeros((), dtype=dtype))
    assert torch.equal(out.advantages, want) and torch.equal(out.returns, want)
    ones = torch.ones(B, T, dtype=dtype)
    dr = discounted_returns(ones, mask, gamma=1.0, impl="kernel")
    count = mask.flip(1).cumsum(1).flip(1).to(dtype)  # valid steps at or after t: exact integers
    assert torch.equal(dr, torch.where(mask, count, torch.zeros((), dtype=dtype)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("mask_kind", ["none", "holes", "ragged"])
def test_low_precision_vs_fp64_reference(device, dtype, mask_kind):
    """Kernel in fp32/bf16/fp16 vs the fp64 reference on the same (already rounded) inputs.
    B=19 covers the fp32 AVX2 8-row blocks and the scalar tail rows."""
    inp = make_inputs(19, 64, dtype=dtype, device=device, mask_kind=mask_kind, done_p=0.05, last_values=True)
    k = gae(**inp, gamma=GAMMA, lam=LAM, impl="kernel")
    r = gae(**to64(inp), gamma=GAMMA, lam=LAM, impl="reference")
    assert k.advantages.dtype == dtype and k.returns.dtype == dtype
    assert_close(k.advantages, r.advantages, dtype, what="advantages")
    assert_close(k.returns, r.returns, dtype, what="returns")
    dr = discounted_returns(inp["rewards"], inp["mask"], inp["dones"], gamma=GAMMA, impl="kernel")
    dr_ref = discounted_returns(inp["rewards"].double(), inp["mask"], inp["dones"], gamma=GAMMA, impl="reference")
    assert dr.dtype == dtype
    assert_close(dr, dr_ref, dtype, what="discounted_returns")


def test_mixed_dtypes_promote():
    inp = make_inputs(3, 6, last_values=True)
    out = gae(inp["rewards"].float(), inp["values"], inp["mask"], last_values=inp["last_values"].float(),
              gamma=GAMMA, lam=LAM)
    ref = gae(inp["rewards"].float().double(), inp["values"], inp["mask"],
              last_values=inp["last_values"].float().double(), gamma=GAMMA, lam=LAM, impl="reference")
    assert out.advantages.dtype == torch.float64
    assert_close(out.advantages, ref.advantages)


def test_numeric_masks_and_dones_equal_bool():
    inp = make_inputs(4, 9, mask_kind="holes", done_p=0.3)
    base = gae(**inp, gamma=GAMMA, lam=LAM)
    for dt in (torch.int64, torch.uint8, torch.float32):
        other = gae(inp["rewards"], inp["values"], inp["mask"].to(dt), inp["dones"].to(dt), gamma=GAMMA, lam=LAM)
        assert torch.equal(other.advantages, base.advantages)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_invalid_steps_are_transparent(impl):
    """Rewards, values and dones at masked steps are ignored (even NaN)."""
    inp = make_inputs(5, 20, mask_kind="holes", done_p=0.1, last_values=True)
    base = gae(**inp, gamma=GAMMA, lam=LAM, impl=impl)
    invalid = ~inp["mask"]
    poisoned = dict(inp)
    poisoned["rewards"] = inp["rewards"].masked_fill(invalid, float("nan"))
    poisoned["values"] = inp["values"].masked_fill(invalid, float("inf"))
    poisoned["dones"] = inp["dones"] | invalid
    out = gae(**poisoned, gamma=GAMMA, lam=LAM, impl=impl)
    assert torch.equal(out.advantages, base.advantages)
    assert torch.equal(out.returns, base.returns)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_nan_propagates_within_row_and_episode(impl):
    inp = make_inputs(3, 12, mask_kind="none")
    inp["rewards"][1, 5] = float("nan")
    adv, ret = gae(**inp, gamma=GAMMA, lam=LAM, impl=impl)
    assert torch.isnan(adv[1, :6]).all() and torch.isnan(ret[1, :6]).all()
    assert torch.isfinite(adv[1, 6:]).all()
    assert torch.isfinite(adv[[0, 2]]).all()


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("where", ["value", "reward"])
def test_nan_does_not_cross_episode_end(impl, where):
    """dones[t] ends the episode after step t: "no bootstrap and no advantage flows across", so
    a NaN/Inf value or reward in the next episode cannot affect the episode that ended (the
    same choice td_targets documents for terminal rows: next_q "is not read")."""
    for bad in (float("nan"), float("inf")):
        r = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
        v = torch.tensor([[0.5, 1.0, 1.5]], dtype=torch.float64)
        (v if where == "value" else r)[0, 2] = bad
        d = torch.tensor([[False, True, False]])
        adv, ret = gae(r, v, dones=d, gamma=0.9, lam=0.8, impl=impl)
        # step 1: delta = 0 - 1.0 = -1.0 (no bootstrap); step 0: 1 + 0.9 * 1.0 - 0.5 + 0.72 * -1.0
        assert_close(adv[0, :2], torch.tensor([0.68, -1.0], dtype=torch.float64),
                     what=f"{where}[2] = {bad}: advantages before the episode end")
        assert not torch.isfinite(adv[0, 2])
        if where == "reward":
            dr = discounted_returns(r, None, d, gamma=0.9, impl=impl)
            assert_close(dr[0, :2], torch.tensor([1.0, 0.0], dtype=torch.float64),
                         what=f"reward[2] = {bad}: discounted returns before the episode end")


# ---- property-based -----------------------------------------------------------------------


@settings(max_examples=200)
@given(
    B=st.integers(1, 20), T=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
    gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0), mask_kind=st.sampled_from(MASK_KINDS),
    done_p=st.sampled_from([0.0, 0.2, 1.0]), last_values=st.booleans(),
)
def test_property_kernel_matches_reference(B, T, seed, gamma, lam, mask_kind, done_p, last_values):
    inp = make_inputs(B, T, mask_kind=mask_kind, done_p=done_p, last_values=last_values, seed=seed)
    k, r = kernel_and_reference(inp, gamma=gamma, lam=lam)
    assert_close(k.advantages, r.advantages, what="advantages")
    assert_close(k.returns, r.returns, what="returns")
    dk = discounted_returns(inp["rewards"], inp["mask"], inp["dones"], gamma=gamma, impl="kernel")
    dr = discounted_returns(inp["rewards"], inp["mask"], inp["dones"], gamma=gamma, impl="reference")
    assert_close(dk, dr, what="discounted_returns")


@settings(max_examples=200)
@given(
    B=st.integers(1, 20), T=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
    mask_kind=st.sampled_from(MASK_KINDS), done_p=st.sampled_from([0.0, 0.2]),
)
def test_property_fp32_kernel_matches_reference(B, T, seed, mask_kind, done_p):
    """fp32 exercises the AVX2 8-row path (B >= 8) and its scalar head / tail."""
    inp = make_inputs(B, T, dtype=torch.float32, mask_kind=mask_kind, done_p=done_p, last_values=True, seed=seed)
    k, r = kernel_and_reference(inp, gamma=GAMMA, lam=LAM)
    assert_close(k.advantages, r.advantages, what="advantages")
    assert_close(k.returns, r.returns, what="returns")


# ---- textbook values ----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_textbook_gae(device, impl):
    f64 = dict(dtype=torch.float64, device=device)
    r = torch.tensor([[1.0, 0.0, 2.0]], **f64)
    v = torch.tensor([[0.5, 1.0, 1.5]], **f64)
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72

    # No bootstrap (last value 0):
    #   delta_2 = 2 + 0.9*0   - 1.5 = 0.5    A_2 = 0.5
    #   delta_1 = 0 + 0.9*1.5 - 1.0 = 0.35   A_1 = 0.35 + 0.72*0.5  = 0.71
    #   delta_0 = 1 + 0.9*1.0 - 0.5 = 1.4    A_0 = 1.4  + 0.72*0.71 = 1.9112
    #   returns = A + V = [2.4112, 1.71, 2.0]
    adv, ret = gae(r, v, gamma=gamma, lam=lam, impl=impl)
    assert_close(adv, torch.tensor([[1.9112, 0.71, 0.5]], **f64), rtol=1e-12, atol=1e-12)
    assert_close(ret, torch.tensor([[2.4112, 1.71, 2.0]], **f64), rtol=1e-12, atol=1e-12)

    # Bootstrap last_values = 2.0:
    #   delta_2 = 2 + 0.9*2.0 - 1.5 = 2.3    A_2 = 2.3
    #   A_1 = 0.35 + 0.72*2.3   = 2.006
    #   A_0 = 1.4  + 0.72*2.006 = 2.84432
    lv = torch.tensor([2.0], **f64)
    adv, _ = gae(r, v, gamma=gamma, lam=lam, last_values=lv, impl=impl)
    assert_close(adv, torch.tensor([[2.84432, 2.006, 2.3]], **f64), rtol=1e-12, atol=1e-12)

    # Episode ends after step 1 (dones[1]), last_values = 2.0:
    #   A_2 = 2.3 (new episode, bootstraps from last_values)
    #   delta_1 = 0 - 1.0 = -1.0 (no bootstrap)   A_1 = -1.0 (nothing flows across)
    #   A_0 = 1.4 + 0.72*(-1.0) = 0.68
    d = torch.tensor([[False, True, False]], device=device)
    adv, _ = gae(r, v, dones=d, gamma=gamma, lam=lam, last_values=lv, impl=impl)
    assert_close(adv, torch.tensor([[0.68, -1.0, 2.3]], **f64), rtol=1e-12, atol=1e-12)

    # Step 1 masked out (transparent), no bootstrap:
    #   A_2 = 0.5; step 0 bootstraps from V_2 = 1.5 and A_2:
    #   delta_0 = 1 + 0.9*1.5 - 0.5 = 1.85   A_0 = 1.85 + 0.72*0.5 = 2.21
    m = torch.tensor([[True, False, True]], device=device)
    adv, ret = gae(r, v, m, gamma=gamma, lam=lam, impl=impl)
    assert_close(adv, torch.tensor([[2.21, 0.0, 0.5]], **f64), rtol=1e-12, atol=1e-12)
    assert_close(ret, torch.tensor([[2.71, 0.0, 2.0]], **f64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_textbook_discounted_returns(device, impl):
    f64 = dict(dtype=torch.float64, device=device)
    r = torch.tensor([[1.0, 0.0, 2.0], [1.0, 5.0, 2.0]], **f64)
    # gamma = 0.9: R_2 = 2, R_1 = 0 + 0.9*2 = 1.8, R_0 = 1 + 0.9*1.8 = 2.62
    # row 1 with step 1 masked: R_2 = 2, R_1 = 0 (masked), R_0 = 1 + 0.9*2 = 2.8
    m = torch.tensor([[True, True, True], [True, False, True]], device=device)
    out = discounted_returns(r, m, gamma=0.9, impl=impl)
    assert_close(out, torch.tensor([[2.62, 1.8, 2.0], [2.8, 0.0, 2.0]], **f64), rtol=1e-12, atol=1e-12)
    # episode ends after step 1 of row 0: R_1 = 0, R_0 = 1 + 0.9*0 = 1
    d = torch.tensor([[False, True, False], [False, False, False]], device=device)
    out = discounted_returns(r, None, d, gamma=0.9, impl=impl)
    assert_close(out, torch.tensor([[1.0, 0.0, 2.0], [1.0 + 0.9 * 5.0 + 0.81 * 2.0, 5.0 + 1.8, 2.0]], **f64),
                 rtol=1e-12, atol=1e-12)


# ---- equivalence with popular trainers' loops ---------------------------------------------


def cleanrl_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda):
    """CleanRL ppo.py, verbatim up to tensor creation: [T, N] buffers, dones[t] = obs t starts a
    new episode, next_value / next_done for the step after the buffer."""
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            nextnonterminal = 1.0 - next_done
            nextvalues = next_value
        else:
            nextnonterminal = 1.0 - dones[t + 1]
            nextvalues = values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
    returns = advantages + values
    return advantages, returns


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("T,N", [(16, 5), (128, 9)])
def test_matches_cleanrl_loop(impl, T, N):
    g = torch.Generator().manual_seed(T + N)
    rewards = torch.randn(T, N, generator=g, dtype=torch.float64)
    values = torch.randn(T, N, generator=g, dtype=torch.float64)
    dones = (torch.rand(T, N, generator=g) < 0.15).double()
    next_value = torch.randn(1, N, generator=g, dtype=torch.float64)  # critic output (1, N)
    next_done = (torch.rand(N, generator=g) < 0.5).double()
    adv_c, ret_c = cleanrl_gae(rewards, values, dones, next_value.reshape(-1), next_done, 0.99, 0.95)

    # the mapping documented in fastrlhf/ops/gae.py
    ends = torch.cat([dones[1:], next_done[None]]).T  # [N, T]
    adv, ret = gae(rewards.T, values.T, dones=ends, gamma=0.99, lam=0.95,
                   last_values=next_value.flatten(), impl=impl)
    assert_close(adv.T, adv_c, what="advantages")
    assert_close(ret.T, ret_c, what="returns")


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """verl compute_gae_advantage_return (before whitening): values and advantages are carried
    through masked positions."""
    nextvalues = 0
    lastgaelam = 0
    advantages_reversed = []
    gen_len = token_level_rewards.shape[-1]
    for t in reversed(range(gen_len)):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages, returns


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("mask_kind", ["none", "left", "right", "holes", "ragged"])
def test_matches_verl_masked_loop(impl, mask_kind):
    inp = make_inputs(7, 30, mask_kind=mask_kind, seed=3)
    mask = inp["mask"] if inp["mask"] is not None else torch.ones(7, 30, dtype=torch.bool)
    adv_v, ret_v = verl_gae(inp["rewards"], inp["values"], mask.double(), 1.0, 0.95)
    adv, ret = gae(inp["rewards"], inp["values"], inp["mask"], gamma=1.0, lam=0.95, impl=impl)
    assert_close(adv[mask], adv_v[mask], what="advantages at valid steps")
    assert_close(ret[mask], ret_v[mask], what="returns at valid steps")
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


# ---- determinism --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "B,T,dtype",
    [(37, 8192, torch.float32), (37, 300, torch.float64), (3, 20000, torch.float32), (5, 9000, torch.float64)],
)
def test_bitwise_deterministic_across_calls_and_threads(B, T, dtype):
    """Many rows (AVX2 / interleaved paths, split across threads at row granularity) and few long
    rows (chunked path): identical bits run to run and for 1 vs 2 threads."""
    inp = make_inputs(B, T, dtype=dtype, mask_kind="holes", done_p=0.01, last_values=True, seed=7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = gae(**inp, gamma=GAMMA, lam=LAM, impl="kernel")
        b = gae(**inp, gamma=GAMMA, lam=LAM, impl="kernel")
        d2 = discounted_returns(inp["rewards"], inp["mask"], inp["dones"], gamma=GAMMA, impl="kernel")
        torch.set_num_threads(1)
        c = gae(**inp, gamma=GAMMA, lam=LAM, impl="kernel")
        d1 = discounted_returns(inp["rewards"], inp["mask"], inp["dones"], gamma=GAMMA, impl="kernel")
    finally:
        torch.set_num_threads(before)
    for x in (b, c):
        assert torch.equal(x.advantages, a.advantages) and torch.equal(x.returns, a.returns)
    assert torch.equal(d1, d2)


# ---- opcheck and torch.compile ------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_gae(device):
    for inp in sample_inputs(device, torch.float64):
        args = (inp["rewards"], inp["values"], inp["mask"], inp["dones"], inp["last_values"],
                inp["gamma"], inp["lam"])
        torch.library.opcheck(torch.ops.fastrlhf.gae.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_discounted_returns(device):
    for inp in list(sample_inputs(device, torch.float32))[:3]:
        args = (inp["rewards"], inp["mask"], inp["dones"], inp["gamma"])
        torch.library.opcheck(torch.ops.fastrlhf.discounted_returns.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def f(rewards, values, mask, dones, last_values):
        adv, ret = gae(rewards, values, mask, dones, gamma=0.9, lam=0.8, last_values=last_values)
        dr = discounted_returns(rewards, mask, dones, gamma=0.9)
        return adv * 2.0, ret, dr

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inp = list(sample_inputs(device, torch.float32))[1]
    args = (inp["rewards"], inp["values"], inp["mask"], inp["dones"], inp["last_values"])
    for got, want in zip(compiled(*args), f(*args)):
        assert torch.equal(got, want)


# ---- module face --------------------------------------------------------------------------


def test_module_face():
    m = GAE(gamma=0.9, lam=0.8)
    assert "gamma=0.9" in repr(m) and "lam=0.8" in repr(m) and "impl='auto'" in repr(m)
    inp = make_inputs(4, 10, mask_kind="holes", done_p=0.1, last_values=True)
    out = m(**inp)
    ref = gae(**inp, gamma=0.9, lam=0.8, impl="reference")
    assert isinstance(out, fastrlhf.ops.GAEOutput)
    assert_close(out.advantages, ref.advantages)
    assert_close(out.returns, ref.returns)
    assert "impl='reference'" in repr(GAE(impl="reference"))


# ---- bad input ----------------------------------------------------------------------------


def _valid_args():
    r = torch.randn(2, 5)
    return r, torch.randn(2, 5)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda r, v: gae(r[0], v[0]), ValueError, "rewards"),  # 1-D
        (lambda r, v: gae(r[None], v[None]), ValueError, "rewards"),  # 3-D
        (lambda r, v: gae(r, v[:, :4]), ValueError, "values"),
        (lambda r, v: gae(r, v.T), ValueError, "values"),
        (lambda r, v: gae(r, v, last_values=torch.zeros(3)), ValueError, "last_values"),
        (lambda r, v: gae(r, v, last_values=torch.zeros(2, 1)), ValueError, "last_values"),
        (lambda r, v: gae(r, v, mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
        (lambda r, v: gae(r, v, dones=torch.ones(5, 2, dtype=torch.bool)), ValueError, "dones"),
        (lambda r, v: gae(r, torch.empty(2, 5, device="meta")), ValueError, "values"),
        (lambda r, v: gae(r, v, last_values=torch.empty(2, device="meta")), ValueError, "last_values"),
        (lambda r, v: gae(r, v, mask=torch.ones(2, 5, dtype=torch.bool, device="meta")), ValueError, "mask"),
        (lambda r, v: gae(torch.ones(2, 5, dtype=torch.int64), v), TypeError, "rewards"),
        (lambda r, v: gae(r, torch.ones(2, 5, dtype=torch.int32)), TypeError, "values"),
        (lambda r, v: gae(r, v, mask=torch.ones(2, 5, dtype=torch.complex64)), TypeError, "mask"),
        (lambda r, v: gae(r, v, gamma=1.5), ValueError, "gamma"),
        (lambda r, v: gae(r, v, gamma=-0.1), ValueError, "gamma"),
        (lambda r, v: gae(r, v, gamma=float("nan")), ValueError, "gamma"),
        (lambda r, v: gae(r, v, lam=2.0), ValueError, "lam"),
        (lambda r, v: gae(r, v, lam=float("inf")), ValueError, "lam"),
        (lambda r, v: gae(r, v, impl="cuda"), ValueError, "impl"),
        (lambda r, v: gae(r.tolist(), v), TypeError, "rewards"),
        (lambda r, v: discounted_returns(r[0]), ValueError, "rewards"),
        (lambda r, v: discounted_returns(r, gamma=1.01), ValueError, "gamma"),
        (lambda r, v: discounted_returns(r.long()), TypeError, "rewards"),
        (lambda r, v: discounted_returns(r, torch.ones(2, 6, dtype=torch.bool)), ValueError, "mask"),
        (lambda r, v: discounted_returns(r, impl="fast"), ValueError, "impl"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    r, v = _valid_args()
    with pytest.raises(exc, match=match):
        call(r, v)


def test_kernel_op_rejects_bad_tensors_directly():
    """The op itself (torch.ops.fastrlhf.gae) validates too, naming the argument."""
    r, v = _valid_args()
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.fastrlhf.gae.default(r, v, torch.ones(2, 5), None, None, 0.9, 0.9)
    with pytest.raises(RuntimeError, match="values"):
        torch.ops.fastrlhf.gae.default(r, v.double(), None, None, None, 0.9, 0.9)
    with pytest.raises(RuntimeError, match="last_values"):
        torch.ops.fastrlhf.gae.default(r, v, None, None, torch.zeros(3), 0.9, 0.9)


@pytest.mark.parametrize("name", ["rewards", "values", "last_values"])
def test_forbid_grad(name):
    inp = make_inputs(2, 5, dtype=torch.float32, last_values=True)
    inp[name] = inp[name].requires_grad_()
    with pytest.raises(RuntimeError, match=rf"{name}.*detach"):
        gae(**inp)
    with torch.no_grad():
        out = gae(**inp)
    ref = gae(**{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()})
    assert torch.equal(out.advantages, ref.advantages)


def test_discounted_returns_forbid_grad():
    r = torch.randn(2, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="detach"):
        discounted_returns(r, gamma=0.9)
    with torch.no_grad():
        out = discounted_returns(r, gamma=0.9)
    assert math.isclose(out[0, -1].item(), r[0, -1].item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [4096, 20000])
def test_nan_propagates_through_long_rows(device, T):
    """(gamma * lam)^n underflows to an exact 0 in fp32 after ~2000 steps; the chunked scan must
    still multiply it (0 * NaN = NaN), like the sequential recurrence and the reference, and only
    an episode end may cut the dependency. B = 2 < 8 and T >= 8192 take the CPU's chunked path."""
    r = torch.zeros(2, T, device=device)
    v = torch.zeros(2, T, device=device)
    r[0, -1] = float("nan")
    dones = torch.zeros(2, T, dtype=torch.bool, device=device)
    dones[1, T // 2] = True
    r[1, -1] = float("nan")
    got = gae(r, v, dones=dones, gamma=0.99, lam=0.95, impl="kernel").advantages.cpu()
    want = gae(r.cpu(), v.cpu(), dones=dones.cpu(), gamma=0.99, lam=0.95, impl="reference").advantages
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.isnan(got[0]).all()
    assert not torch.isnan(got[1, : T // 2 + 1]).any() and torch.isnan(got[1, T // 2 + 1 :]).all()
