"""fastrlhf.ops.td_targets / q_update: textbook Q-learning and SARSA, kernel vs reference over
shapes and dtypes, terminal rows, NaN, index errors, opcheck, torch.compile and bad input."""

from __future__ import annotations

import pytest
import torch

from fastrlhf.ops import q_update, td_targets

from helpers import DEVICES, LOW_PRECISION, assert_close

SHAPES = [(7, 3), (4, 5, 6), (33, 17), (1, 1), (2, 3, 40)]  # [B, A], [B, T, A]; A > 8 and A < 8


def sample_inputs(device, dtype, *, seed=0):
    """Yields dicts with rewards, next_q, dones, next_actions (or None), q, actions, targets
    for every shape in SHAPES, with and without dones; feeds correctness, opcheck, compile."""
    g = torch.Generator().manual_seed(seed)
    for shape in SHAPES:
        lead, A = shape[:-1], shape[-1]
        for with_dones, sarsa in [(False, False), (True, False), (True, True), (False, True)]:
            yield dict(
                rewards=torch.randn(*lead, generator=g, dtype=torch.float64).to(device, dtype),
                next_q=torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype),
                dones=(torch.rand(*lead, generator=g) < 0.3).to(device) if with_dones else None,
                next_actions=torch.randint(0, A, lead, generator=g).to(device) if sarsa else None,
                q=torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype),
                actions=torch.randint(0, A, lead, generator=g).to(device),
                targets=torch.randn(*lead, generator=g, dtype=torch.float64).to(device, dtype),
            )


def targets_of(s, impl, gamma=0.9, cast=None):
    f = (lambda t: t.to(cast)) if cast is not None else (lambda t: t)
    method = "sarsa" if s["next_actions"] is not None else "q_learning"
    return td_targets(f(s["rewards"]), f(s["next_q"]), s["dones"], gamma=gamma, method=method,
                      next_actions=s["next_actions"], impl=impl)


# ---- textbook -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_textbook_q_learning_and_sarsa(device, impl):
    f64 = dict(dtype=torch.float64, device=device)
    # Q table, 2 states x 2 actions:
    #   Q[0] = [0.0, 1.0]
    #   Q[1] = [2.0, 0.5]
    Q = torch.tensor([[0.0, 1.0], [2.0, 0.5]], **f64)
    alpha, gamma = 0.5, 0.9
    # Transition: s = 0, a = 1, r = 1, s' = 1, not terminal.
    states, actions, next_states = torch.tensor([0]), torch.tensor([1], device=device), torch.tensor([1])
    r = torch.tensor([1.0], **f64)

    # Q-learning: y = r + gamma * max_a' Q[1, a'] = 1 + 0.9 * 2.0 = 2.8
    #             Q[0, 1] <- 1.0 + 0.5 * (2.8 - 1.0) = 1.9
    y = td_targets(r, Q[next_states], gamma=gamma, impl=impl)
    assert_close(y, torch.tensor([2.8], **f64), rtol=1e-12, atol=1e-12)
    newQ = Q.clone()
    newQ[states] = q_update(Q[states], actions, y, alpha=alpha, impl=impl)
    assert_close(newQ, torch.tensor([[0.0, 1.9], [2.0, 0.5]], **f64), rtol=1e-12, atol=1e-12)

    # SARSA with the next action actually taken a' = 1:
    #   y = 1 + 0.9 * Q[1, 1] = 1 + 0.9 * 0.5 = 1.45;  Q[0, 1] <- 1.0 + 0.5 * (1.45 - 1.0) = 1.225
    y = td_targets(r, Q[next_states], gamma=gamma, method="sarsa", next_actions=torch.tensor([1], device=device),
                   impl=impl)
    assert_close(y, torch.tensor([1.45], **f64), rtol=1e-12, atol=1e-12)
    newQ = Q.clone()
    newQ[states] = q_update(Q[states], actions, y, alpha=alpha, impl=impl)
    assert_close(newQ, torch.tensor([[0.0, 1.225], [2.0, 0.5]], **f64), rtol=1e-12, atol=1e-12)

    # Terminal transition: y = r = 1 (no bootstrap); Q[0, 1] <- 1.0 + 0.5 * (1 - 1.0) = 1.0
    y = td_targets(r, Q[next_states], torch.tensor([True], device=device), gamma=gamma, impl=impl)
    assert_close(y, torch.tensor([1.0], **f64), rtol=0, atol=0)

    # A batch of two transitions, (s=0, a=1, r=1, s'=1) and (s=1, a=0, r=0, s'=0):
    #   y = [1 + 0.9 * 2.0, 0 + 0.9 * max(0, 1)] = [2.8, 0.9]
    #   Q[0, 1] <- 1.0 + 0.5 * (2.8 - 1.0) = 1.9;  Q[1, 0] <- 2.0 + 0.5 * (0.9 - 2.0) = 1.45
    states, next_states = torch.tensor([0, 1]), torch.tensor([1, 0])
    y = td_targets(torch.tensor([1.0, 0.0], **f64), Q[next_states], gamma=gamma, impl=impl)
    assert_close(y, torch.tensor([2.8, 0.9], **f64), rtol=1e-12, atol=1e-12)
    newQ = Q.clone()
    newQ[states] = q_update(Q[states], torch.tensor([1, 0], device=device), y, alpha=alpha, impl=impl)
    assert_close(newQ, torch.tensor([[0.0, 1.9], [1.45, 0.5]], **f64), rtol=1e-12, atol=1e-12)


# ---- kernel vs reference ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_matches_reference_fp64(device):
    for s in sample_inputs(device, torch.float64):
        assert_close(targets_of(s, "kernel"), targets_of(s, "reference"), what=f"td_targets {tuple(s['next_q'].shape)}")
        k = q_update(s["q"], s["actions"], s["targets"], alpha=0.3, impl="kernel")
        r = q_update(s["q"], s["actions"], s["targets"], alpha=0.3, impl="reference")
        assert_close(k, r, what=f"q_update {tuple(s['q'].shape)}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_vs_fp64_reference(device, dtype):
    for s in sample_inputs(device, dtype, seed=1):
        k = targets_of(s, "kernel")
        assert k.dtype == dtype
        ref = targets_of(s, "reference", cast=torch.float64)
        assert_close(k, ref, dtype, what=f"td_targets {tuple(s['next_q'].shape)}")
        qk = q_update(s["q"], s["actions"], s["targets"], alpha=0.3, impl="kernel")
        qr = q_update(s["q"].double(), s["actions"], s["targets"].double(), alpha=0.3, impl="reference")
        assert qk.dtype == dtype
        assert_close(qk, qr, dtype, what=f"q_update {tuple(s['q'].shape)}")


def test_many_rows():
    """More rows than one parallel grain (16384 / A rows)."""
    g = torch.Generator().manual_seed(2)
    next_q = torch.randn(5000, 7, generator=g, dtype=torch.float64)
    r = torch.randn(5000, generator=g, dtype=torch.float64)
    d = torch.rand(5000, generator=g) < 0.1
    assert_close(td_targets(r, next_q, d, gamma=0.99, impl="kernel"),
                 td_targets(r, next_q, d, gamma=0.99, impl="reference"))
    a = torch.randint(0, 7, (5000,), generator=g)
    assert_close(q_update(next_q, a, r, alpha=0.1, impl="kernel"), q_update(next_q, a, r, alpha=0.1, impl="reference"))


def test_int32_actions_and_mixed_reward_dtype():
    g = torch.Generator().manual_seed(3)
    next_q = torch.randn(6, 4, generator=g)
    r64 = torch.randn(6, generator=g, dtype=torch.float64)
    na = torch.randint(0, 4, (6,), generator=g)
    y = td_targets(r64, next_q, gamma=0.9, method="sarsa", next_actions=na.int(), impl="kernel")
    assert y.dtype == torch.float32
    assert_close(y, td_targets(r64.float(), next_q, gamma=0.9, method="sarsa", next_actions=na, impl="reference"))
    out = q_update(next_q, na.int(), r64, alpha=0.5, impl="kernel")
    assert_close(out, q_update(next_q, na, r64.float(), alpha=0.5, impl="reference"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_q_update_returns_a_copy(device, impl):
    q = torch.randn(5, 3, dtype=torch.float64, device=device)
    before = q.clone()
    actions = torch.tensor([0, 1, 2, 1, 0], device=device)
    targets = torch.randn(5, dtype=torch.float64, device=device)
    out = q_update(q, actions, targets, alpha=0.5, impl=impl)
    assert torch.equal(q, before)
    assert out.data_ptr() != q.data_ptr()
    # untouched entries copied, taken entries moved halfway to the target
    taken = torch.nn.functional.one_hot(actions, 3).bool()
    assert torch.equal(out[~taken], q[~taken])
    assert_close(out[taken], q[taken] + 0.5 * (targets - q[taken]))


# ---- terminal rows, NaN, bad indices ------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("method", ["q_learning", "sarsa"])
def test_done_rows_give_reward_even_with_nan_next_q(device, impl, method):
    r = torch.tensor([1.5, -0.25, 2.0], dtype=torch.float32, device=device)
    next_q = torch.tensor([[float("nan")] * 4, [1.0, 2.0, 3.0, 4.0], [float("inf"), float("-inf"), 0, 0]],
                          device=device)
    d = torch.tensor([True, False, True], device=device)
    na = torch.tensor([2, 1, 0], device=device) if method == "sarsa" else None
    y = td_targets(r, next_q, d, gamma=0.9, method=method, next_actions=na, impl=impl)
    assert y[0].item() == 1.5 and y[2].item() == 2.0  # exactly r
    assert_close(y[1], torch.tensor(-0.25 + 0.9 * (4.0 if method == "q_learning" else 2.0), device=device))


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_nan_in_non_terminal_next_q_propagates(impl):
    next_q = torch.randn(4, 11, dtype=torch.float64)
    next_q[1, 9] = float("nan")  # beyond the first 8 lanes of the kernel's max
    next_q[2, 0] = float("nan")
    r = torch.zeros(4, dtype=torch.float64)
    y = td_targets(r, next_q, gamma=0.5, impl=impl)
    assert torch.isnan(y[1]) and torch.isnan(y[2])
    assert torch.isfinite(y[[0, 3]]).all()
    # SARSA reads only the taken action: NaN elsewhere in the row is harmless
    ys = td_targets(r, next_q, gamma=0.5, method="sarsa", next_actions=torch.tensor([0, 3, 0, 0]), impl=impl)
    assert torch.isfinite(ys[[0, 1, 3]]).all() and torch.isnan(ys[2])


def test_out_of_range_actions_raise_kernel():
    q = torch.randn(3, 2)
    r = torch.zeros(3)
    for bad in ([0, 2, 1], [0, -1, 1]):
        with pytest.raises(RuntimeError, match=r"next_actions must be in \[0, 2\)"):
            td_targets(r, q, gamma=0.9, method="sarsa", next_actions=torch.tensor(bad), impl="kernel")
        with pytest.raises(RuntimeError, match=r"actions must be in \[0, 2\)"):
            q_update(q, torch.tensor(bad), r, alpha=0.5, impl="kernel")
        with pytest.raises(RuntimeError, match=r"\[0, 2\)"):
            torch.ops.fastrlhf.q_update.default(q, torch.tensor(bad), r, 0.5)


def test_out_of_range_actions_raise_reference():
    q = torch.randn(3, 2)
    r = torch.zeros(3)
    with pytest.raises(RuntimeError, match="out of bounds"):
        td_targets(r, q, gamma=0.9, method="sarsa", next_actions=torch.tensor([0, 2, 1]), impl="reference")
    with pytest.raises(RuntimeError, match="out of bounds"):
        q_update(q, torch.tensor([0, -1, 1]), r, alpha=0.5, impl="reference")


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_sarsa_next_action_of_terminal_step_is_not_read(impl):
    """At done steps y = r and next_q is not read (docstring), so the next action there, often a
    padding value like -1, must not matter. The kernels (CPU and CUDA) skip it; both
    implementations must agree."""
    q = torch.randn(3, 2, dtype=torch.float64)
    r = torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64)
    d = torch.tensor([False, True, False])
    y = td_targets(r, q, d, gamma=0.9, method="sarsa", next_actions=torch.tensor([0, -1, 1]), impl=impl)
    assert_close(y, torch.stack([0.5 + 0.9 * q[0, 0], torch.tensor(1.0, dtype=torch.float64), -1.0 + 0.9 * q[2, 1]]))


# ---- opcheck and compile ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for i, s in enumerate(sample_inputs(device, torch.float32)):
        if i not in (1, 6, 11):  # (dones, q_learning) [B, A]; (dones, sarsa) [B, T, A]; (sarsa) [B, A]
            continue
        torch.library.opcheck(torch.ops.fastrlhf.td_targets.default,
                              (s["rewards"], s["next_q"], s["dones"], s["next_actions"], 0.9))
        torch.library.opcheck(torch.ops.fastrlhf.q_update.default, (s["q"], s["actions"], s["targets"], 0.25))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def f(rewards, next_q, dones, q, actions):
        y = td_targets(rewards, next_q, dones, gamma=0.9)
        return y, q_update(q, actions, y, alpha=0.5)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    s = list(sample_inputs(device, torch.float32))[5]  # [B, T, A] with dones
    args = (s["rewards"], s["next_q"], s["dones"], s["q"], s["actions"])
    for got, want in zip(compiled(*args), f(*args)):
        assert torch.equal(got, want)


# ---- bad input ----------------------------------------------------------------------------


def _args():
    return torch.randn(4), torch.randn(4, 3), torch.randint(0, 3, (4,))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda r, q, a: td_targets(r, q, gamma=0.9, method="sarsa"), ValueError, "next_actions"),
        (lambda r, q, a: td_targets(r, q, gamma=0.9, next_actions=a), ValueError, "next_actions"),
        (lambda r, q, a: td_targets(r, q, gamma=0.9, method="sarsa", next_actions=a.float()), TypeError,
         "next_actions"),
        (lambda r, q, a: td_targets(r, q, gamma=0.9, method="sarsa", next_actions=a.bool()), TypeError, "next_actions"),
        (lambda r, q, a: td_targets(r, q, gamma=0.9, method="sarsa", next_actions=a[:3]), ValueError, "next_actions"),
        (lambda r, q, a: td_targets(r, q, gamma=0.9, method="expected_sarsa"), ValueError, "method"),
        (lambda r, q, a: td_targets(r[:3], q, gamma=0.9), ValueError, "rewards"),
        (lambda r, q, a: td_targets(r, q.T, gamma=0.9), ValueError, "rewards"),
        (lambda r, q, a: td_targets(r, torch.empty(4, 0), gamma=0.9), ValueError, "next_q"),
        (lambda r, q, a: td_targets(r, q.long(), gamma=0.9), TypeError, "next_q"),
        (lambda r, q, a: td_targets(r.long(), q, gamma=0.9), TypeError, "rewards"),
        (lambda r, q, a: td_targets(r, q, torch.ones(3, dtype=torch.bool), gamma=0.9), ValueError, "dones"),
        (lambda r, q, a: td_targets(r.to("meta"), q, gamma=0.9), ValueError, "rewards"),
        (lambda r, q, a: td_targets(r, q, gamma=1.5), ValueError, "gamma"),
        (lambda r, q, a: td_targets(r, q, gamma=float("nan")), ValueError, "gamma"),
        (lambda r, q, a: td_targets(r, q, gamma=0.9, impl="gpu"), ValueError, "impl"),
        (lambda r, q, a: q_update(q, a.float(), r, alpha=0.5), TypeError, "actions"),
        (lambda r, q, a: q_update(q, a[:2], r, alpha=0.5), ValueError, "actions"),
        (lambda r, q, a: q_update(q, a, r[:2], alpha=0.5), ValueError, "targets"),
        (lambda r, q, a: q_update(q, a, r.long(), alpha=0.5), TypeError, "targets"),
        (lambda r, q, a: q_update(q.long(), a, r, alpha=0.5), TypeError, "q"),
        (lambda r, q, a: q_update(torch.tensor(1.0), a, r, alpha=0.5), ValueError, "q"),
        (lambda r, q, a: q_update(q, a, r, alpha=-0.1), ValueError, "alpha"),
        (lambda r, q, a: q_update(q, a, r, alpha=float("inf")), ValueError, "alpha"),
        (lambda r, q, a: q_update(q, a.to("meta"), r, alpha=0.5), ValueError, "actions"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(*_args())


def test_forbid_grad():
    r, q, a = _args()
    with pytest.raises(RuntimeError, match="next_q.*detach"):
        td_targets(r, q.requires_grad_(), gamma=0.9)
    with pytest.raises(RuntimeError, match="q.*detach"):
        q_update(q, a, r, alpha=0.5)
    with torch.no_grad():
        y = td_targets(r, q, gamma=0.9)
    assert_close(y, td_targets(r, q.detach(), gamma=0.9, impl="reference"))
