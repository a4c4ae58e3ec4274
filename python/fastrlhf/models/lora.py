"""LoRA adapters for the linear layers: ``y = base(x) + (alpha / r) * B(A(dropout(x)))`` with the
base frozen, ``A`` Kaiming-initialized and ``B`` zero (so a fresh adapter changes nothing).

Adapters are saved alone in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight``), so ``peft`` can load them and we can load
``peft``'s. ``merged_state_dict`` folds them into plain weights (what ``save_pretrained`` writes).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update. ``weight`` / ``bias`` are the base's.

    ``forward(x) = base(x) + (alpha / r) * lora_B(lora_A(dropout(x)))``; ``lora_A`` ``[r, in]`` is
    Kaiming-initialized and ``lora_B`` ``[out, r]`` zero, on the base's device and dtype.

    Args:
        base: the ``nn.Linear`` to adapt; kept as ``base_layer`` and frozen (``requires_grad`` off).
        r: the adapter's rank (>= 1).
        alpha: the scale numerator: the update is multiplied by ``alpha / r``.
        dropout: dropout probability on the adapter's input (0: none; the base path never drops).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA: rank r must be >= 1, got {r}")
        self.base_layer = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # lora_disabled(): the base layer alone (a reference policy without a weight copy)
        base.requires_grad_(False)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``, ``[out, in]``."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """``W + scaling * B @ A`` in W's dtype (differentiable w.r.t. the adapters); ``W`` alone
        while disabled."""
        if self.disabled:
            return self.base_layer.weight
        return self.base_layer.weight + self.delta_weight().to(self.base_layer.weight.dtype)

    def forward(self, x):
        if self.disabled:
            return self.base_layer(x)
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded in."""
        base = self.base_layer
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(self.merged_weight())
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}"


def _targets(model: nn.Module, target_modules):
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and leaf in target_modules:
            yield name, module


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def apply_lora(model: nn.Module, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules=DEFAULT_TARGETS, freeze_base: bool = True) -> nn.Module:
    """Wrap every ``nn.Linear`` whose attribute name is in ``target_modules`` with a
    :class:`LoRALinear` (in place) and, by default, freeze everything but the adapters.
    Returns ``model``. Records the settings in ``model.lora_config``.

    Args:
        model: the model to adapt (modified in place).
        r: adapter rank (>= 1).
        alpha: LoRA alpha; the update is scaled by ``alpha / r``.
        dropout: dropout probability on the adapters' inputs (0: none).
        target_modules: leaf attribute names of the ``nn.Linear`` layers to wrap (e.g. ``"q_proj"``);
            default: every attention and MLP projection of a Llama block. Layers already wrapped
            are skipped.
        freeze_base: set ``requires_grad=False`` on every existing parameter first, so that only the
            adapters train. The wrapped layers' base weights are frozen either way.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: no ``nn.Linear`` matches ``target_modules``.
    """
    found = list(_targets(model, set(target_modules)))
    if not found:
        raise ValueError(f"apply_lora: no nn.Linear named {sorted(target_modules)} in the model")
    if freeze_base:
        model.requires_grad_(False)
    for name, linear in found:
        _set_submodule(model, name, LoRALinear(linear, r, alpha, dropout))
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                         "target_modules": sorted(set(target_modules))}
    return model


def lora_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def lora_disabled(model: nn.Module):
    """Within the block every adapter of ``model`` is off: the model computes its base weights'
    function (the reference policy of RLHF with LoRA, with no second copy of the weights).

    Args:
        model: a model with :class:`LoRALinear` modules (without any, the block changes nothing).
    """
    mods = [m for _, m in lora_modules(model)]
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


def _frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight`` / ``bias`` as frozen parameters (built on the meta
    device: no random init of weights replaced right away)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return layer


@contextmanager
def lora_merged(model: nn.Module):
    """Within the block every :class:`LoRALinear` of ``model`` is swapped for a frozen plain
    ``nn.Linear`` holding its current weight (``W + (alpha / r) B A``; ``W`` alone while disabled),
    so inference (generation) costs what the base model costs and takes the plain layers' fast paths.
    One copy of the adapted weights lives for the duration; the wrappers return on exit, adapters
    untouched. Only for no-grad work: the copies do not train.

    Args:
        model: a model with :class:`LoRALinear` layers (without any, the block changes nothing).
    """
    mods = lora_modules(model)
    with torch.no_grad():
        plain = [_frozen_linear(m.merged_weight().detach(), m.bias) for _, m in mods]  # disabled: W itself, shared
    for (name, _), layer in zip(mods, plain):
        _set_submodule(model, name, layer)
    try:
        yield model
    finally:
        for name, module in mods:
            _set_submodule(model, name, module)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer (in place) and remove the wrappers.

    Args:
        model: a model with :class:`LoRALinear` layers (one without is returned unchanged).

    Returns:
        ``model`` itself, each wrapper replaced by a plain ``nn.Linear`` holding ``W + (alpha / r) B A``
        and ``model.lora_config`` removed. The new layers' ``requires_grad`` is True.
    """
    for name, module in lora_modules(model):
        _set_submodule(model, name, module.merge())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every adapter folded into a plain ``<module>.weight``; the model
    itself is not changed.

    Args:
        model: any model; without adapters this is just its ``state_dict()``.

    Returns:
        A new dict: the ``base_layer`` / ``lora_A`` / ``lora_B`` keys of each adapted layer replaced
        by ``<module>.weight`` (``W + (alpha / r) B A``, computed without grad) and ``<module>.bias``;
        the keys a plain, unadapted model would have (what ``save_pretrained`` writes).
    """
    sd = dict(model.state_dict())
    for name, module in lora_modules(model):
        for key in ("base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"):
            sd.pop(f"{name}.{key}", None)
        with torch.no_grad():
            sd[f"{name}.weight"] = module.merged_weight()
        if module.base_layer.bias is not None:
            sd[f"{name}.bias"] = module.base_layer.bias
    return sd


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights, under PEFT's key names.

    Args:
        model: a model with :class:`LoRALinear` layers.

    Returns:
        ``{"base_model.model.<module>.lora_A.weight": [r, in], "...lora_B.weight": [out, r]}``,
        the tensors detached (shared with the model, not copied).

    Raises:
        ValueError: the model has no adapters.
    """
    out = {}
    for name, module in lora_modules(model):
        out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach()
        out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach()
    if not out:
        raise ValueError("lora_state_dict: the model has no LoRA adapters (call apply_lora first)")
    return out


def save_lora(model: nn.Module, path) -> None:
    """Write the adapters alone (PEFT format) to directory ``path``.

    Args:
        model: a model with :class:`LoRALinear` layers.
        path: directory (``str`` or ``Path``), created if missing; receives ``adapter_config.json``
            (from ``model.lora_config``, or inferred from the layers) and ``adapter_model.safetensors``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    cfg = dict(getattr(model, "lora_config", {}))
    if not cfg:
        first = lora_modules(model)[0][1]
        cfg = {"r": first.r, "lora_alpha": first.alpha, "lora_dropout": 0.0,
               "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in lora_modules(model)})}
    cfg.update(peft_type="LORA", task_type="CAUSAL_LM", bias="none", fan_in_fan_out=False, inference_mode=False)
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_lora(model: nn.Module, path, *, freeze_base: bool = True) -> nn.Module:
    """Add the adapters saved in directory ``path`` (ours or PEFT's) to ``model`` (in place).

    Args:
        model: the base model. Without adapters, :func:`apply_lora` is called with the saved
            ``r``, ``lora_alpha``, ``lora_dropout`` and ``target_modules``; with adapters, they must
            have the saved ``r`` and ``alpha`` and are overwritten.
        path: directory (``str`` or ``Path``) holding ``adapter_config.json`` and
            ``adapter_model.safetensors``.
        freeze_base: passed to :func:`apply_lora` when the adapters are created here.

    Returns:
        ``model`` itself.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` in ``path``.
        ValueError: not a plain LoRA adapter (DoRA, rsLoRA, per-module ranks, bias, a regex
            ``target_modules``...), or the saved weights do not match the model's modules/shapes.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"load_lora: {path / ADAPTER_CONFIG} not found")
    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                               "modules_to_save") if cfg.get(k)]
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("bias", "none") != "none" or unsupported:
        raise ValueError(f"load_lora: only plain LoRA adapters (no bias, one r and alpha for every module) are "
                         f"supported; this one sets {unsupported or cfg.get('peft_type')} ")
    targets = cfg["target_modules"]
    if isinstance(targets, str):  # PEFT reads a string as a regex (or "all-linear")
        raise ValueError(f"load_lora: target_modules {targets!r} is a pattern; list the module names instead")
    existing = lora_modules(model)
    if not existing:
        apply_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                   target_modules=targets, freeze_base=freeze_base)
    elif any(m.r != cfg["r"] or m.alpha != cfg["lora_alpha"] for _, m in existing):
        raise ValueError(f"load_lora: the model's adapters have other r / alpha than the saved ones "
                         f"(r={cfg['r']}, alpha={cfg['lora_alpha']})")
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    modules = dict(lora_modules(model))
    loaded = set()
    for key, value in tensors.items():
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        name = name.replace(".default.", ".")  # PEFT's adapter-name infix in some versions
        mod_name, _, part = name.rpartition(".lora_")
        if mod_name not in modules:
            raise ValueError(f"load_lora: adapter weight {key!r} has no LoRA module {mod_name!r} in the model")
        target = getattr(modules[mod_name], "lora_" + part.split(".")[0]).weight
        if target.shape != value.shape:
            raise ValueError(f"load_lora: {key} has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value)
        loaded.add((mod_name, part))
    missing = [n for n in modules if (n, "A.weight") not in loaded or (n, "B.weight") not in loaded]
    if missing:
        raise ValueError(f"load_lora: no saved weights for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    return model
