"""``fastrlhf demo``: the main job, offline, on 2 CPU cores.

* ``--task feedback`` (the default; the seeds' loop): SmolLM2-135M-Instruct with LoRA answers
  short instructions, four answers a prompt; a simulated annotator with a hidden true preference
  (friendly and concise answers, 20% of its labels flipped), the VADER judge and the LLM judge
  compare every pair of them, combined by CompositeFeedback; each round trains a reward model on
  all feedback so far and optimizes the policy with GRPO against it. The report gives the reward
  model's agreement with the true preference and the final policy's win-rate over the starting
  one under it, with 95% bootstrap intervals over the held-out prompts.
* ``--task arithmetic`` (verifiable rewards): a small model trained from scratch by SFT on
  additions ``a + b`` (a in [0, 99], b in [0, 9]) whose labels are partly wrong (70% of the answers
  that need a carry forget it), then improved by GRPO with an exact-answer reward; held-out
  accuracy (200 problems never trained on) before and after.
* ``--task all``: both.

Every number in a report is measured in that run. ``--quick`` runs both tasks on tiny settings
(for the tests).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fastrlhf.config import Config, option
from fastrlhf.data import load_rows
from fastrlhf.feedback.judges import ExactAnswerJudge
from fastrlhf.feedback.simulated import friendly_concise
from fastrlhf.generation import GenerationConfig, generate
from fastrlhf.loop import FeedbackSpec, LoopConfig, run_loop
from fastrlhf.models import CausalLM, CausalLMConfig, Tokenizer
from fastrlhf.trainers import GRPOConfig, GRPOTrainer, RewardConfig, SFTConfig, SFTTrainer


@dataclass
class DemoConfig(Config):
    """``fastrlhf demo``."""

    task: Literal["feedback", "arithmetic", "all"] = option("feedback", "feedback (the seeds' loop on SmolLM2), "
                                                            "arithmetic (verifiable rewards), or all")
    output_dir: str = option("runs/demo", "where the runs and reports go")
    quick: bool = option(False, "tiny settings (seconds to a minute or two): proves the whole pipeline runs")
    seed: int = option(0, "seed of everything")
    progress: bool = option(True, "progress bars")


# ---- task 1: the feedback loop on SmolLM2 ----------------------------------------------------


def feedback_loop_config(cfg: DemoConfig) -> LoopConfig:
    """The loop the demo runs (smaller with ``quick``)."""
    out = str(Path(cfg.output_dir) / "feedback")
    judges = ["vader@0.3"] if cfg.quick else ["vader@0.3", "llm:rate@0.3"]
    feedback = FeedbackSpec(simulated="friendly_concise", flip_prob=0.2, judges=judges, target_words=20)
    if cfg.quick:
        return LoopConfig(output_dir=out, seed=cfg.seed, rounds=1, pairs_per_round=4, eval_prompts=4,
                          max_new_tokens=8, feedback=feedback, lora_r=4, rm_layers=2, progress=cfg.progress,
                          reward_model=RewardConfig(max_steps=2, batch_size=4, eval_fraction=0.25, lora_r=0),
                          grpo=GRPOConfig(max_steps=1, prompts_per_step=2, group_size=2, learning_rate=1e-4,
                                          kl_coef=0.05))
    return LoopConfig(output_dir=out, seed=cfg.seed, rounds=4, pairs_per_round=32, answers_per_prompt=4,
                      eval_prompts=24, max_new_tokens=64, feedback=feedback, lora_r=8, rm_layers=3,
                      progress=cfg.progress,
                      reward_model=RewardConfig(max_steps=40, batch_size=16, micro_batch_size=16, learning_rate=1e-3,
                                                eval_fraction=0.1, lora_r=8),
                      grpo=GRPOConfig(max_steps=5, prompts_per_step=6, group_size=4, learning_rate=8e-4,
                                      kl_coef=0.1, micro_batch_size=12))


def run_feedback_task(cfg: DemoConfig) -> dict:
    loop_cfg = feedback_loop_config(cfg)
    t0 = time.perf_counter()
    last = run_loop(loop_cfg, resume=(Path(loop_cfg.output_dir) / "rounds.jsonl").exists())
    return {"task": "feedback", "report": str(Path(loop_cfg.output_dir) / "report.md"),
            "true_preference": f"{friendly_concise.description} (here target_words = {loop_cfg.feedback.target_words})",
            **last, "seconds": time.perf_counter() - t0}  # the whole task's time, not the last round's


# ---- task 2: arithmetic from scratch -----------------------------------------------------------


def addition_problems(seed: int, n_test: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Every ``a + b`` with a two-digit (or one-digit) ``a`` in [0, 99] and a digit ``b`` in [0, 9],
    shuffled with ``seed`` and split into (train, held-out test of ``n_test``)."""
    problems = [(a, b) for a in range(100) for b in range(10)]
    random.Random(seed).shuffle(problems)
    return problems[n_test:], problems[:n_test]


def needs_carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def noisy_answer(a: int, b: int, rng: random.Random, *, forget_carry: float) -> int:
    """The training label: a + b, except that problems with a carry forget it with probability
    ``forget_carry`` (a systematic error SFT learns and a verifiable reward can undo)."""
    if needs_carry(a, b) and rng.random() < forget_carry:
        return a + b - 10
    return a + b


def arithmetic_model(tokenizer: Tokenizer, seed: int, quick: bool) -> CausalLM:
    torch.manual_seed(seed)
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if quick else dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4)
    return CausalLM(CausalLMConfig(vocab_size=tokenizer.vocab_size, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=32, **size))


@torch.no_grad()
def arithmetic_accuracy(model, tokenizer, problems) -> dict[str, float]:
    """Greedy held-out accuracy, overall and on the problems that need a carry."""
    prompts = [f"{a}+{b}=" for a, b in problems]
    batch = tokenizer(prompts)
    out = generate(model.eval(), batch["input_ids"], batch["attention_mask"],
                   GenerationConfig(max_new_tokens=4, temperature=0.0, stop_token_ids=[tokenizer.eos_token_id]))
    answers = [tokenizer.decode(r[: int(n)]).strip() for r, n in zip(out.responses, out.response_lengths)]
    right = [ans == str(a + b) for ans, (a, b) in zip(answers, problems)]
    carry = [r for r, (a, b) in zip(right, problems) if needs_carry(a, b)]
    return {"accuracy": sum(right) / len(right), "carry_accuracy": sum(carry) / max(1, len(carry))}


def run_arithmetic_task(cfg: DemoConfig) -> dict:
    out_dir = Path(cfg.output_dir) / "arithmetic"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, test = addition_problems(cfg.seed, 200)
    rng = random.Random(cfg.seed)
    rows = [{"prompt": f"{a}+{b}=", "completion": str(noisy_answer(a, b, rng, forget_carry=0.7))} for a, b in train]
    label_accuracy = sum(int(r["completion"]) == a + b for r, (a, b) in zip(rows, train)) / len(rows)
    tok = Tokenizer.train([f"{a}+{b}={a + b}" for a, b in train], vocab_size=260)  # bytes + specials: one token a digit
    model = arithmetic_model(tok, cfg.seed, cfg.quick)
    sft = SFTConfig(output_dir=str(out_dir / "sft"), max_steps=20 if cfg.quick else 300, batch_size=128,
                    micro_batch_size=128, learning_rate=3e-3, lr_schedule="cosine", warmup_steps=20, seed=cfg.seed,
                    progress=cfg.progress, max_length=16)
    SFTTrainer(model, tok, load_rows(rows), sft).train()
    before = arithmetic_accuracy(model, tok, test)
    answers = {f"{a}+{b}=": a + b for a, b in train}
    judge = ExactAnswerJudge(lambda prompt: answers[prompt], name="exact_answer")
    grpo = GRPOConfig(output_dir=str(out_dir / "grpo"), max_steps=5 if cfg.quick else 200, prompts_per_step=32,
                      group_size=8, max_new_tokens=4, learning_rate=1e-4, kl_coef=0.0, temperature=1.0,
                      dynamic_sampling=True, micro_batch_size=128, seed=cfg.seed, progress=cfg.progress)
    GRPOTrainer(model, tok, load_rows([{"prompt": p} for p in answers]), judge, grpo).train()
    after = arithmetic_accuracy(model, tok, test)
    summary = {"task": "arithmetic", "label_accuracy": label_accuracy, "accuracy_before": before["accuracy"],
               "accuracy_after": after["accuracy"], "carry_accuracy_before": before["carry_accuracy"],
               "carry_accuracy_after": after["carry_accuracy"], "test_problems": len(test),
               "seconds": time.perf_counter() - t0}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    _arithmetic_report(out_dir, summary, sft, grpo)
    return {**summary, "report": str(out_dir / "report.md")}


def _arithmetic_report(out_dir: Path, summary: dict, sft: SFTConfig, grpo: GRPOConfig) -> None:
    from fastrlhf.report import plot_run, write_report

    for sub in ("sft", "grpo"):
        try:
            plot_run(out_dir / sub)
        except ImportError:
            pass
    write_report(out_dir / "grpo", title="fastrlhf demo: arithmetic (SFT on noisy labels, then GRPO on an exact "
                                         "answer reward)", config=grpo, summary=summary)
    (out_dir / "report.md").write_text((out_dir / "grpo" / "report.md").read_text().replace("](plots/",
                                                                                              "](grpo/plots/"))


# ---- the command -------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig, *, resume: bool = False) -> dict:
    """Run the demo task(s); prints and returns the summaries with the report paths."""
    tasks = ["feedback", "arithmetic"] if cfg.task == "all" or cfg.quick else [cfg.task]
    results = {}
    for task in tasks:
        print(f"fastrlhf demo: task {task} ...", flush=True)
        results[task] = run_feedback_task(cfg) if task == "feedback" else run_arithmetic_task(cfg)
        r = results[task]
        print(f"fastrlhf demo: task {task} done in {r['seconds']:.0f} s; report: {r['report']}", flush=True)
    _print_summary(results)
    return results


def _print_summary(results: dict) -> None:
    for task, r in results.items():
        if task == "feedback":
            print(f"  feedback: win-rate over the starting policy under the true preference: "
                  f"{_rate(r, 'win_rate')}; reward model agreement with it: {_rate(r, 'rm_true_accuracy')}; "
                  f"KL {r.get('kl', float('nan')):.3f}")
        else:
            print(f"  arithmetic: held-out accuracy {r['accuracy_before']:.0%} -> {r['accuracy_after']:.0%} "
                  f"(carry problems {r['carry_accuracy_before']:.0%} -> {r['carry_accuracy_after']:.0%})")


def _rate(r: dict, key: str) -> str:
    """``"83% (95% CI 71-92%)"`` from a summary's ``key``, ``key/low``, ``key/high``."""
    v, lo, hi = (r.get(k, float("nan")) for k in (key, f"{key}/low", f"{key}/high"))
    return f"{v:.0%}" + ("" if lo != lo or hi != hi else f" (95% CI {lo:.0%}-{hi:.0%})")
