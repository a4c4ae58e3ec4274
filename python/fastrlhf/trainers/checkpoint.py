"""Training checkpoints for exact resume, written atomically, without pickle.

``RUN_DIR/checkpoints/step-000120/`` holds:

* ``weights.safetensors``: every trainable parameter of every trained module (LoRA: the adapters
  alone; full fine-tuning: all weights), keyed ``<module>.<parameter>``;
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors and its param groups;
* ``rng.safetensors`` + ``state.json``: torch / CUDA / NumPy / Python random states, the step,
  the scheduler, and the trainer's own state (KL coefficient, data position, feedback
  normalizers, guardrail statistics);
* ``config.yaml``: the run's config.

A checkpoint is written into a temporary directory and renamed into place, then
``checkpoints/latest`` (a one-line file, replaced atomically) points to it: a crash or a kill at
any moment leaves the previous checkpoint intact and ``latest`` naming a complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or None."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    path = Path(run_dir) / CHECKPOINTS / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def trainable_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``<module>.<parameter>`` -> tensor for every parameter that requires grad."""
    out = {}
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            if p.requires_grad:
                out[f"{prefix}.{name}"] = p.detach()
    return out


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    py = random.getstate()
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py[0], list(py[1]), py[2]]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = meta["python"]
    random.setstate((version, tuple(state), gauss_next))


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: str | Path, step: int, *, modules: dict[str, nn.Module],
                    optimizer: torch.optim.Optimizer | None, scheduler, trainer_state: dict, config,
                    keep_last: int = 2) -> Path:
    """Write the checkpoint of ``step`` (see the module doc) and point ``latest`` at it.

    Args:
        run_dir: the run directory.
        step: the number of completed optimizer steps.
        modules: the trained modules by name (their trainable parameters are saved).
        optimizer: the optimizer (its state is saved), or None.
        scheduler: an LR scheduler with ``state_dict()`` (JSON-able), or None.
        trainer_state: JSON-able state of the trainer.
        config: the run's :class:`~fastrlhf.config.Config` (written as YAML).
        keep_last: checkpoints to keep (older ones are deleted after the new one is in place).
    """
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.contiguous().cpu() for k, v in trainable_state(modules).items()}, str(tmp / "weights.safetensors"))
    opt_meta = None
    if optimizer is not None:
        opt_tensors, opt_meta = _optimizer_state(optimizer)
        save_file({k: v.contiguous().cpu() for k, v in opt_tensors.items()}, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    rng_tensors, rng_meta = _rng_state()
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
    state = {"step": step, "trainer": trainer_state, "rng": rng_meta,
             "scheduler": scheduler.state_dict() if scheduler is not None else None}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if config is not None:
        config.to_yaml(tmp / "config.yaml")
    for f in tmp.iterdir():  # contents on disk before the rename makes them visible
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, root / LATEST)
    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[:-keep_last] if keep_last > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, *, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None,
                    scheduler) -> dict:
    """Restore what :func:`save_checkpoint` wrote into the live objects; returns the state dict
    (``step``, ``trainer``)."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(str(path / "weights.safetensors"))
    expected = trainable_state(modules)
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the trained modules: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]} (another model or other LoRA settings?)")
    with torch.no_grad():
        for key, value in weights.items():
            expected[key].copy_(value)
    if optimizer is not None and (path / "optimizer.safetensors").exists():
        _load_optimizer_state(optimizer, load_file(str(path / "optimizer.safetensors")),
                              json.loads((path / "optimizer.json").read_text()))
    state = json.loads((path / "state.json").read_text())
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state
