"""Guardrails practitioners ask for: detect a KL blow-up, an entropy collapse, reward spikes far
outside the running distribution and a response-length runaway; warn, and act as configured.

Each detector reads one metric per step and keeps running statistics (part of the checkpoint).
The trainer applies the action: ``warn`` (only log), ``raise_kl`` (multiply the KL coefficient),
``stop`` (checkpoint and end the run) or ``rollback`` (restore the last checkpoint and go on).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

from fastrlhf.config import Config, option

Action = Literal["warn", "raise_kl", "stop", "rollback"]


@dataclass
class GuardrailConfig(Config):
    """Thresholds of the detectors and what to do when one fires."""

    enabled: bool = option(True, "run the detectors")
    kl_max: float = option(10.0, "KL blow-up: mean KL per token above this", min=0.0, min_exclusive=True)
    entropy_min_ratio: float = option(0.1, "entropy collapse: entropy below this fraction of its first value",
                                      min=0.0, max=1.0)
    reward_z: float = option(6.0, "reward spike: batch reward this many running std from the running mean",
                             min=0.0, min_exclusive=True)
    length_max_ratio: float = option(0.95, "length runaway: mean response length above this fraction of "
                                     "max_new_tokens", min=0.0, max=1.0, min_exclusive=True)
    length_patience: int = option(3, "consecutive steps of runaway length before acting", min=1)
    warmup_steps: int = option(5, "steps before the reward-spike detector has enough history", min=1)
    action: Action = option("warn", "what to do when a detector fires: warn, raise_kl, stop, rollback")
    kl_raise_factor: float = option(2.0, "raise_kl multiplies the KL coefficient by this", min=1.0)
    max_rollbacks: int = option(2, "rollback: after this many rollbacks a firing detector stops the run", min=0)


@dataclass
class Alarm:
    detector: str  # kl_blowup | entropy_collapse | reward_spike | length_runaway
    message: str


class _Running:
    """Welford mean / variance."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0


class Guardrails:
    """The four detectors over a run's step metrics (``kl``, ``entropy``, ``reward``,
    ``response_length``; absent metrics are skipped).

    Args:
        config: thresholds and action.
        max_new_tokens: the generation limit the length detector compares with.
    """

    def __init__(self, config: GuardrailConfig, max_new_tokens: int | None = None):
        self.config, self.max_new_tokens = config, max_new_tokens
        self.reward = _Running()
        self.first_entropy: float | None = None
        self.long_steps = 0
        self.active: set[str] = set()  # detectors firing at the last step (a warning when one starts)

    def check(self, metrics: dict) -> list[Alarm]:
        """Alarms raised by this step's metrics (the running statistics are updated after)."""
        c = self.config
        if not c.enabled:
            return []
        alarms = []
        kl = metrics.get("kl")
        if kl is not None and (not math.isfinite(kl) or kl > c.kl_max):
            alarms.append(Alarm("kl_blowup", f"KL {kl:.4g} per token is above kl_max {c.kl_max}"))
        ent = metrics.get("entropy")
        if ent is not None:
            if self.first_entropy is None and math.isfinite(ent) and ent > 0:
                self.first_entropy = ent
            elif self.first_entropy is not None and ent < c.entropy_min_ratio * self.first_entropy:
                alarms.append(Alarm("entropy_collapse", f"entropy {ent:.4g} fell below {c.entropy_min_ratio} x its "
                                                        f"first value {self.first_entropy:.4g}"))
        r = metrics.get("reward")
        if r is not None:
            if not math.isfinite(r):
                alarms.append(Alarm("reward_spike", f"reward is {r}"))
            else:
                if self.reward.n >= c.warmup_steps and self.reward.std > 0:
                    z = abs(r - self.reward.mean) / self.reward.std
                    if z > c.reward_z:
                        alarms.append(Alarm("reward_spike", f"reward {r:.4g} is {z:.1f} std from the running mean "
                                                            f"{self.reward.mean:.4g}"))
                self.reward.add(r)
        length = metrics.get("response_length")
        if length is not None and self.max_new_tokens:
            self.long_steps = self.long_steps + 1 if length > c.length_max_ratio * self.max_new_tokens else 0
            if self.long_steps >= c.length_patience:
                alarms.append(Alarm("length_runaway", f"mean response length {length:.1f} has been above "
                                                      f"{c.length_max_ratio} x max_new_tokens for "
                                                      f"{self.long_steps} steps"))
        fired = {a.detector for a in alarms}
        for a in alarms:
            if a.detector not in self.active:
                warnings.warn(f"guardrail {a.detector}: {a.message} (action: {c.action})", RuntimeWarning,
                              stacklevel=2)
        self.active = fired
        return alarms

    def state_dict(self) -> dict:
        return {"reward": [self.reward.n, self.reward.mean, self.reward.m2], "first_entropy": self.first_entropy,
                "long_steps": self.long_steps, "active": sorted(self.active)}

    def load_state_dict(self, d: dict) -> None:
        self.reward.n, self.reward.mean, self.reward.m2 = d["reward"]
        self.first_entropy, self.long_steps = d["first_entropy"], d["long_steps"]
        self.active = set(d.get("active", []))
