"""Scalar heads on the Llama trunk: per-token values (PPO's critic) and sequence rewards.

* :class:`ValueHead` - ``Linear(C, 1)`` on hidden states ``[..., C]`` -> ``[...]`` (fp32).
* :class:`ValueModel` - a separate critic: trunk + ``score`` head, values ``[B, T]``.
* :class:`RewardModel` - trunk + ``score`` head read at the last valid token: scores ``[B]``.
  Its weights are named as Hugging Face's ``LlamaForSequenceClassification`` (``model.*``,
  ``score.weight``), so ``save_pretrained`` directories load there too (``num_labels = 1``).
* :class:`PolicyWithValue` - a :class:`CausalLM` with either a value head on its own trunk
  (shared) or a separate :class:`ValueModel`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from fastrlhf.models.checkpoint import load_checkpoint, save_checkpoint, write_safetensors
from fastrlhf.models.config import CausalLMConfig, hf_architecture
from fastrlhf.models.llama import CausalLM, LlamaTrunk
from fastrlhf.models.lora import merged_state_dict


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask ``[B, T]`` -> index of each row's last valid token ``[B]`` (left or right
    padding). A row without valid tokens gives 0.

    Args:
        attention_mask: ``[B, T]`` bool or 0/1 numbers (any nonzero counts as valid).

    Returns:
        ``[B]`` int64 column indices, usable with ``values.gather(1, idx[:, None])``.
    """
    m = attention_mask.to(torch.bool)
    idx = m.shape[1] - 1 - m.flip(1).to(torch.int8).argmax(1)
    return torch.where(m.any(1), idx, torch.zeros_like(idx))


class ValueHead(nn.Module):
    """hidden ``[..., C]`` -> value ``[...]`` in fp32.

    A ``Linear(C, 1)`` (``self.proj``), its weight drawn from a normal with std ``1 / (C + 1)``, its
    bias zero.

    Args:
        hidden_size: ``C``, the size of the hidden states it reads.
        bias: whether the projection has a bias.
        device: where to create the parameters (default: torch's default device).
        dtype: the parameters' dtype (default: torch's default dtype); the output is fp32 anyway.
    """

    def __init__(self, hidden_size: int, *, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1, bias=bias, device=device, dtype=dtype)
        nn.init.normal_(self.proj.weight, std=1.0 / (hidden_size + 1))
        if bias:
            nn.init.zeros_(self.proj.bias)

    def forward(self, hidden):
        """Value of each position.

        Args:
            hidden: ``[..., C]`` hidden states in the head's dtype.

        Returns:
            ``[...]`` fp32 values (differentiable).
        """
        return self.proj(hidden).squeeze(-1).float()


class ValueModel(nn.Module):
    """A trunk with a scalar ``score`` head on every token: ``values [B, T]`` (fp32).

    Parameters are named as Hugging Face's token-classification models (``model.*``, ``score.weight``);
    every ``Linear`` / ``Embedding`` weight is drawn from a normal with std ``initializer_range``.

    Args:
        config: the trunk's architecture (a :class:`~fastrlhf.models.config.CausalLMConfig`).
    """

    architecture = "ForTokenClassification"

    def __init__(self, config: CausalLMConfig):
        super().__init__()
        self.config = config
        self.model = LlamaTrunk(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=config.initializer_range)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    @classmethod
    def from_causal_lm(cls, lm: CausalLM, *, num_layers: int | None = None) -> ValueModel:
        """Start from a language model's trunk (the usual critic / reward-model init); new head.

        Args:
            lm: the source model; its trunk weights are copied (its LoRA adapters, if any, merged
                in), on its device and in its dtype. ``lm`` itself is not changed.
            num_layers: keep only the first ``num_layers`` decoder layers (and the embedding and
                final norm): a cheaper scorer on the same pretrained features; None keeps all.

        Returns:
            A new model of this class with a freshly initialized ``score`` head.
        """
        config = lm.config
        if num_layers is not None:
            if not 1 <= num_layers <= config.num_hidden_layers:
                raise ValueError(f"{cls.__name__}.from_causal_lm: num_layers must be in [1, "
                                 f"{config.num_hidden_layers}], got {num_layers}")
            config = dataclasses.replace(config, num_hidden_layers=num_layers, extra=dict(config.extra))
        out = cls(config).to(device=lm.device, dtype=lm.dtype)
        keep = set(out.model.state_dict())
        trunk = {k[len("model."):]: v for k, v in merged_state_dict(lm).items()
                 if k.startswith("model.") and k[len("model."):] in keep}
        out.model.load_state_dict(trunk)  # LoRA adapters of lm, if any, merged in
        return out

    @property
    def device(self):
        """The device of the ``score`` head's weight."""
        return self.score.weight.device

    @property
    def dtype(self):
        """The dtype of the ``score`` head's weight."""
        return self.score.weight.dtype

    def forward(self, input_ids, attention_mask=None, **kw) -> torch.Tensor:
        """Per-token values.

        Args:
            input_ids: ``[B, T]`` token ids (or ``[N]`` packed, with ``cu_seqlens``).
            attention_mask: ``[B, T]``, 1 on valid tokens (left or right padding). Default: all valid.
            **kw: more keyword arguments of :meth:`LlamaTrunk.forward` (``position_ids``,
                ``cu_seqlens``, ``cache``).

        Returns:
            ``values [B, T]`` (``[N]`` packed) in fp32; entries at padding are meaningless.
        """
        hidden = self.model(input_ids, attention_mask, **kw)  # (B, T, C)
        return self.score(hidden).squeeze(-1).float()  # (B, T)

    def save_pretrained(self, path, *, dtype=None) -> None:
        """Write ``config.json`` (Hugging Face keys, ``num_labels = 1``) and ``model.safetensors``;
        LoRA adapters, if any, are merged into the saved weights (the model is left as it is).

        Args:
            path: the directory (created if missing).
            dtype: cast the saved floating weights (default: as they are).
        """
        save_checkpoint(self, path, dtype=dtype, config_updates=dict(
            architectures=[hf_architecture(self.config.model_type, self.architecture)], num_labels=1,
            tie_word_embeddings=False,
            token_classification_bias=False))  # our score head has no bias

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None):
        """Load a directory written by ``save_pretrained`` (or a Hugging Face
        ``*ForSequenceClassification`` checkpoint with one label).

        Args:
            path: the checkpoint directory.
            dtype: cast floating weights (default: the stored dtype).
            device: where to put the model (default CPU).

        Raises:
            ValueError: the checkpoint's head has more than one label.
        """
        def single_score(d):
            if d.get("num_labels", len(d.get("id2label", {0: 0}))) != 1:
                raise ValueError(f"{cls.__name__}.from_pretrained: expected a single-score head (num_labels = 1)")

        return load_checkpoint(cls, path, dtype=dtype, device=device, check_config=single_score,
                               tie_word_embeddings=False)  # no lm_head here


class RewardModel(ValueModel):
    """Sequence reward: the ``score`` head read at the last valid token of each row."""

    architecture = "ForSequenceClassification"

    def forward(self, input_ids, attention_mask=None, *, return_values: bool = False, **kw):
        """``input_ids [B, T]``, ``attention_mask [B, T]`` (left or right padding) -> ``scores [B]``
        fp32 (and the per-token values ``[B, T]`` with ``return_values=True``).

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]``, 1 on valid tokens; the score is read at each row's last one
                (:func:`last_token_index`). Default: all valid, read at ``T - 1``.
            return_values: also return the per-token values the scores were read from.
            **kw: more keyword arguments of :meth:`LlamaTrunk.forward` (``position_ids``).

        Returns:
            ``scores [B]`` fp32, or ``(scores [B], values [B, T])`` with ``return_values``.
        """
        values = super().forward(input_ids, attention_mask, **kw)  # (B, T)
        if attention_mask is None:
            idx = torch.full((values.shape[0],), values.shape[1] - 1, device=values.device)
        else:
            idx = last_token_index(attention_mask)
        scores = values.gather(1, idx[:, None]).squeeze(1)  # (B,)
        return (scores, values) if return_values else scores


class PolicyWithValue(nn.Module):
    """A policy and its critic. ``value_model=None``: a :class:`ValueHead` on the policy's own
    hidden states (one trunk, one forward); otherwise a separate :class:`ValueModel`.

    Args:
        policy: the policy language model (``self.policy``).
        value_model: a separate critic (``self.value_model``); None creates a :class:`ValueHead`
            (``self.value_head``) on the policy's device and dtype instead.
    """

    def __init__(self, policy: CausalLM, value_model: ValueModel | None = None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.value_head = None
        if value_model is None:
            self.value_head = ValueHead(policy.config.hidden_size, device=policy.device, dtype=policy.dtype)

    @property
    def shared_trunk(self) -> bool:
        """True when the critic is a value head on the policy's trunk (no separate value model)."""
        return self.value_model is None

    def forward(self, input_ids, attention_mask=None, *, return_hidden: bool = False, **kw):
        """-> ``(logits [B, T, V] or hidden [B, T, C], values [B, T] fp32)``.

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]``, 1 on valid tokens (left or right padding). Default: all valid.
            return_hidden: return the policy's final-norm hidden states instead of the logits (for
                :meth:`CausalLM.token_logprobs`-style fused heads).
            **kw: more keyword arguments of :meth:`CausalLM.forward` (``position_ids``,
                ``cu_seqlens``), passed to the critic too when it is separate.

        Returns:
            ``(logits or hidden, values)``; values at padding are meaningless.
        """
        hidden = self.policy(input_ids, attention_mask, return_hidden=True, **kw)  # (B, T, C)
        if self.value_head is not None:
            values = self.value_head(hidden)
        else:
            values = self.value_model(input_ids, attention_mask, **kw)
        return (hidden if return_hidden else self.policy.logits(hidden)), values

    def save_pretrained(self, path) -> None:
        """``path/`` the policy; ``path/value_head.safetensors`` or ``path/value/`` the critic.

        Args:
            path: the directory (created if missing); the policy is saved as by
                :meth:`CausalLM.save_pretrained` (LoRA adapters merged).
        """
        path = Path(path)
        self.policy.save_pretrained(path)
        if self.value_head is not None:
            write_safetensors(path / "value_head.safetensors", self.value_head.state_dict())
        else:
            self.value_model.save_pretrained(path / "value")

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None) -> PolicyWithValue:
        """Load a directory written by :meth:`save_pretrained` (a separate critic when ``path/value/``
        exists, else the value head from ``path/value_head.safetensors``, cast to the policy's dtype).

        Args:
            path: the checkpoint directory.
            dtype: cast floating weights (default: the stored dtype).
            device: where to put the models (default CPU).

        Raises:
            FileNotFoundError: neither critic is there.
        """
        from safetensors.torch import load_file

        path = Path(path)
        policy = CausalLM.from_pretrained(path, dtype=dtype, device=device)
        if (path / "value").is_dir():
            return cls(policy, ValueModel.from_pretrained(path / "value", dtype=dtype, device=device))
        out = cls(policy)
        if not (path / "value_head.safetensors").exists():
            raise FileNotFoundError(f"PolicyWithValue: neither {path / 'value'} nor {path / 'value_head.safetensors'}")
        sd = load_file(str(path / "value_head.safetensors"))
        out.value_head.load_state_dict({k: v.to(out.policy.dtype) for k, v in sd.items()})
        return out

    @classmethod
    def with_separate_critic(cls, policy: CausalLM) -> PolicyWithValue:
        """A critic initialized from a copy of the policy's trunk (OpenRLHF / TRL's default).

        Args:
            policy: the policy; its trunk (LoRA adapters merged) seeds a new :class:`ValueModel`
                via :meth:`ValueModel.from_causal_lm`.
        """
        return cls(policy, ValueModel.from_causal_lm(policy))
