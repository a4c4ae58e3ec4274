"""rl_step: one GRPO step and one PPO step end to end (generate + score + reference + train) with
fastrlhf's trainers vs the same steps written in plain PyTorch + transformers, as simple RLHF
scripts write them (transformers' ``generate``, ``log_softmax(logits)`` + ``gather`` for every
log-prob, the eager GRPO / PPO losses, TRL's per-timestep Python GAE loop, AdamW). Same weights
(a random ~16M-parameter Llama built with ``CausalLM`` and converted with ``to_hf()``), same
prompts, same rule reward, same sampling (temperature 1, no top-k / top-p, no stop token: every
completion has exactly max_new_tokens), same micro-batches, forward passes and optimizer steps.

Per step: GRPO 16 prompts x 4 completions, PPO 16 prompts (shared value head, 2 epochs x 2
mini-batches), 128 new tokens, fp32, full fine-tuning (LoRA off) with a frozen reference copy.
Reports the step time and its split (generate / score / reference / train) per provider,
providers round robin (one step of each per round after a warm-up step each), median of rounds.
The trainers and models persist across rounds (steady state: optimizer state allocated, the
weights drift by a 1e-6 learning rate, which changes no cost since every length is fixed).
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import sys
import tempfile
import time

import torch

from fastrlhf.feedback import CallableJudge
from fastrlhf.models import CausalLM, CausalLMConfig, Tokenizer
from fastrlhf.trainers import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer

import _harness as H

# ~16M parameters (as bench/generate.py): 6 layers, hidden 384, 6 heads (D = 64), 2 kv heads, SwiGLU 1024
MODEL = dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=512)
QUICK_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128)
PHASES = ("generate", "score", "reference", "train")


# ---- shared inputs: tokenizer, prompts, reward ----------------------------------------------------------------


def synthetic_corpus(seed: int = 0, n_words: int = 6000, n_lines: int = 8000):
    """Lines of random lowercase words with Zipf-like frequencies (each line < 255 characters)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(n_words)]
    weights = [1.0 / (i + 1) ** 0.8 for i in range(n_words)]
    return words, weights, [" ".join(rng.choices(words, weights, k=15)) for _ in range(n_lines)]


def make_prompts(tok, words, weights, n: int, lo: int, hi: int, seed: int = 1) -> list[str]:
    """``n`` prompts of ``lo``..``hi`` tokens (mixed lengths: the batch is left-padded)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        target = lo + (hi - lo) * i // max(1, n - 1)
        text = rng.choice(words)
        while len(tok.encode(text + " w")) <= target:
            text += " " + rng.choices(words, weights)[0]
        prompts.append(text)
    return prompts


def vowel_rate(prompt, completion) -> float:
    """The rule reward: the fraction of vowels in the completion (cheap, the same for both providers)."""
    return sum(c in "aeiou" for c in completion) / max(1, len(completion))


# ---- the plain PyTorch + transformers provider ---------------------------------------------------------------


class Plain:
    """One RL algorithm written as plain PyTorch + transformers scripts write it."""

    def __init__(self, hf_model, tok, prompts, judge, cfg, *, value_head=None):
        self.model, self.tok, self.prompts, self.judge, self.cfg = hf_model, tok, prompts, judge, cfg
        self.ref = copy.deepcopy(hf_model).eval().requires_grad_(False)
        self.v_head = value_head
        params = list(hf_model.parameters()) + ([] if value_head is None else list(value_head.parameters()))
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                     eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        G = getattr(cfg, "group_size", 1)
        self.rep = [p for p in prompts for _ in range(G)]
        ids = [tok.encode(p) for p in self.rep]
        P = max(map(len, ids))
        pad = tok.pad_token_id
        self.input_ids = torch.tensor([[pad] * (P - len(x)) + x for x in ids])
        self.prompt_mask = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in ids])
        self.P = P

    def generate(self):
        N = self.cfg.max_new_tokens
        self.model.eval()
        seqs = self.model.generate(input_ids=self.input_ids, attention_mask=self.prompt_mask, do_sample=True, top_k=0,
                                   top_p=1.0, temperature=self.cfg.temperature, max_new_tokens=N, min_new_tokens=N,
                                   pad_token_id=self.tok.pad_token_id)
        self.model.train()
        attn = torch.cat([self.prompt_mask, torch.ones_like(seqs[:, self.P:])], 1)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        resp_mask = torch.ones(seqs.shape[0], seqs.shape[1] - self.P)  # no stop token: every token counts
        completions = self.tok.batch_decode(seqs[:, self.P:].tolist())  # as fastrlhf's rollout, inside "generate"
        return seqs, attn, pos, resp_mask, completions

    def logprobs(self, model, seqs, attn, pos):
        """log_softmax over the full logits, then gather the response tokens."""
        logits = model(input_ids=seqs, attention_mask=attn, position_ids=pos).logits
        logits = logits[:, self.P - 1:-1] / self.cfg.temperature
        return torch.log_softmax(logits, -1).gather(-1, seqs[:, self.P:, None]).squeeze(-1)

    def logprobs_values(self, seqs, attn, pos):
        """The shared trunk once: hidden -> LM head (log-probs) and value head."""
        h = self.model.model(input_ids=seqs, attention_mask=attn, position_ids=pos).last_hidden_state
        logits = self.model.lm_head(h)[:, self.P - 1:-1] / self.cfg.temperature
        lp = torch.log_softmax(logits, -1).gather(-1, seqs[:, self.P:, None]).squeeze(-1)
        return lp, self.v_head(h).squeeze(-1)[:, self.P - 1:-1]

    def micro(self, n):
        m = self.cfg.micro_batch_size
        return [slice(i, min(i + m, n)) for i in range(0, n, m)]

    def reference(self, seqs, attn, pos):
        with torch.no_grad():
            return torch.cat([self.logprobs(self.ref, seqs[s], attn[s], pos[s]) for s in self.micro(seqs.shape[0])])

    def optimizer_step(self):
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    def step(self) -> tuple[dict, dict]:
        t, t0 = {}, time.perf_counter()
        with torch.no_grad():
            seqs, attn, pos, mask, completions = self.generate()
        t["generate"], t0 = time.perf_counter() - t0, time.perf_counter()
        scores = self.judge.score(self.rep, completions)
        t["score"], t0 = time.perf_counter() - t0, time.perf_counter()
        ref = self.reference(seqs, attn, pos)
        t["reference"], t0 = time.perf_counter() - t0, time.perf_counter()
        metrics = self.train(seqs, attn, pos, mask, scores, ref)
        t["train"] = time.perf_counter() - t0
        metrics["reward"] = float(scores.mean())
        return t, metrics


class PlainGRPO(Plain):
    def train(self, seqs, attn, pos, mask, scores, ref):
        cfg, G = self.cfg, self.cfg.group_size
        grouped = scores.view(-1, G)
        mean = grouped.mean(1).repeat_interleave(G)
        std = grouped.std(1).repeat_interleave(G)
        adv = ((scores - mean) / (std + 1e-4))[:, None]
        n_tokens = mask.sum()
        for s in self.micro(seqs.shape[0]):
            lp = self.logprobs(self.model, seqs[s], attn[s], pos[s])
            old = lp.detach()  # one iteration per rollout: the old policy is this one (as TRL's GRPOTrainer)
            ratio = torch.exp(lp - old)
            pg = torch.max(-adv[s] * ratio, -adv[s] * torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_low))
            d = ref[s] - lp
            kl = torch.exp(d) - d - 1  # k3
            loss = ((pg + cfg.kl_coef * kl) * mask[s]).sum() / n_tokens
            loss.backward()
        return {"grad_norm": self.optimizer_step()}


class PlainPPO(Plain):
    def train(self, seqs, attn, pos, mask, scores, ref):
        cfg = self.cfg
        B, L = mask.shape
        with torch.no_grad():  # old log-probs and values: one forward of the policy + value head
            old, values = map(torch.cat, zip(*[self.logprobs_values(seqs[s], attn[s], pos[s])
                                               for s in self.micro(B)]))
        rewards = -cfg.kl_coef * (old - ref)
        rewards[:, -1] += scores  # the last response token (every row has L tokens)
        lastgaelam, reversed_adv = 0.0, []
        for t in reversed(range(L)):  # TRL's PPOTrainer.compute_advantages
            nextvalues = values[:, t + 1] if t < L - 1 else 0.0
            delta = rewards[:, t] + cfg.gamma * nextvalues - values[:, t]
            lastgaelam = delta + cfg.gamma * cfg.lam * lastgaelam
            reversed_adv.append(lastgaelam)
        adv = torch.stack(reversed_adv[::-1]).transpose(0, 1)
        returns = adv + values
        m = (adv * mask).sum() / mask.sum()
        var = (((adv - m) ** 2) * mask).sum() / (mask.sum() - 1)
        adv = (adv - m) * torch.rsqrt(var + 1e-8)  # masked whiten
        stats = {"grad_norm": 0.0, "value_loss": 0.0}
        n_updates = 0
        for _ in range(cfg.epochs):
            for mb in torch.tensor_split(torch.randperm(B), cfg.num_minibatches):
                n_tok = mask[mb].sum()
                for s in self.micro(mb.numel()):
                    r = mb[s]
                    lp, v = self.logprobs_values(seqs[r], attn[r], pos[r])
                    ratio = torch.exp(lp - old[r])
                    pg = torch.max(-adv[r] * ratio, -adv[r] * torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_low))
                    pg_loss = (pg * mask[r]).sum() / n_tok
                    v_clip = torch.clamp(v, values[r] - cfg.value_clip, values[r] + cfg.value_clip)
                    vf = 0.5 * torch.max((v - returns[r]) ** 2, (v_clip - returns[r]) ** 2)
                    vf_loss = (vf * mask[r]).sum() / n_tok
                    (pg_loss + cfg.vf_coef * vf_loss).backward()
                    stats["value_loss"] += vf_loss.item()
                stats["grad_norm"] += self.optimizer_step()
                n_updates += 1
        return {k: v / n_updates for k, v in stats.items()}


# ---- the fastrlhf provider ------------------------------------------------------------------------------------


def fastrlhf_step(trainer) -> tuple[dict, dict]:
    """What ``Trainer.train`` does around one ``train_step`` (no metrics files, no guardrails)."""
    trainer.timings = {}
    for m in trainer.modules.values():
        m.train()
    metrics = trainer.train_step()
    trainer.step += 1
    return dict(trainer.timings), metrics


# ---- the bench ------------------------------------------------------------------------------------------------


def check_similar(name: str, a: dict, b: dict) -> str:
    """Both providers' first-step metrics are finite and of similar magnitude (not the same samples)."""
    keys = [k for k in ("reward", "grad_norm", "value_loss") if k in a and k in b]
    parts = []
    for k in keys:
        x, y = float(a[k]), float(b[k])
        if not (math.isfinite(x) and math.isfinite(y)):
            raise AssertionError(f"{name}: {k} not finite: fastrlhf {x}, plain {y}")
        if not (abs(x) <= 10 * abs(y) + 1e-6 and abs(y) <= 10 * abs(x) + 1e-6):
            raise AssertionError(f"{name}: {k} differs by more than 10x: fastrlhf {x:.4g}, plain {y:.4g}")
        parts.append(f"{k} {x:.4g} vs {y:.4g}")
    return ", ".join(parts)


def main(argv=None) -> dict:
    p = H.parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    try:
        import transformers
    except ImportError:
        p.error("bench/rl_step.py needs transformers (pip install 'fastrlhf[hf]')")
    if args.device != "cpu":
        p.error("bench/rl_step.py: the plain provider and this comparison are set up for --device cpu")
    quick = args.quick
    n_prompts, G, N = (4, 4, 8) if quick else (16, 4, 128)
    p_lo, p_hi = (6, 12) if quick else (32, 64)
    repeat = args.repeat or (2 if quick else 3)

    torch.manual_seed(0)
    words, weights, corpus = synthetic_corpus(n_lines=1000 if quick else 8000)
    tok = Tokenizer.train(corpus, vocab_size=(QUICK_MODEL if quick else MODEL)["vocab_size"])
    model_cfg = dict(QUICK_MODEL if quick else MODEL, vocab_size=tok.vocab_size)
    base = CausalLM(CausalLMConfig(**model_cfg))
    n_params = base.num_parameters()
    matmul_params = n_params - model_cfg["vocab_size"] * model_cfg["hidden_size"]  # the embedding is a lookup
    print(f"model: {n_params:,} parameters ({n_params / 1e6:.1f}M; {matmul_params / 1e6:.1f}M in matmuls), "
          f"vocab {tok.vocab_size}")
    prompts = make_prompts(tok, words, weights, n_prompts, p_lo, p_hi)
    judge = CallableJudge(vowel_rate, name="vowel_rate")
    run_dir = tempfile.mkdtemp(prefix="rl_step_")
    common = dict(output_dir=run_dir, max_steps=1000, learning_rate=1e-6, prompts_per_step=n_prompts,
                  max_new_tokens=N, temperature=1.0, top_p=1.0, top_k=0, micro_batch_size=8, lora_r=0,
                  progress=False, tensorboard=False)
    grpo_cfg = GRPOConfig(**common, group_size=G, kl_coef=0.04)
    ppo_cfg = PPOConfig(**common, kl_coef=0.05, critic="shared")

    rows_in = [{"prompt": q} for q in prompts]  # exactly one step's prompts: every step sees the same lengths
    grpo = GRPOTrainer(copy.deepcopy(base), tok, rows_in, judge, grpo_cfg)
    ppo = PPOTrainer(copy.deepcopy(base), tok, rows_in, judge, ppo_cfg)
    for tr in (grpo, ppo):
        tr.gen_config.stop_token_ids = []  # no stop token: every completion has N tokens, as the plain provider
    v_head = torch.nn.Linear(model_cfg["hidden_size"], 1)
    v_head.load_state_dict(ppo.pv.value_head.proj.state_dict())  # the same initial critic
    plain_grpo = PlainGRPO(base.to_hf().train(), tok, prompts, judge, grpo_cfg)
    plain_ppo = PlainPPO(base.to_hf().train(), tok, prompts, judge, ppo_cfg, value_head=v_head)
    P = plain_grpo.P

    calls: dict[str, list[tuple[dict, dict]]] = {}

    def recorded(name, fn):
        calls[name] = []
        return lambda: calls[name].append(fn())

    providers = {
        ("grpo", "fastrlhf"): recorded("grpo/fastrlhf", lambda: fastrlhf_step(grpo)),
        ("grpo", "plain"): recorded("grpo/plain", plain_grpo.step),
        ("ppo", "fastrlhf"): recorded("ppo/fastrlhf", lambda: fastrlhf_step(ppo)),
        ("ppo", "plain"): recorded("ppo/plain", plain_ppo.step),
    }
    mm = H.matmul_gflops(args.device, quick=quick)
    bw = H.measure_bandwidth(args.device, quick=quick)
    times = H.time_round_robin({f"{a}/{prov}": fn for (a, prov), fn in providers.items()}, args.device,
                               repeat=repeat)
    checks = {a: check_similar(a, calls[f"{a}/fastrlhf"][0][1], calls[f"{a}/plain"][0][1]) for a in ("grpo", "ppo")}
    for name, cs in calls.items():
        for _, m in cs:
            for k in ("grad_norm", "value_loss", "loss"):
                if k in m and not math.isfinite(float(m[k])):
                    raise AssertionError(f"{name}: {k} = {m[k]} after the warm-up step")

    # nominal model FLOPs (2 x matmul params per token per forward, 3x for forward + backward; attention left out)
    T = P + N
    grpo_rows, ppo_rows = n_prompts * G, n_prompts
    fwd = lambda rows, tokens: 2.0 * matmul_params * rows * tokens  # noqa: E731
    flops = {
        "grpo": {"generate": fwd(grpo_rows, T), "reference": fwd(grpo_rows, T), "train": 3 * fwd(grpo_rows, T)},
        "ppo": {"generate": fwd(ppo_rows, T), "reference": fwd(ppo_rows, T),
                "train": fwd(ppo_rows, T) + ppo_cfg.epochs * 3 * fwd(ppo_rows, T)},  # old lp / values + updates
    }
    rows: list[H.Row] = []
    for algo in ("grpo", "ppo"):
        shape = (f"{n_prompts}x{G} P{P} N{N} {n_params / 1e6:.1f}M" if algo == "grpo"
                 else f"{n_prompts} P{P} N{N} {n_params / 1e6:.1f}M")
        total_flops = sum(flops[algo].values())
        for prov in ("fastrlhf", "plain"):
            t = times[f"{algo}/{prov}"]
            split = calls[f"{algo}/{prov}"][-repeat:]
            gf = total_flops / t / 1e9
            phases = {ph: statistics.median(c[0].get(ph, 0.0) for c in split) for ph in PHASES}
            rows.append(H.Row(f"{algo} step", shape, "fp32", prov, 1e3 * t,
                              extra={"gflops": gf, "frac_matmul": gf / mm,
                                     **{f"{ph}_ms": 1e3 * v for ph, v in phases.items()}}))
            for ph, v in phases.items():
                extra = {}
                if ph in flops[algo] and v > 0:
                    extra = {"gflops": flops[algo][ph] / v / 1e9, "frac_matmul": flops[algo][ph] / v / 1e9 / mm}
                rows.append(H.Row(f"{algo} {ph}", shape, "fp32", prov, 1e3 * v, extra=extra))
    H.add_speedups(rows, "plain")
    context = {"copy_bandwidth_GBps": round(bw, 1), "matmul_GFLOPs": round(mm, 1),
               "transformers": transformers.__version__, "params": n_params,
               "model": {k: v for k, v in model_cfg.items() if k != "max_position_embeddings"},
               "step": f"GRPO {n_prompts} prompts x {G}, PPO {n_prompts} prompts (shared value head, "
                       f"{ppo_cfg.epochs} epochs x {ppo_cfg.num_minibatches} mini-batches), {N} new tokens, "
                       f"micro-batch {common['micro_batch_size']}, fp32, kl_coef GRPO {grpo_cfg.kl_coef} / PPO "
                       f"{ppo_cfg.kl_coef}, temperature 1, no top-k / top-p, no stop token",
               "timing": f"providers round robin, median of {repeat} rounds after a warm-up step each; trainers "
                         "persist across rounds",
               "first_step_check": checks,
               "note": "GFLOP/s = nominal model FLOPs (2 x matmul params per token per forward, x3 with the "
                       "backward; attention excluded) / time"}
    return H.report("rl_step", rows, args, context)


if __name__ == "__main__":
    main(sys.argv[1:])
