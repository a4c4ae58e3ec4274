"""KL coefficient controllers (Ziegler et al. 2019): a fixed coefficient, or an adaptive one that
moves the measured KL toward a target over a horizon of samples."""

from __future__ import annotations

import math


class KLController:
    """``value`` is the current coefficient; :meth:`update` takes the measured KL of a batch.

    Args:
        init: the starting coefficient.
        target: the KL to steer toward (None: a fixed coefficient).
        horizon: samples over which the adaptive controller moves the coefficient by e^(error)
            (the proportional error is clipped to +-0.2, as Ziegler et al.).
    """

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        if init < 0:
            raise ValueError(f"KLController: init must be >= 0, got {init}")
        if target is not None and target <= 0:
            raise ValueError(f"KLController: target must be > 0, got {target}")
        if horizon < 1:
            raise ValueError(f"KLController: horizon must be >= 1, got {horizon}")
        self.value, self.target, self.horizon = float(init), target, horizon

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def update(self, kl: float, n_samples: int) -> float:
        """Adjust after a batch of ``n_samples`` sequences whose mean KL was ``kl``; -> the new value."""
        if self.adaptive and math.isfinite(kl):
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.value *= 1.0 + error * n_samples / self.horizon
        return self.value

    def scale(self, factor: float) -> float:
        """Multiply the coefficient (a guardrail's response to a KL blow-up)."""
        self.value *= factor
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])
