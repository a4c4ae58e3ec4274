"""fastrlhf.ops.group_advantages (GRPO / Dr. GRPO / RLOO): kernel vs reference, textbook values,
TRL's formula, degenerate groups, opcheck, torch.compile, determinism and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from fastrlhf.ops import GroupAdvantages, group_advantages

from helpers import DEVICES, LOW_PRECISION, assert_close

MODES = [  # (normalize, leave_one_out): GRPO, Dr. GRPO, RLOO, RLOO / std
    ("std", False),
    ("none", False),
    ("none", True),
    ("std", True),
]


def sample_inputs(device, dtype, *, seed=0):
    """Yields (scores, group_size, kwargs) over group sizes and every mode; feeds the
    correctness, opcheck and torch.compile tests."""
    g = torch.Generator().manual_seed(seed)
    for n_groups, G in [(5, 4), (3, 2), (7, 16), (2, 33), (1, 64)]:
        scores = (torch.randn(n_groups * G, generator=g, dtype=torch.float64) * 2 + 1).to(device, dtype)
        for normalize, loo in MODES:
            yield scores, G, dict(normalize=normalize, leave_one_out=loo)


# ---- kernel vs reference ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_matches_reference_fp64(device):
    for scores, G, kw in sample_inputs(device, torch.float64):
        k = group_advantages(scores, G, **kw, impl="kernel")
        r = group_advantages(scores, G, **kw, impl="reference")
        assert_close(k, r, what=f"G={G} {kw}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_vs_fp64_reference(device, dtype):
    for scores, G, kw in sample_inputs(device, dtype, seed=1):
        k = group_advantages(scores, G, **kw, impl="kernel")
        assert k.dtype == dtype
        r = group_advantages(scores.double(), G, **kw, impl="reference")
        assert_close(k, r, dtype, what=f"G={G} {kw}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", ["std", "none"])
def test_many_groups(device, normalize):
    """More groups than one parallel grain (4096 / G groups)."""
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(3001 * 8, generator=g, dtype=torch.float64).to(device)
    for loo in (False, True):
        k = group_advantages(scores, 8, normalize=normalize, leave_one_out=loo, impl="kernel")
        r = group_advantages(scores, 8, normalize=normalize, leave_one_out=loo, impl="reference")
        assert_close(k, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", ["std", "none"])
def test_group_size_one(device, normalize):
    """A group of one: advantage 0 (x - mean = 0, std = 0), no NaN."""
    scores = torch.tensor([1.5, -2.0, 0.1], dtype=torch.float64, device=device)
    for impl in ("kernel", "reference"):
        out = group_advantages(scores, 1, normalize=normalize, impl=impl)
        assert torch.equal(out, torch.zeros_like(scores))


def test_empty():
    for impl in ("kernel", "reference"):
        out = group_advantages(torch.zeros(0), 4, impl=impl)
        assert out.shape == (0,)


# ---- textbook values ----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_textbook_grpo_drgrpo_rloo(device, impl):
    f64 = dict(dtype=torch.float64, device=device)
    # One group of 4 rewards: mean = (1 + 2 + 3 + 6) / 4 = 3, deviations [-2, -1, 0, 3],
    # sum of squared deviations 4 + 1 + 0 + 9 = 14, unbiased std = sqrt(14 / 3) ~= 2.1602.
    # A second group [5, 5, 5, 5] is constant: every mode gives 0.
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0], **f64)
    std = math.sqrt(14 / 3)
    eps = 1e-6

    # GRPO: (x - mean) / (std + eps)
    grpo = group_advantages(scores, 4, normalize="std", eps=eps, impl=impl)
    want = torch.tensor([-2 / (std + eps), -1 / (std + eps), 0.0, 3 / (std + eps), 0, 0, 0, 0], **f64)
    assert_close(grpo, want, rtol=1e-12, atol=1e-12)

    # Dr. GRPO: x - mean, no std
    dr = group_advantages(scores, 4, normalize="none", impl=impl)
    assert_close(dr, torch.tensor([-2.0, -1.0, 0.0, 3.0, 0, 0, 0, 0], **f64), rtol=1e-12, atol=1e-12)

    # RLOO: x_i - mean of the other three. Group sum 12:
    #   x=1: baseline (12-1)/3 = 11/3, adv = 1 - 11/3 = -8/3
    #   x=2: baseline 10/3, adv = -4/3;  x=3: baseline 3, adv 0;  x=6: baseline 2, adv 4
    rloo = group_advantages(scores, 4, normalize="none", leave_one_out=True, impl=impl)
    assert_close(rloo, torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0, 0, 0, 0], **f64), rtol=1e-12, atol=1e-12)

    # RLOO with std: the leave-one-out advantage divided by the group std as well
    rloo_std = group_advantages(scores, 4, normalize="std", leave_one_out=True, eps=eps, impl=impl)
    assert_close(rloo_std, torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0, 0, 0, 0], **f64) / (
        torch.tensor([std] * 4 + [0.0] * 4, **f64) + eps), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_rloo_baseline_is_mean_of_others(impl):
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(6 * 5, generator=g, dtype=torch.float64)
    out = group_advantages(scores, 5, normalize="none", leave_one_out=True, impl=impl)
    x = scores.view(6, 5)
    want = torch.stack([x[:, i] - torch.cat([x[:, :i], x[:, i + 1:]], dim=1).mean(dim=1) for i in range(5)], dim=1)
    assert_close(out, want.reshape(-1))


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_matches_trl_grpo_formula(impl):
    """TRL GRPOTrainer: mean/std per group via view(-1, G), broadcast back with
    repeat_interleave, advantages = (rewards - mean) / (std + 1e-4)."""
    G = 8
    g = torch.Generator().manual_seed(3)
    rewards = torch.rand(16 * G, generator=g)  # fp32, like TRL
    mean_grouped_rewards = rewards.view(-1, G).mean(dim=1)
    std_grouped_rewards = rewards.view(-1, G).std(dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(G, dim=0)
    std_grouped_rewards = std_grouped_rewards.repeat_interleave(G, dim=0)
    advantages = rewards - mean_grouped_rewards
    advantages = advantages / (std_grouped_rewards + 1e-4)

    out = group_advantages(rewards, G, normalize="std", eps=1e-4, impl=impl)
    assert_close(out, advantages)
    # Dr. GRPO (scale_rewards=False in TRL): no division
    out = group_advantages(rewards, G, normalize="none", impl=impl)
    assert_close(out, rewards - mean_grouped_rewards)


# ---- degenerate groups --------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize,loo", MODES)
def test_constant_groups_exactly_representable(device, impl, dtype, normalize, loo):
    """All-equal rewards (e.g. every sample correct, or every sample wrong): std 0, advantage 0,
    no NaN."""
    for G in (2, 4, 16, 64):
        scores = torch.tensor([0.0] * G + [1.0] * G + [-2.25] * G + [0.5] * G, dtype=dtype, device=device)
        out = group_advantages(scores, G, normalize=normalize, leave_one_out=loo, impl=impl)
        assert torch.equal(out, torch.zeros_like(out)), f"G={G}: {out}"


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("loo", [False, True])
def test_constant_groups_fp32_not_representable(impl, loo):
    """Constant groups of values with no exact binary form (0.1, 0.7, 3.3) in fp32. The exact
    answer (and the fp64 reference on the same fp32 inputs) is 0; rounding noise in the group
    mean must not be amplified by 1 / (0 + eps) = 1e6 into O(0.1..1) advantages."""
    for G in (3, 7, 16, 64):
        scores = torch.tensor([0.1] * G + [0.7] * G + [3.3] * G, dtype=torch.float32)
        exact = group_advantages(scores.double(), G, leave_one_out=loo, impl="reference")
        assert (exact.abs() <= 1e-6).all()
        out = group_advantages(scores, G, normalize="std", leave_one_out=loo, impl=impl)
        assert torch.isfinite(out).all()
        worst = out.abs().max().item()
        assert worst <= 1e-3, f"G={G}: constant groups gave advantages up to {worst:.4f} (want ~0)"


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_nan_propagates_to_its_group_only(impl):
    scores = torch.tensor([1.0, 2.0, float("nan"), 3.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    out = group_advantages(scores, 4, impl=impl)
    assert torch.isnan(out[:4]).all()
    assert torch.isfinite(out[4:]).all()


# ---- determinism, opcheck, compile --------------------------------------------------------


def test_bitwise_deterministic_across_calls_and_threads():
    g = torch.Generator().manual_seed(9)
    scores = torch.randn(4099 * 16, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = group_advantages(scores, 16, impl="kernel")
        b = group_advantages(scores, 16, impl="kernel")
        torch.set_num_threads(1)
        c = group_advantages(scores, 16, impl="kernel")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    seen = set()
    for scores, G, kw in sample_inputs(device, torch.float32):
        key = (G, kw["normalize"], kw["leave_one_out"])
        if G not in (2, 16) or key in seen:  # a few representative cases keep this fast
            continue
        seen.add(key)
        args = (scores, G, kw["normalize"] == "std", kw["leave_one_out"], 1e-6)
        torch.library.opcheck(torch.ops.fastrlhf.group_advantages.default, args)
    assert len(seen) == 8


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def f(scores):
        return group_advantages(scores, 4, normalize="std") + group_advantages(scores, 4, leave_one_out=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    scores, _, _ = next(iter(sample_inputs(device, torch.float32)))
    assert torch.equal(compiled(scores), f(scores))


def test_module_face():
    m = GroupAdvantages(4, normalize="none", leave_one_out=True)
    assert "group_size=4" in repr(m) and "normalize='none'" in repr(m) and "leave_one_out=True" in repr(m)
    scores = torch.arange(8, dtype=torch.float64)
    assert_close(m(scores), group_advantages(scores, 4, normalize="none", leave_one_out=True, impl="reference"))


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda s: group_advantages(s, 3), ValueError, "group_size"),  # 8 % 3 != 0
        (lambda s: group_advantages(s, 0), ValueError, "group_size"),
        (lambda s: group_advantages(s, -2), ValueError, "group_size"),
        (lambda s: group_advantages(s, 2.0), ValueError, "group_size"),
        (lambda s: group_advantages(s, True), ValueError, "group_size"),
        (lambda s: group_advantages(s, 1, leave_one_out=True), ValueError, "leave_one_out"),
        (lambda s: group_advantages(s.view(2, 4), 4), ValueError, "scores"),
        (lambda s: group_advantages(s.long(), 4), TypeError, "scores"),
        (lambda s: group_advantages(s, 4, normalize="mean"), ValueError, "normalize"),
        (lambda s: group_advantages(s, 4, normalize=None), ValueError, "normalize"),
        (lambda s: group_advantages(s, 4, eps=-1.0), ValueError, "eps"),
        (lambda s: group_advantages(s, 4, eps=float("nan")), ValueError, "eps"),
        (lambda s: group_advantages(s, 4, impl="triton"), ValueError, "impl"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(8))


def test_kernel_op_rejects_bad_arguments_directly():
    with pytest.raises(RuntimeError, match="group_size"):
        torch.ops.fastrlhf.group_advantages.default(torch.randn(8), 3, True, False, 1e-6)
    with pytest.raises(RuntimeError, match="leave_one_out"):
        torch.ops.fastrlhf.group_advantages.default(torch.randn(8), 1, True, True, 1e-6)
    with pytest.raises(RuntimeError, match="scores"):
        torch.ops.fastrlhf.group_advantages.default(torch.randn(2, 4), 4, True, False, 1e-6)


def test_forbid_grad():
    scores = torch.randn(8, requires_grad=True)
    with pytest.raises(RuntimeError, match="scores.*detach"):
        group_advantages(scores, 4)
    with torch.no_grad():
        out = group_advantages(scores, 4)
    assert torch.equal(out, group_advantages(scores.detach(), 4))
