"""What every trainer shares: the config fields of an optimization run, the one reduction helper,
a resumable data order, the optimizer and LR schedule, LoRA / gradient checkpointing setup,
autocast, gradient clipping, progress, metrics, checkpoints and a Ctrl-C that stops cleanly.

A trainer subclasses :class:`Trainer`, implements :meth:`Trainer.train_step` (one optimizer
step: rollouts or a batch, losses, backward through :meth:`Trainer.backward`, then
:meth:`Trainer.optimizer_step`) and lists what it checkpoints in :meth:`Trainer.state_dict`.

Only this module knows about ``torch.distributed``: every statistic that spans the batch (token
counts for loss normalizers, advantage mean / std, reward normalization) goes through
:class:`Reducer`, which sums across ranks when a process group is initialized, so data-parallel
training changes nothing in the trainers.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from fastrlhf import ops
from fastrlhf.config import Config, ConfigError, option
from fastrlhf.models import apply_lora
from fastrlhf.trainers import checkpoint as ckpt
from fastrlhf.trainers.metrics import MetricsLogger, timed_into

Schedule = Literal["constant", "linear", "cosine"]


@dataclass
class TrainConfig(Config):
    """Fields shared by every trainer's config."""

    output_dir: str = option("runs/run", "run directory: metrics.jsonl, TensorBoard events, checkpoints, the model")
    seed: int = option(0, "seed of every random choice (data order, sampling, dropout)")
    max_steps: int = option(100, "optimizer steps", min=1)
    learning_rate: float = option(1e-5, "peak learning rate (AdamW)", min=0.0, min_exclusive=True)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    adam_beta1: float = option(0.9, "AdamW beta1", min=0.0, max=1.0, max_exclusive=True)
    adam_beta2: float = option(0.999, "AdamW beta2", min=0.0, max=1.0, max_exclusive=True)
    adam_eps: float = option(1e-8, "AdamW epsilon", min=0.0, min_exclusive=True)
    lr_schedule: Schedule = option("constant", "learning-rate schedule after warmup")
    warmup_steps: int = option(0, "linear warmup steps", min=0)
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this (None: no clipping)", min=0.0,
                                         min_exclusive=True)
    micro_batch_size: int = option(8, "rows per forward / backward (gradient accumulation over a step's batch)",
                                   min=1)
    bf16: bool = option(False, "bf16 autocast where the device supports it")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward (less memory)")
    lora_r: int = option(0, "LoRA rank (0: full fine-tuning)", min=0)
    lora_alpha: float = option(16.0, "LoRA alpha (scaling alpha / r)", min=0.0, min_exclusive=True)
    lora_dropout: float = option(0.0, "LoRA dropout", min=0.0, max=1.0, max_exclusive=True)
    lora_targets: list[str] = option(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"],
                                     help="module names that get LoRA adapters")
    save_every: int = option(0, "checkpoint every N steps (0: only at the end and on Ctrl-C)", min=0)
    keep_checkpoints: int = option(2, "checkpoints kept in RUN_DIR/checkpoints", min=1)
    save_model: bool = option(True, "at the end, write the trained model (LoRA merged) and its tokenizer to "
                              "RUN_DIR/model")
    log_every: int = option(1, "write metrics every N steps", min=1)
    progress: bool = option(True, "show a progress bar")
    tensorboard: bool = option(True, "write TensorBoard events beside metrics.jsonl")


# ---- the one reduction helper ------------------------------------------------------------


class Reducer:
    """Batch-wide statistics. In one process these are plain sums; under ``torch.distributed``
    they are summed over the ranks, so normalizers and means are those of the global batch."""

    @staticmethod
    def distributed() -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over every element (and rank), fp64."""
        s = x.detach().to(torch.float64).sum()
        if self.distributed():
            torch.distributed.all_reduce(s)
        return s

    def count(self, mask: torch.Tensor) -> float:
        """Number of true entries of ``mask`` over the global batch."""
        return float(self.sum(mask.to(torch.float64)))

    def mean_std(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, unbiased: bool = True):
        """``(mean, std)`` of ``x`` over the valid entries of the global batch (0-dim fp64)."""
        m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
        xv = torch.where(m, x.detach().double(), 0.0)
        n = self.sum(m)
        mean = self.sum(xv) / n.clamp(min=1)
        var = self.sum(torch.where(m, (xv - mean) ** 2, 0.0)) / (n - (1 if unbiased else 0)).clamp(min=1)
        return mean, var.sqrt()

    def whiten(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, shift_mean: bool = True) -> torch.Tensor:
        """Advantage whitening over the global batch: ``ops.whiten`` in one process; with several
        ranks the global mean / std, applied the same way."""
        if not self.distributed():
            return ops.whiten(x, mask, shift_mean=shift_mean)
        mean, std = self.mean_std(x, mask)
        out = (x.double() - mean) / (std**2 + 1e-8).sqrt() + (0.0 if shift_mean else mean)
        return torch.where(mask.bool() if mask is not None else torch.ones_like(x, dtype=torch.bool),
                           out, 0.0).to(x.dtype)


# ---- data order that resumes exactly -----------------------------------------------------


class BatchSampler:
    """Batches of row indices in a seeded order per epoch; its state (epoch, position) is part
    of the checkpoint, so a resumed run sees the same batches. A batch larger than the data, or
    one that runs past the end of an epoch, continues into the next epoch's order (rows repeat
    only across epochs).

    Args:
        n: number of rows.
        batch_size: rows per batch.
        seed: seed of the order.
        shuffle: permute each epoch (else in order).
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, shuffle: bool = True):
        if n < 1:
            raise ValueError("BatchSampler: no rows")
        if batch_size < 1:
            raise ValueError(f"BatchSampler: batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch, self.pos = 0, 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            order = self._order()
            take = order[self.pos: self.pos + self.batch_size - len(batch)]
            batch += take
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.pos = int(d["epoch"]), int(d["pos"])


def micro_batches(n: int, size: int) -> list[slice]:
    """Slices of ``range(n)`` of at most ``size`` rows."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def lr_lambda(schedule: str, warmup: int, total: int):
    """The multiplier of the peak learning rate at each step: linear warmup, then constant /
    linear decay to 0 / cosine decay to 0 at ``total``."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on devices that support it (CUDA with bf16, CPU), else a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn("bf16 autocast requested but this GPU does not support bf16; running in fp32", stacklevel=2)
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def prepare_model(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Apply LoRA (``lora_r > 0``: the base frozen, only adapters train) and gradient checkpointing."""
    if config.lora_r > 0 and not getattr(model, "lora_config", None):
        apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                   target_modules=config.lora_targets)
    if config.gradient_checkpointing:
        for m in model.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = True
    return model


class StopRequested:
    """A Ctrl-C (SIGINT) or SIGTERM during :meth:`Trainer.train` sets ``requested``; the loop
    finishes the current step, writes a checkpoint and raises ``KeyboardInterrupt`` so that its
    caller stops too (``resume`` continues the run). A second Ctrl-C raises at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nstopping after this step (Ctrl-C again to abort now) ...", flush=True)

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class Trainer:
    """The loop around :meth:`train_step`.

    Args:
        config: the run's config (a :class:`TrainConfig` subclass).
        modules: the modules being trained, by name (their trainable parameters are optimized
            and checkpointed).
    """

    name = "trainer"

    def __init__(self, config: TrainConfig, modules: dict[str, nn.Module]):
        self.config = config
        self.modules = modules
        self.run_dir = Path(config.output_dir)
        self.step = 0
        self.reducer = Reducer()
        params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"{type(self).__name__}: nothing to train (every parameter is frozen)")
        seen, unique = set(), []
        for p in params:  # tied weights appear twice
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        self.params = unique
        self.optimizer = torch.optim.AdamW(unique, lr=config.learning_rate, betas=(config.adam_beta1,
                                                                                   config.adam_beta2),
                                           eps=config.adam_eps, weight_decay=config.weight_decay)
        total = config.max_steps * self.updates_per_step()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.lr_schedule, config.warmup_steps, total))
        self.metrics: MetricsLogger | None = None
        self.timings: dict[str, float] = {}

    def updates_per_step(self) -> int:
        """Optimizer steps per :meth:`train_step` (the LR schedule counts optimizer steps)."""
        return 1

    # ---- pieces a train_step uses
    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def autocast(self):
        return autocast(self.device, self.config.bf16)

    def timed(self, phase: str):
        """Accumulate wall time of ``phase`` into this step's ``time/<phase>`` metric."""
        return timed_into(self.timings, phase, cuda_sync=self.device.type == "cuda")

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step, zero the gradients, advance the schedule. -> ``grad_norm`` and ``lr``."""
        if self.config.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        else:
            norm = torch.sqrt(sum((p.grad.detach().float() ** 2).sum() for p in self.params if p.grad is not None))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {"grad_norm": float(norm), "lr": lr}

    # ---- what subclasses provide
    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns its metrics."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """JSON-able trainer state beyond weights / optimizer / RNG (data position, KL coefficient, ...)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""

    # ---- checkpoints
    def save(self) -> Path:
        """Write a checkpoint of the current step (see :mod:`fastrlhf.trainers.checkpoint`)."""
        return ckpt.save_checkpoint(self.run_dir, self.step, modules=self.modules, optimizer=self.optimizer,
                                    scheduler=self.scheduler, trainer_state=self.state_dict(), config=self.config,
                                    keep_last=self.config.keep_checkpoints)

    def resume(self, path: str | Path | None = None) -> int:
        """Restore the latest checkpoint of the run directory (or ``path``); returns its step (0 when
        there is none)."""
        path = Path(path) if path is not None else ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            return 0
        state = ckpt.load_checkpoint(path, modules=self.modules, optimizer=self.optimizer, scheduler=self.scheduler)
        self.step = int(state["step"])
        self.load_state_dict(state["trainer"])
        return self.step

    # ---- the loop
    def train(self, *, resume: bool = False) -> dict[str, float]:
        """Run until ``max_steps`` (or a stop). Returns the last step's metrics.

        Args:
            resume: continue from the run directory's latest checkpoint.
        """
        cfg = self.config
        if resume:
            self.resume()
        self.metrics = MetricsLogger(self.run_dir, tensorboard=cfg.tensorboard)
        self.metrics.truncate_after(self.step)
        cfg.to_yaml(self.run_dir / "config.yaml")
        last: dict[str, float] = {}
        bar = _progress(total=cfg.max_steps, initial=self.step, desc=self.name, enabled=cfg.progress)
        try:
            with StopRequested() as stop:
                while self.step < cfg.max_steps:
                    self.timings = {}
                    t0 = time.perf_counter()
                    for m in self.modules.values():
                        m.train()
                    last = self.train_step()
                    self.step += 1
                    last = {**last, **{f"time/{k}": v for k, v in self.timings.items()},
                            "time/step": time.perf_counter() - t0}
                    end = self.after_step(last)  # guardrails: may add metrics, stop or roll back
                    if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or end:
                        self.metrics.log(self.step, last)
                    bar.update(1)
                    bar.set_postfix(_postfix(last))
                    if end or stop.requested:
                        break
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save()
                self.save()
                if stop.requested:  # the caller (a loop, the CLI) stops too; the checkpoint is written
                    raise KeyboardInterrupt
                final = self.on_train_end()
                if final:
                    self.metrics.log(self.step, final)
                    last = {**last, **final}
                if cfg.save_model:
                    self.save_model()
        finally:
            bar.close()
            self.metrics.close()
        return last

    def final_model(self) -> tuple[nn.Module, object] | None:
        """(the trained model, its tokenizer) that :meth:`save_model` writes; None: nothing."""
        return None

    def save_model(self) -> Path | None:
        """Write :meth:`final_model` to ``RUN_DIR/model`` (a Hugging Face directory: config.json,
        safetensors weights with LoRA merged, the tokenizer). Returns the directory."""
        out = self.final_model()
        if out is None:
            return None
        model, tokenizer = out
        path = self.run_dir / "model"
        model.save_pretrained(path)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(path)
        return path

    def on_train_end(self) -> dict[str, float]:
        """Hook after the last step (held-out evaluation, saving the model); its metrics are logged
        at the last step."""
        return {}

    def after_step(self, metrics: dict) -> bool:
        """Hook after each step, before its metrics are written (guardrails may add some); True
        stops the run."""
        return False


def _postfix(metrics: dict) -> dict:
    keys = ("loss", "reward", "kl", "accuracy")
    return {k: f"{metrics[k]:.4g}" for k in keys if k in metrics and isinstance(metrics[k], (int, float))}


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)
