"""One call per CLI training command: a run config (a trainer's config plus the model, the data and
the feedback to use) -> load everything -> train -> save. ``fastrlhf sft|rm|ppo|grpo|dpo`` are
these functions; they are as usable from Python.

Models are named by ``model``: ``smollm2`` (the packaged SmolLM2-135M-Instruct, see
:func:`fastrlhf.models.load_smollm2`) or a directory (ours or a Hugging Face Llama / Mistral /
Qwen2 checkpoint with its tokenizer). Judges for PPO / GRPO / online DPO are named by specs (see
:func:`build_judge`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastrlhf.config import ConfigError, option
from fastrlhf.data import load_rows
from fastrlhf.feedback import CallableJudge, CompositeFeedback, Judge
from fastrlhf.models import CausalLM, RewardModel, Tokenizer
from fastrlhf.trainers import (
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(spec: str, *, dtype: str = "float32") -> tuple[CausalLM, Tokenizer]:
    """``smollm2`` or a checkpoint directory -> ``(CausalLM, Tokenizer)``.

    Args:
        spec: ``"smollm2"`` or a directory holding ``config.json``, safetensors weights and
            ``tokenizer.json``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if spec == "smollm2":
        from fastrlhf.models import load_smollm2

        return load_smollm2(dtype=DTYPES[dtype])
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"model {spec!r}: not 'smollm2' and not a directory")
    return CausalLM.from_pretrained(path, dtype=DTYPES[dtype]), Tokenizer.from_pretrained(path)


def build_judge(specs: list[str], *, tokenizer=None) -> Judge:
    """Judges from ``name[:argument][@weight]`` specs; several become a :class:`CompositeFeedback`.

    ====================  ===========================================================
    ``rm:DIR``            a reward model saved by ``fastrlhf rm`` (scores normalized)
    ``vader``             VADER sentiment of the completion
    ``length:N``          closeness to N words
    ``minilm[:TEXT]``     MiniLM similarity to TEXT, or (no TEXT) to the prompt itself
    ``llm[:MODE]``        SmolLM2-135M-Instruct as a judge (likelihood, rate, compare)
    ``friendly_concise``  the demo's hidden preference, as a score
    ====================  ===========================================================

    Args:
        specs: the judge specs (``["rm:runs/rm/model@1.0", "vader@0.5"]``).
        tokenizer: the policy's tokenizer (for a reward model trained on the same trunk).
    """
    from fastrlhf.feedback.judges import EmbeddingJudge, LengthJudge, LLMJudge, RewardModelJudge, VaderJudge
    from fastrlhf.feedback.simulated import friendly_concise

    if not specs:
        raise ConfigError("judges: give at least one judge spec (e.g. rm:runs/rm/model)")
    signals = {}
    for spec in specs:
        body, _, weight = spec.partition("@")
        name, _, arg = body.partition(":")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"judge spec {spec!r}: the weight after @ must be a number") from None
        if name == "rm":
            if not arg:
                raise ConfigError(f"judge spec {spec!r}: rm needs a directory (rm:DIR)")
            rm = RewardModel.from_pretrained(arg)
            tok = Tokenizer.from_pretrained(arg) if (Path(arg) / "tokenizer.json").exists() else tokenizer
            judge = RewardModelJudge(rm, tok)
        elif name == "vader":
            judge = VaderJudge()
        elif name == "length":
            if arg and not arg.isdigit():
                raise ConfigError(f"judge spec {spec!r}: length takes a whole number of words (length:30)")
            judge = LengthJudge(int(arg or 30))
        elif name == "minilm":
            # measured on 40 friendly / rude pairs: similarity to the question ranks the helpful answer first
            # 29 times, to a description of a friendly answer the rude one first 32 times
            judge = EmbeddingJudge(target=arg) if arg else EmbeddingJudge(reference=prompt_text)
        elif name == "llm":
            judge = LLMJudge(mode=arg or "likelihood")
        elif name == "friendly_concise":
            judge = CallableJudge(friendly_concise, name="friendly_concise")
        else:
            raise ConfigError(f"judge spec {spec!r}: unknown judge {name!r} (rm, vader, length, minilm, llm, "
                              "friendly_concise)")
        signals[name if name not in signals else f"{name}{len(signals)}"] = (judge, w)
    if len(signals) == 1 and next(iter(signals.values()))[1] == 1.0:
        return next(iter(signals.values()))[0]
    return CompositeFeedback(signals)


def prompt_text(prompt) -> str:
    """A prompt's user request (a conversation's last user turn)."""
    if isinstance(prompt, list):
        return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")
    return str(prompt)


@dataclass
class ModelData:
    """The fields every run command adds to its trainer's config."""

    model: str = option("smollm2", "'smollm2' or a model directory (ours or a Hugging Face Llama/Mistral/Qwen2)")
    dtype: str = option("float32", "model dtype: float32, bfloat16 or float16")
    data: str = option("", "training rows: a .jsonl/.json/.parquet file or a dataset directory")


def _need(path: str, what: str) -> str:
    if not path:
        raise ConfigError(f"{what} is required (--{what} PATH)")
    if not Path(path).exists():
        raise ConfigError(f"{what} {path!r}: no such file or directory")
    return path


@dataclass
class SFTRun(SFTConfig, ModelData):
    """``fastrlhf sft``: supervised fine-tuning."""


@dataclass
class RewardRun(RewardConfig, ModelData):
    """``fastrlhf rm``: train a reward model whose trunk is ``model``'s."""


@dataclass
class DPORun(DPOConfig, ModelData):
    """``fastrlhf dpo``: DPO / IPO / hinge on preference rows."""


@dataclass
class RLRunFields:
    """The judges of the RL commands."""

    judges: list[str] = option(default_factory=lambda: ["rm:runs/rm/model"],
                               help="judge specs name[:arg][@weight]: rm:DIR, vader, length:N, minilm:TEXT, llm, "
                                    "friendly_concise")


@dataclass
class PPORun(PPOConfig, RLRunFields, ModelData):
    """``fastrlhf ppo``: PPO against judges."""


@dataclass
class GRPORun(GRPOConfig, RLRunFields, ModelData):
    """``fastrlhf grpo``: GRPO / Dr. GRPO / RLOO / REINFORCE++ against judges."""


def run_sft(cfg: SFTRun, *, resume: bool = False) -> dict:
    """Load, train with :class:`~fastrlhf.trainers.SFTTrainer`, save ``output_dir/model``."""
    model, tok = load_model(cfg.model, dtype=cfg.dtype)
    return SFTTrainer(model, tok, load_rows(_need(cfg.data, "data")), cfg).train(resume=resume)


def run_reward(cfg: RewardRun, *, resume: bool = False) -> dict:
    """A reward model on ``model``'s trunk, trained on ``data``; saved with its tokenizer."""
    lm, tok = load_model(cfg.model, dtype=cfg.dtype)
    trainer = RewardTrainer(RewardModel.from_causal_lm(lm), tok, load_rows(_need(cfg.data, "data")), cfg)
    return trainer.train(resume=resume)


def run_dpo(cfg: DPORun, *, resume: bool = False) -> dict:
    """DPO on preference rows; the policy saved to ``output_dir/model``."""
    model, tok = load_model(cfg.model, dtype=cfg.dtype)
    trainer = DPOTrainer(model, tok, load_rows(_need(cfg.data, "data")), cfg)
    return trainer.train(resume=resume)


def _run_rl(cfg, trainer_cls, resume: bool) -> dict:
    """Load the policy, train ``trainer_cls`` against ``cfg.judges`` on the prompts of ``data``,
    save the policy."""
    model, tok = load_model(cfg.model, dtype=cfg.dtype)
    judge = build_judge(cfg.judges, tokenizer=tok)
    return trainer_cls(model, tok, load_rows(_need(cfg.data, "data")), judge, cfg).train(resume=resume)


def run_ppo(cfg: PPORun, *, resume: bool = False) -> dict:
    """PPO against ``judges`` on the prompts of ``data``."""
    return _run_rl(cfg, PPOTrainer, resume)


def run_grpo(cfg: GRPORun, *, resume: bool = False) -> dict:
    """GRPO-family training against ``judges`` on the prompts of ``data``."""
    return _run_rl(cfg, GRPOTrainer, resume)

