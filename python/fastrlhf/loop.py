"""The iterative human / AI feedback loop (``fastrlhf loop``), and ``fastrlhf label``.

Each round:

1. **sample answers**: ``answers_per_prompt`` completions of ``pairs_per_round`` prompts from the
   current policy; every pair of a prompt's answers is to be labeled (with 4 answers, 6 pairs:
   InstructGPT's K-way comparisons, more labels per generated answer);
2. **collect feedback**: humans label them (``human``: in the terminal, or ``web``: a local page),
   and / or AI judges do (``feedback`` specs combined by :class:`~fastrlhf.feedback.CompositeFeedback`:
   a simulated annotator with a hidden true preference, VADER, an LLM judge, ...); every judgment
   goes into one :class:`~fastrlhf.feedback.PreferenceStore` (``RUN_DIR/feedback.jsonl``);
3. **update the reward model** on all feedback so far (it continues from the last round's);
4. **optimize the policy** against it with GRPO, PPO or online DPO (LoRA adapters continue across
   rounds; the reference is the LoRA-disabled base);
5. **evaluate** on held-out prompts: the reward model's agreement with the true preference (when a
   simulated annotator holds one), the win-rate of the policy over the starting one, the reward
   and the KL to the reference; sample generations.

``RUN_DIR/rounds.jsonl`` gets one summary per round; ``RUN_DIR/round-NN/`` the reward-model and
policy runs; at the end ``fastrlhf.report`` writes the plots and ``report.md``. ``resume``
continues after the last completed round (an interrupted round starts over).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastrlhf import ops
from fastrlhf.config import Config, ConfigError, option
from fastrlhf.data import load_rows
from fastrlhf.feedback import CompositeFeedback, PreferenceStore, SimulatedAnnotator, evaluation
from fastrlhf.feedback.judges import RewardModelJudge
from fastrlhf.feedback.labeler import LabelQueue, run_terminal_labeler, serve_web_labeler
from fastrlhf.generation import GenerationConfig
from fastrlhf.models import CausalLM, RewardModel, load_lora, lora_disabled, save_lora
from fastrlhf.runs import build_judge, load_model, prompt_text
from fastrlhf.trainers import (
    GRPOConfig,
    GRPOTrainer,
    OnlineDPOConfig,
    OnlineDPOTrainer,
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardTrainer,
)
from fastrlhf.trainers import rollout as ro
from fastrlhf.trainers.base import prepare_model
from fastrlhf.trainers.metrics import timed_into

BUILTIN_PROMPTS = "builtin:instructions"


def builtin_prompts_path() -> Path:
    """The short instructions shipped with fastrlhf (``data/builtin/instructions.jsonl``)."""
    return Path(__file__).resolve().parent / "data" / "builtin" / "instructions.jsonl"


@dataclass
class FeedbackSpec(Config):
    """Where a loop's AI feedback comes from."""

    simulated: str | None = option("friendly_concise", "the hidden true preference of a simulated annotator "
                                   "(friendly_concise), or None for no simulated annotator")
    flip_prob: float = option(0.2, "the simulated annotator's label noise: probability of a flipped label", min=0.0,
                              max=0.5)
    target_words: int = option(30, "friendly_concise: answers up to this many words are not penalized for length",
                               min=1)
    simulated_weight: float = option(1.0, "weight of the simulated annotator's labels", min=0.0)
    judges: list[str] = option(default_factory=lambda: ["vader@0.3"],
                               help="AI judge specs name[:arg][@weight] (vader, llm, length:N, minilm:TEXT, rm:DIR)")


@dataclass
class LoopConfig(Config):
    """``fastrlhf loop``: rounds of sample -> feedback -> reward model -> policy -> evaluate."""

    model: str = option("smollm2", "'smollm2' or a model directory")
    prompts: str = option(BUILTIN_PROMPTS, "prompt rows (a file with a 'prompt' field), or builtin:instructions")
    output_dir: str = option("runs/loop", "the run directory")
    seed: int = option(0, "seed of prompts, sampling and the simulated annotator")
    rounds: int = option(3, "rounds of the loop", min=1)
    pairs_per_round: int = option(32, "prompts sampled for labeling per round (answers_per_prompt answers each, "
                                  "every pair of them labeled)", min=1)
    answers_per_prompt: int = option(2, "answers sampled per labeling prompt: k answers give k * (k - 1) / 2 "
                                     "labeled pairs (InstructGPT's K-way comparisons)", min=2)
    eval_prompts: int = option(32, "held-out prompts for the win-rate and the reward model's agreement", min=1)
    eval_samples: int = option(4, "answers sampled per held-out prompt: win-rates over eval_prompts x "
                               "eval_samples^2 comparisons (each answer against each of the starting policy's), "
                               "the reward model's agreement over pairs of them (95% bootstrap intervals over "
                               "prompts)", min=2)
    max_new_tokens: int = option(48, "tokens per completion at most (pairs, evaluation, training)", min=1)
    temperature: float = option(1.0, "sampling temperature of the pairs and the policy", min=0.0, min_exclusive=True)
    chat: bool = option(True, "send string prompts through the chat template (instruct models)")
    system_prompt: str | None = option("You are a helpful assistant.", "the system turn of chat prompts (None: the "
                                       "template's default)")
    human: bool = option(False, "pause each round for human labeling (terminal, or --web)")
    web: bool = option(False, "label in a local web page instead of the terminal")
    host: str = option("127.0.0.1", "the web labeler's address (a token is required off loopback)")
    port: int = option(0, "the web labeler's port (0: a free one)", min=0)
    annotator: str = option("human", "the human annotator's name in the store")
    ai_feedback: bool = option(True, "AI judges label the pairs too (alone when human is off)")
    feedback: FeedbackSpec = option(default_factory=FeedbackSpec, help="the AI feedback")
    algorithm: Literal["grpo", "ppo", "online_dpo"] = option("grpo", "how the policy is optimized each round")
    lora_r: int = option(8, "LoRA rank of the policy (0: full fine-tuning)", min=0)
    rm_layers: int | None = option(None, "the reward model keeps the first N layers of the policy's trunk "
                                   "(cheaper; None: all)", min=1)
    reward_model: RewardConfig = option(default_factory=lambda: RewardConfig(max_steps=30, batch_size=16,
                                                                             learning_rate=1e-4, lora_r=0,
                                                                             eval_fraction=0.2),
                                        help="reward-model training per round (output_dir is set by the loop)")
    grpo: GRPOConfig = option(default_factory=lambda: GRPOConfig(max_steps=4, prompts_per_step=8, group_size=4,
                                                                 learning_rate=5e-4, kl_coef=0.05),
                              help="GRPO per round (when algorithm=grpo)")
    ppo: PPOConfig = option(default_factory=lambda: PPOConfig(max_steps=4, prompts_per_step=16, learning_rate=5e-4),
                            help="PPO per round (when algorithm=ppo)")
    dpo: OnlineDPOConfig = option(default_factory=lambda: OnlineDPOConfig(max_steps=4, prompts_per_step=16,
                                                                          learning_rate=5e-4),
                                  help="online DPO per round (when algorithm=online_dpo)")
    progress: bool = option(True, "progress bars")

    def validate(self):
        if not self.human and not self.ai_feedback:
            raise ConfigError("LoopConfig: no feedback at all: set human=true or ai_feedback=true")
        if self.ai_feedback and self.feedback.simulated is None and not self.feedback.judges:
            raise ConfigError("LoopConfig.feedback: ai_feedback needs a simulated annotator or judges")


# ---- pieces of a round ----------------------------------------------------------------------


def _prompt_list(cfg: LoopConfig) -> list:
    path = builtin_prompts_path() if cfg.prompts == BUILTIN_PROMPTS else Path(cfg.prompts)
    rows = load_rows(path)
    prompts = [r["prompt"] for r in rows]
    if cfg.chat:
        from fastrlhf.data import as_conversation

        prompts = [as_conversation(p, system=cfg.system_prompt) for p in prompts]
    if len(prompts) <= cfg.eval_prompts:
        raise ConfigError(f"LoopConfig: {path} holds {len(prompts)} prompts; eval_prompts={cfg.eval_prompts} "
                          "leaves none to train on")
    return prompts


def ai_feedback(cfg: LoopConfig, tokenizer):
    """(the judge that labels pairs, the simulated annotator or None)."""
    spec = cfg.feedback
    signals, truth = {}, None
    if spec.simulated is not None:
        from fastrlhf.feedback import simulated as sim

        preferences = {"friendly_concise": functools.partial(sim.friendly_concise, target_words=spec.target_words)}
        fn = preferences.get(spec.simulated)
        if fn is None:
            raise ConfigError(f"LoopConfig.feedback.simulated: unknown true preference {spec.simulated!r} "
                              f"(one of {sorted(preferences)})")
        fn.__name__ = spec.simulated
        truth = SimulatedAnnotator(fn, flip_prob=spec.flip_prob, seed=cfg.seed, name="annotator")
        signals["annotator"] = (truth, spec.simulated_weight)
    if spec.judges:
        judge = build_judge(spec.judges, tokenizer=tokenizer)
        if isinstance(judge, CompositeFeedback):
            signals.update(judge.signals)
        else:
            signals[judge.name] = (judge, 1.0)
    if len(signals) == 1:
        return next(iter(signals.values()))[0], truth
    return CompositeFeedback(signals), truth


def sample_answers(policy, tokenizer, prompts: list, cfg: LoopConfig, seed: int) -> ro.Rollout:
    """``answers_per_prompt`` answers to each prompt (``[P * k]``, a prompt's answers adjacent)."""
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed,
                           stop_token_ids=ro.stop_token_ids(policy, tokenizer), pad_token_id=tokenizer.pad_token_id)
    return ro.sample(policy, tokenizer, prompts, gen, group_size=cfg.answers_per_prompt)


def label_with_ai(store: PreferenceStore, judge, prompts: list, a: list[str], b: list[str]) -> dict:
    """The AI judge labels every pair ``(a[i], b[i])``; the labels go into the store (annotator ``ai``)."""
    p = judge.compare(prompts, a, b).float()
    n = 0
    for i, pi in enumerate(p.tolist()):
        if math.isnan(pi):  # a composite judge dropped a pair its signals disagree on
            continue
        choice = "tie" if pi == 0.5 else (0 if pi > 0.5 else 1)
        store.add_preference(prompts[i], [a[i], b[i]], choice, annotator="ai", meta={"source": "ai"})
        n += 1
    stats = dict(getattr(judge, "last_stats", {}) or {})
    return {"ai_labels": float(n), **{f"feedback/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}}


def label_with_humans(store: PreferenceStore, prompts: list, a: list[str], b: list[str], cfg: LoopConfig,
                      round_dir: Path) -> dict:
    """Pause for labeling the pairs ``(a[i], b[i])`` in the terminal or a local web page (Ctrl-C
    ends the loop; labels so far are kept)."""
    items = list(zip(prompts, a, b))
    (round_dir / "items.jsonl").write_text("".join(json.dumps({"prompt": p, "completion_a": a, "completion_b": b})
                                                   + "\n" for p, a, b in items))
    queue = LabelQueue.from_tuples(items)
    if not cfg.web:
        out = run_terminal_labeler(store, queue, annotator=cfg.annotator)
        return {"human_labels": float(out.get("preference", 0))}
    labeler = serve_web_labeler(store, queue, host=cfg.host, port=cfg.port, block=False)
    keys = {queue.get(i).key for i in range(len(queue))}
    try:
        while True:
            labeled = {r.get("item") for r in store.preferences()} & keys
            if len(labeled) >= len(keys):
                break
            time.sleep(1.0)
    finally:
        labeler.stop()
    return {"human_labels": float(len(keys))}


def eval_answers(policy, tokenizer, prompts: list, cfg: LoopConfig) -> ro.Rollout:
    """``eval_samples`` answers to each held-out prompt (``[P * eval_samples]``, a prompt's answers
    adjacent). Every round draws with the same seed, so rounds differ by the policy only."""
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed + 1,
                           stop_token_ids=ro.stop_token_ids(policy, tokenizer), pad_token_id=tokenizer.pad_token_id)
    return ro.sample(policy, tokenizer, prompts, gen, group_size=cfg.eval_samples)


def answer_pairs(answers: ro.Rollout, k: int, *, every: bool = False) -> tuple[list, list[str], list[str]]:
    """(prompts, a, b) from ``k`` adjacent answers a prompt: answers ``2j`` and ``2j + 1`` as a pair
    (``k // 2`` disjoint pairs a prompt), or with ``every`` all ``k * (k - 1) / 2`` pairs."""
    pairs = list(itertools.combinations(range(k), 2)) if every else [(j, j + 1) for j in range(0, k - 1, 2)]
    prompts, a, b = [], [], []
    for start in range(0, len(answers.prompts), k):
        for i, j in pairs:
            prompts.append(answers.prompts[start + i])
            a.append(answers.completions[start + i])
            b.append(answers.completions[start + j])
    return prompts, a, b


def policy_kl(policy, rollout: ro.Rollout, temperature: float) -> float:
    """Mean per-token k1 KL of the policy's samples to the LoRA-disabled base: the log-probs
    recorded while sampling against one forward of the base (no second forward of the policy)."""
    with lora_disabled(policy):
        ref = ro.response_logprobs(policy, rollout, temperature=temperature)
    m = rollout.response_mask
    return float((ops.kl_penalty(rollout.logprobs * m, ref) * m).sum() / m.sum().clamp(min=1))


# ---- the loop ---------------------------------------------------------------------------------


def _policy_trainer(cfg: LoopConfig, policy, tokenizer, prompts, judge, out_dir: Path):
    common = dict(output_dir=str(out_dir), max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                  lora_r=cfg.lora_r, progress=cfg.progress, seed=cfg.seed, reference="lora_base" if cfg.lora_r
                  else "copy", save_model=not cfg.lora_r)  # with LoRA the round keeps its adapters only
    rows = [{"prompt": p} for p in prompts]
    if cfg.algorithm == "grpo":
        return GRPOTrainer(policy, tokenizer, load_rows(rows), judge, cfg.grpo.replace(**common))
    if cfg.algorithm == "ppo":
        return PPOTrainer(policy, tokenizer, load_rows(rows), judge, cfg.ppo.replace(**common))
    return OnlineDPOTrainer(policy, tokenizer, load_rows(rows), judge, cfg.dpo.replace(**common))


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _done_rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_loop(cfg: LoopConfig, *, resume: bool = False) -> dict:
    """Run the loop (see the module doc). Returns the last round's summary."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(run_dir / "config.yaml")
    done = _done_rounds(run_dir) if resume else []
    if not resume and (run_dir / "rounds.jsonl").exists():
        raise ConfigError(f"LoopConfig.output_dir {run_dir} holds a finished loop; pass --resume or another "
                          "output_dir")
    policy, tok = load_model(cfg.model)
    if cfg.lora_r:
        prepare_model(policy, cfg.grpo.replace(lora_r=cfg.lora_r))
    prompts = _prompt_list(cfg)
    rng = random.Random(cfg.seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    eval_prompts = [prompts[i] for i in order[: cfg.eval_prompts]]
    train_prompts = [prompts[i] for i in order[cfg.eval_prompts:]]
    store = PreferenceStore(run_dir / "feedback.jsonl")
    judge, truth = ai_feedback(cfg, tok) if cfg.ai_feedback else (None, None)
    base_eval = eval_answers(policy, tok, eval_prompts, cfg)  # the starting policy's answers [P * k]
    k = cfg.eval_samples
    (run_dir / "samples_before.json").write_text(json.dumps(
        [{"prompt": prompt_text(p), "completion": c} for p, c in zip(base_eval.prompts, base_eval.completions)],
        indent=1))
    current = base_eval  # the answers of the policy as it enters the round
    rm = None
    if done:  # continue after the last completed round
        last = run_dir / f"round-{len(done):02d}"
        if cfg.lora_r:
            load_lora(policy, last / "policy_adapters")
        else:  # full fine-tuning: the round's policy run saved the whole model
            policy.load_state_dict(CausalLM.from_pretrained(last / "policy" / "model").state_dict())
        rm = RewardModel.from_pretrained(last / "reward_model" / "model")
        current = eval_answers(policy, tok, eval_prompts, cfg)
    summary = done[-1] if done else {}
    for r in range(len(done) + 1, cfg.rounds + 1):
        t0 = time.perf_counter()
        summary = {"round": r}
        timer = functools.partial(timed_into, summary)  # where the round's time goes: seconds/<phase>
        round_dir = run_dir / f"round-{r:02d}"
        round_dir.mkdir(exist_ok=True)
        batch = [train_prompts[(r * cfg.pairs_per_round + i) % len(train_prompts)] for i in range(cfg.pairs_per_round)]
        with timer("seconds/sample"):
            answers = sample_answers(policy, tok, batch, cfg, seed=cfg.seed * 1000 + r)
        pairs = answer_pairs(answers, cfg.answers_per_prompt, every=True)
        if cfg.human:
            with timer("seconds/human"):
                summary.update(label_with_humans(store, *pairs, cfg, round_dir))
        if judge is not None:
            with timer("seconds/label"):
                summary.update(label_with_ai(store, judge, *pairs))
        rows = store.to_rows()
        summary["feedback_pairs"] = float(len(rows))
        if len(rows) < 2:
            raise ConfigError(f"loop round {r}: {len(rows)} usable preference pair(s) so far (ties and pairs the "
                              "judges disagree on are not used); raise pairs_per_round or use judges that separate "
                              "the completions")
        if truth is not None:  # how noisy the collected labels are, measured against the hidden truth
            summary["label_accuracy"] = _label_accuracy(store, truth)
        if rm is None:
            rm = RewardModel.from_causal_lm(policy, num_layers=cfg.rm_layers)  # the policy's trunk (adapters merged)
        rm_cfg = cfg.reward_model.replace(output_dir=str(round_dir / "reward_model"), progress=cfg.progress,
                                          seed=cfg.seed + r)
        with timer("seconds/reward_model"):
            rm_out = RewardTrainer(rm, tok, rows, rm_cfg).train()
        summary["rm_accuracy"] = rm_out.get("eval/accuracy", float("nan"))
        rm.eval()
        rm_judge = RewardModelJudge(rm, tok)
        if truth is not None:  # on pairs of the policy's own answers, as the round's labels are
            summary.update(evaluation.agreement(rm_judge, truth, *answer_pairs(current, k, every=True),
                                                seed=cfg.seed).as_metrics("rm_true_accuracy"))
        with timer("seconds/policy"):
            trainer = _policy_trainer(cfg, policy, tok, train_prompts, rm_judge, round_dir / "policy")
            last = trainer.train()
        summary["train_reward"] = last.get("reward", float("nan"))
        if cfg.lora_r:
            save_lora(policy, round_dir / "policy_adapters")
        with timer("seconds/evaluate"):
            now = eval_answers(policy, tok, eval_prompts, cfg)
            summary["reward"] = float(rm_judge.score(now.prompts, now.completions).mean())
            summary["kl"] = policy_kl(policy, now, cfg.temperature) if cfg.lora_r else float("nan")
        summary["response_length"] = float(now.response_lengths.float().mean())
        compared = (now.prompts, now.completions, base_eval.completions)
        if truth is not None:
            summary.update(evaluation.win_rate(truth, *compared, samples=k, seed=cfg.seed).as_metrics("win_rate"))
            summary["true_utility"] = float(truth.utility(now.prompts, now.completions).mean())
            summary["true_utility_start"] = float(truth.utility(base_eval.prompts, base_eval.completions).mean())
        summary.update(evaluation.win_rate(rm_judge, *compared, samples=k, seed=cfg.seed).as_metrics("win_rate_rm"))
        current = now
        summary["seconds"] = time.perf_counter() - t0
        (round_dir / "samples.json").write_text(json.dumps(
            [{"prompt": prompt_text(p), "before": b, "after": a}
             for p, b, a in zip(now.prompts[::k], base_eval.completions[::k], now.completions[::k])], indent=1))
        _append_jsonl(run_dir / "rounds.jsonl", summary)
    _finish(run_dir, cfg, summary)
    return summary


def _label_accuracy(store: PreferenceStore, truth: SimulatedAnnotator) -> float:
    rows = store.to_rows().rows
    if not rows:
        return float("nan")
    tc = truth.utility([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    tr = truth.utility([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    keep = tc != tr
    return float((tc > tr)[keep].float().mean()) if bool(keep.any()) else float("nan")


def _finish(run_dir: Path, cfg: Config, summary: dict) -> None:
    """samples.json (the last round's before / after), plots and report.md."""
    from fastrlhf.report import plot_run, write_report

    rounds = sorted(run_dir.glob("round-*/samples.json"))
    if rounds:
        (run_dir / "samples.json").write_text(rounds[-1].read_text())
    try:
        plot_run(run_dir)
    except ImportError as e:  # matplotlib missing: the report says so
        print(f"fastrlhf loop: no plots ({e})")
    write_report(run_dir, title="fastrlhf loop", config=cfg, summary={k: v for k, v in summary.items()
                                                                       if isinstance(v, (int, float))})


# ---- fastrlhf label ------------------------------------------------------------------------


@dataclass
class LabelConfig(Config):
    """``fastrlhf label``: label pairs (or rate completions) into a PreferenceStore."""

    store: str = option("feedback.jsonl", "the PreferenceStore file (created if missing)")
    items: str = option("", "what to label: rows with prompt + completion_a / completion_b, preference rows, or "
                        "prompt + completion rows (rate mode)")
    mode: Literal["compare", "rate"] = option("compare", "compare two completions, or rate one 1-5")
    annotator: str = option("human", "your name in the store (hashed unless hash_annotators is false)")
    hash_annotators: bool = option(True, "store a salted hash of the annotator name")
    web: bool = option(False, "serve a local web page instead of the terminal screen")
    host: str = option("127.0.0.1", "the web page's address (off loopback a token is required)")
    port: int = option(0, "the web page's port (0: a free one)", min=0)
    token: str | None = option(None, "the web access token (default: a random one off loopback)")
    seed: int = option(0, "seed of the order in which a preference row's answers are shown")


def run_label(cfg: LabelConfig, *, resume: bool = False) -> dict:
    """Label ``items`` into ``store`` (resuming where this annotator stopped is automatic)."""
    from fastrlhf.feedback.labeler import load_items

    if not cfg.items:
        raise ConfigError("label: items is required (--items FILE)")
    if not Path(cfg.items).exists():
        raise ConfigError(f"label: items {cfg.items!r}: no such file")
    store = PreferenceStore(cfg.store, hash_annotators=cfg.hash_annotators)
    queue = load_items(cfg.items, mode=cfg.mode, seed=cfg.seed)
    if cfg.web:
        serve_web_labeler(store, queue, host=cfg.host, port=cfg.port, token=cfg.token, mode=cfg.mode)
        return {}
    return run_terminal_labeler(store, queue, annotator=cfg.annotator, mode=cfg.mode)
