"""A local instruct model as a judge, read through its log-probs (never by parsing generated text).

:class:`LLMJudge` has three modes:

* ``"compare"``: the judge model sees the question and two answers labelled A and B and the
  next-token log-probs of the letters are read. Every pair is asked in both orders and the
  log-odds are averaged, ``s = ((lp_A - lp_B)[a, b] - (lp_A - lp_B)[b, a]) / 2``: a constant letter
  (position) bias ``beta`` adds to both orders and cancels exactly; ``beta`` itself is kept in
  ``last_stats``. ``compare`` returns ``sigmoid(s / temperature)``.
* ``"rate"``: the judge rates one answer with a digit 1-5; :meth:`LLMJudge.score` is the expected
  rating under the digits' renormalized distribution. With ``calibrate=True`` the digit
  distribution is divided by the one the same prompt gives a content-free answer ("N/A")
  (contextual calibration, Zhao et al. 2021) before renormalizing.
* ``"likelihood"``: the judge scores an answer by the mean log-prob it assigns to the answer's
  tokens (the end-of-turn token included) as a reply to the question, minus ``pmi`` times the mean
  log-prob of the same reply to an empty question (``pmi = 1``: pointwise mutual information,
  which removes how likely the answer is a priori). ``compare`` is Bradley-Terry on the scores.

Few-shot examples (``shots``) are earlier turns of the conversation: solved examples in the
judge's own format, letters balanced. The defaults were picked on a development set of random
arithmetic questions and checked on a held-out set (see the class docstring).

Choice tokens: after ``assistant\\n`` the letters are read without a leading space (SmolLM2: "A" =
49); after a prefix ending in a word, with one (" A" = 330). When a spaced choice is not a single
token (SmolLM2 splits " 4" into a space and "4") the space is appended to the prefix instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from fastrlhf import ops
from fastrlhf.data import as_conversation, encode_pair, is_conversation
from fastrlhf.feedback.base import Judge, score_pairs
from fastrlhf.feedback.judges._common import check_lengths

Mode = Literal["compare", "rate", "likelihood"]
MODES = ("compare", "rate", "likelihood")

COMPARE_TEMPLATE = ("Question: {question}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
                    "Which answer is better (correct, helpful and polite)? Reply with only the letter A or B.")
RATE_TEMPLATE = ("Question: {question}\n\nAnswer: {answer}\n\nRate the answer from 1 (wrong or rude) to 5 (correct, "
                 "helpful and polite). Reply with only the digit.")

# Solved examples (question, answer A, answer B, the better letter): letters balanced, none of them
# drawn from the evaluation sets.
COMPARE_SHOTS: tuple[tuple[str, str, str, str], ...] = (
    ("What is 6 + 7?", "6 + 7 = 13", "6 + 7 = 12", "A"),
    ("What is the capital of Italy?", "I don't know, look it up yourself.", "The capital of Italy is Rome.", "B"),
    ("What is 9 * 3?", "9 * 3 = 26", "9 * 3 = 27", "B"),
    ("How do I boil an egg?", "Place the egg in boiling water for about 8 minutes, then cool it in cold water.",
     "Why would you even ask that? Figure it out.", "A"),
)
# (question, answer, rating 1-5)
RATE_SHOTS: tuple[tuple[str, str, int], ...] = (
    ("What is 6 + 7?", "6 + 7 = 13", 5),
    ("What is 9 * 3?", "9 * 3 = 26", 1),
    ("How do I boil an egg?", "Place the egg in boiling water for about 8 minutes, then cool it in cold water.", 5),
    ("What is the capital of Italy?", "I don't know, look it up yourself.", 1),
)
# (question, answer): solved examples shown before the question whose answer is scored
LIKELIHOOD_SHOTS: tuple[tuple[str, str], ...] = (
    ("What is 6 + 7?", "6 + 7 = 13"),
    ("How do I boil an egg?", "Place the egg in boiling water for about 8 minutes, then cool it in cold water."),
    ("What is 9 * 3?", "9 * 3 = 27"),
)
JUDGE_SYSTEM = "You are a careful, fair judge of answers."
# per mode, picked on the development sets (likelihood: no shots and the chat template's own
# system prompt scored best; compare / rate: the solved examples are what makes the letters and
# digits come out at all)
DEFAULT_SHOTS = {"compare": COMPARE_SHOTS, "rate": RATE_SHOTS, "likelihood": ()}
DEFAULT_SYSTEM = {"compare": JUDGE_SYSTEM, "rate": JUDGE_SYSTEM, "likelihood": None}
CONTENT_FREE = "N/A"
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")  # chat templates' turn ends
_MIN_SHARED_PREFIX = 16  # shared tokens worth a KV-cache prefill of their own


def question_text(prompt) -> str:
    """The text a judge prompt quotes as the question: a string as it is; a conversation's single
    user turn, or its turns as ``role: content`` lines."""
    if not is_conversation(prompt):
        return str(prompt)
    turns = [m for m in prompt if m.get("role") != "system"]
    if len(turns) == 1:
        return str(turns[0]["content"])
    return "\n".join(f"{m['role']}: {m['content']}" for m in turns)


def choice_token_ids(tokenizer, choices: Sequence[str], prefix: str) -> tuple[list[int], str, list[str]]:
    """The token id that starts each choice right after ``prefix``, the prefix to use, and the
    choices as they are written after it.

    Args:
        tokenizer: a :class:`~fastrlhf.models.Tokenizer` (anything with ``encode``).
        choices: the choice strings (letters, digits).
        prefix: the text the assistant turn starts with ("" or ending in whitespace: the choices
            are read without a leading space; else with one, or, when the spaced choices are not
            single tokens, the space is appended to the prefix).

    Returns:
        ``(ids, prefix, texts)``: ``prefix + texts[i]`` is the assistant turn that answers choice i.

    Raises:
        ValueError: a choice is not a single token in either spelling.
    """
    def single(texts):
        ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        return [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None

    if prefix and not prefix[-1].isspace():
        spaced = [" " + c for c in choices]
        ids = single(spaced)
        if ids is not None:
            return ids, prefix, spaced
        prefix = prefix + " "
    ids = single(list(choices))
    if ids is None:
        bad = [c for c in choices if len(tokenizer.encode(c, add_special_tokens=False)) != 1]
        raise ValueError(f"LLMJudge: choices {bad} are not single tokens of this tokenizer")
    return ids, prefix, list(choices)


class LLMJudge(Judge):
    """A local instruct model (SmolLM2-135M-Instruct by default) as a judge; see the module
    docstring for the three modes.

    Measured with SmolLM2-135M-Instruct (fp32): the fraction of pairs where the judge ranks the
    better answer first (compare: order-averaged), 40 pairs per set. Arithmetic: random questions
    (``a + b``, ``a - b`` with a, b in 2-60; ``a * b`` in 2-12), a wrong answer off by 1, 2 or 10,
    written ``"a + b = v"`` (eq) or ``"The answer is v."`` (ans); dev questions drawn with seed 1
    (used to pick the defaults), held-out ones with seed 2. Preference: friendly, helpful vs rude,
    unhelpful answers to simple instructions, 20 hand-written pairs (dev) and 20 others (held-out).

    ====================================  =========  =========  =========  =========  =========  =========
    mode, setting                         dev eq     dev ans    dev pref   held eq    held ans   held pref
    ====================================  =========  =========  =========  =========  =========  =========
    likelihood, no shots (the default)    0.85       0.90       1.00       0.68       0.75       0.85
    likelihood, 3 shots, judge system     0.90       0.88       0.80       0.80       0.68       0.90
    likelihood, pmi=1, no shots           0.78       0.88       0.95       0.73       0.78       0.75
    compare, zero-shot                    0.48       0.50       0.45       0.30       0.33       0.50
    compare, 4 shots (default)            0.55       0.55       0.60       0.45       0.55       0.45
    compare, 4 shots, assistant prefix    0.43       0.43       0.50       -          -          -
    rate, 4 shots (default)               0.45       0.48       0.85       0.40       0.35       0.85
    rate, 4 shots, calibrate              0.60       0.58       0.70       0.38       0.40       0.65
    ====================================  =========  =========  =========  =========  =========  =========

    Zero-shot, the model answers "A" in every single order (letter bias of about +2 nats, letters
    only 10-20% of the probability mass); four solved examples bring the letters to 95% of the mass
    and the bias near 0, but the order-averaged signal stays at (or below) chance. Rating carries some signal
    about tone, none about arithmetic. Likelihood is the only mode above chance on arithmetic, and
    the default; the standard error of one 40-pair accuracy is about 0.07, so the settings within
    likelihood mode are not distinguishable. As a training reward, likelihood favours what the judge
    model itself would say (generic, high-probability phrasing): use it for ranking candidates and
    checking answers, next to other signals.

    Args:
        model: a :class:`~fastrlhf.models.CausalLM`; None loads SmolLM2-135M-Instruct with
            :func:`~fastrlhf.models.load_smollm2`.
        tokenizer: its tokenizer (with a chat template); required when ``model`` is given.
        mode: ``"compare"``, ``"rate"`` or ``"likelihood"``.
        system: the judge's system message; None: the chat template's default; ``"auto"``: the
            mode's default (``DEFAULT_SYSTEM``).
        shots: few-shot examples as earlier turns: None for the mode's defaults (``DEFAULT_SHOTS``:
            none in likelihood mode), ``()`` for none, else tuples as in ``COMPARE_SHOTS`` /
            ``RATE_SHOTS`` / ``LIKELIHOOD_SHOTS``.
        prefix: text the assistant turn starts with before the choice is read (compare / rate).
        template: the user message (compare: ``{question}``, ``{a}``, ``{b}``; rate:
            ``{question}``, ``{answer}``); None: ``COMPARE_TEMPLATE`` / ``RATE_TEMPLATE``.
        pmi: likelihood mode: weight of the question-free log-prob subtracted (0: plain likelihood).
        calibrate: rate mode: divide out the digit distribution of a content-free answer.
        temperature: ``compare`` returns ``sigmoid(difference / temperature)`` (> 0).
        batch_size: rows per forward.
        max_length: longest judge input in tokens; longer ones keep their end.
        name: the judge's name in metrics.
    """

    def __init__(self, model=None, tokenizer=None, *, mode: Mode = "likelihood", system: str | None = "auto",
                 shots=None, prefix: str = "", template: str | None = None, pmi: float = 0.0,
                 calibrate: bool = False, temperature: float = 1.0, batch_size: int = 16, max_length: int = 1024,
                 name: str | None = None):
        if mode not in MODES:
            raise ValueError(f"LLMJudge: mode must be one of {MODES}, got {mode!r}")
        if not temperature > 0:
            raise ValueError(f"LLMJudge: temperature must be > 0, got {temperature}")
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"LLMJudge: batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}")
        if model is None:
            from fastrlhf.models import load_smollm2

            model, tokenizer = load_smollm2()
        elif tokenizer is None:
            raise ValueError("LLMJudge: pass the judge model's tokenizer with model")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("LLMJudge: the tokenizer has no chat_template (an instruct model's tokenizer is needed)")
        self.model, self.tokenizer, self.mode = model.eval(), tokenizer, mode
        self.system = DEFAULT_SYSTEM[mode] if system == "auto" else system
        self.pmi, self.calibrate, self.temperature = float(pmi), calibrate, float(temperature)
        self.shots = tuple(DEFAULT_SHOTS[mode] if shots is None else shots)
        self.template = template or (RATE_TEMPLATE if mode == "rate" else COMPARE_TEMPLATE)
        self.batch_size, self.max_length = batch_size, max_length
        self.name = name or f"llm_{mode}"
        self.choices, self.choice_ids, self.prefix, self._choice_texts = (), [], prefix, {}
        if mode != "likelihood":
            self.choices = ("A", "B") if mode == "compare" else tuple("12345")
            self.choice_ids, self.prefix, texts = choice_token_ids(tokenizer, self.choices, prefix)
            self._choice_texts = dict(zip(self.choices, texts))  # how a shot's answer is written after the prefix
        self.last_stats: dict[str, float] = {}
        ends = [tokenizer.eos_token_id] + [tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS]
        self._turn_ends = {t for t in ends if t is not None}

    # ---- prompts
    def _messages(self, user: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for shot in self.shots:
            if self.mode == "compare":
                q, a, b, letter = shot
                msgs += [{"role": "user", "content": self.template.format(question=q, a=a, b=b)},
                         {"role": "assistant", "content": self.prefix + self._choice_texts[letter]}]
            elif self.mode == "rate":
                q, ans, rating = shot
                msgs += [{"role": "user", "content": self.template.format(question=q, answer=ans)},
                         {"role": "assistant", "content": self.prefix + self._choice_texts[str(rating)]}]
            else:
                q, ans = shot
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
        return msgs + [{"role": "user", "content": user}]

    def compare_prompt(self, prompt, a: str, b: str) -> str:
        """The judge's full input text (chat template applied, assistant prefix included) for
        "is ``a`` or ``b`` the better answer to ``prompt``" in this order."""
        user = self.template.format(question=question_text(prompt), a=a, b=b)
        return self.tokenizer.apply_chat_template(self._messages(user), add_generation_prompt=True,
                                                  tokenize=False) + self.prefix

    def rate_prompt(self, prompt, answer: str) -> str:
        """The judge's full input text for rating ``answer`` to ``prompt``."""
        user = self.template.format(question=question_text(prompt), answer=answer)
        return self.tokenizer.apply_chat_template(self._messages(user), add_generation_prompt=True,
                                                  tokenize=False) + self.prefix

    # ---- model calls
    def _hidden(self, rows: list[list[int]], limit: int | None = None) -> tuple[torch.Tensor, int]:
        """Final hidden states ``[B, T - P, C]`` of right-padded ``rows`` from position ``P`` on, and
        ``P``: the length of the prefix all rows share (system message, few-shot turns; at most
        ``limit`` tokens), which runs once into a KV cache copied to every row when it is long
        enough to be worth it."""
        dev, B = self.model.device, len(rows)
        P = 0
        if B > 1:
            first, shortest = rows[0], min(len(r) for r in rows)
            stop = shortest - 1 if limit is None else min(shortest - 1, limit)
            while P < stop and all(r[P] == first[P] for r in rows):
                P += 1
        if P < _MIN_SHARED_PREFIX:
            enc = self.tokenizer.pad(rows, padding_side="right")
            return self.model(enc["input_ids"].to(dev), enc["attention_mask"].to(dev), return_hidden=True), 0
        T = max(len(r) for r in rows)
        one = self.model.new_cache(1, P)
        self.model(torch.tensor([rows[0][:P]], device=dev), torch.ones(1, P, dtype=torch.long, device=dev), cache=one)
        cache = self.model.new_cache(B, T)
        for kb, vb, k1, v1 in zip(cache.k, cache.v, one.k, one.v):
            kb[:, :, :P] = k1[:, :, :P]
            vb[:, :, :P] = v1[:, :, :P]
        cache.lengths.fill_(P)
        suffix = self.tokenizer.pad([r[P:] for r in rows], padding_side="right")["input_ids"].to(dev)  # (B, T - P)
        # causal: each row's valid tokens never see the padding after them
        return self.model(suffix, cache=cache, return_hidden=True), P

    @torch.no_grad()
    def choice_logprobs(self, texts: Sequence[str]) -> torch.Tensor:
        """Next-token log-probs ``[N, n_choices]`` (fp32, CPU) of the choice tokens after each text
        (full softmax over the vocabulary; not renormalized over the choices).

        Args:
            texts: N judge inputs (from :meth:`compare_prompt` / :meth:`rate_prompt`).
        """
        out = []
        ids = torch.tensor(self.choice_ids, device=self.model.device)
        for i in range(0, len(texts), self.batch_size):
            rows = [self.tokenizer.encode(t, add_special_tokens=False)[-self.max_length:]
                    for t in texts[i:i + self.batch_size]]
            hidden, P = self._hidden(rows)  # (b, T - P, C)
            last = torch.tensor([len(r) - 1 - P for r in rows], device=hidden.device)
            h = hidden[torch.arange(len(rows), device=hidden.device), last]  # (b, C)
            logits = self.model.logits(h).float()  # (b, V)
            out.append(torch.log_softmax(logits, -1)[:, ids].cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.choice_ids))

    def _answer_pair(self, prompt, completion: str, shots: bool) -> tuple[list[int], list[int]]:
        conv = [m for m in as_conversation(prompt) if m.get("role") != "system"]
        if shots:
            msgs = self._messages("")[:-1]
        else:
            msgs = [{"role": "system", "content": self.system}] if self.system else []
        p_ids, c_ids = encode_pair(self.tokenizer, msgs + conv, completion)
        ends = [i for i, t in enumerate(c_ids) if t in self._turn_ends]
        if ends:  # drop what the template writes after the end of the turn
            c_ids = c_ids[: ends[0] + 1]
        c_ids = c_ids[: self.max_length - 1]
        return p_ids[len(p_ids) - max(self.max_length - len(c_ids), 1):], c_ids

    @torch.no_grad()
    def answer_logprobs(self, prompts: Sequence, completions: Sequence[str], *, shots: bool = True) -> torch.Tensor:
        """Mean log-prob ``[N]`` (fp32, CPU) of each completion as the assistant's reply to its prompt
        (after the judge's system message and, with ``shots``, its solved examples); the tokens
        scored are the reply and the end-of-turn token.

        Args:
            prompts: N prompts (strings or conversations).
            completions: N replies.
            shots: put the few-shot examples before the prompt.
        """
        pairs = [self._answer_pair(p, c, shots) for p, c in zip(prompts, completions)]
        out = []
        weight = self.model.lm_head_weight()
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i:i + self.batch_size]
            hidden, P = self._hidden([p + c for p, c in chunk], limit=min(len(p) for p, _ in chunk) - 1)
            for j, (p, c) in enumerate(chunk):  # hidden at position t predicts token t + 1
                h = hidden[j, len(p) - 1 - P: len(p) + len(c) - 1 - P]  # (len(c), C)
                target = torch.tensor(c, device=h.device)
                out.append(ops.linear_token_logprobs(h, weight.to(h.dtype), target).float().mean().cpu())
        return torch.stack(out) if out else torch.zeros(0)

    # ---- Judge interface
    def score(self, prompts, completions) -> torch.Tensor:
        """``[N]`` scores: the expected rating (rate mode) or the (PMI) mean log-prob (likelihood
        mode). Compare mode only compares (NotImplementedError).

        Args:
            prompts: N prompts.
            completions: N answers.
        """
        check_lengths(self.name, prompts, completions)
        if self.mode == "compare":
            raise NotImplementedError("LLMJudge(mode='compare') compares answers; use mode='rate' or 'likelihood' "
                                      "to score single ones")
        if self.mode == "likelihood":
            s = self.answer_logprobs(prompts, completions)
            if self.pmi:
                s = s - self.pmi * self.answer_logprobs([""] * len(prompts), completions)
            self.last_stats = {"score_mean": float(s.mean()) if len(s) else 0.0}
            return s
        lp = self.choice_logprobs([self.rate_prompt(p, c) for p, c in zip(prompts, completions)])  # (N, 5)
        if self.calibrate:  # contextual calibration: divide by the content-free answer's distribution
            lp = lp - self.choice_logprobs([self.rate_prompt(p, CONTENT_FREE) for p in prompts])
        probs = torch.softmax(lp, -1)  # renormalized over the digits
        values = torch.arange(1, len(self.choices) + 1, dtype=torch.float32)
        mass = lp.exp().sum(-1) if not self.calibrate else torch.full((len(lp),), float("nan"))
        self.last_stats = {"choice_mass": float(mass.mean()) if len(lp) else 0.0}
        return (probs * values).sum(-1)

    def compare(self, prompts, completions_a, completions_b) -> torch.Tensor:
        """``[N]`` probabilities that ``completions_a[i]`` is the better answer. Compare mode: both
        orders, log-odds averaged (the letter bias cancels), ``sigmoid(s / temperature)``; other
        modes: ``sigmoid((score_a - score_b) / temperature)``.

        Args:
            prompts: N prompts.
            completions_a, completions_b: two answers to each.
        """
        check_lengths(self.name, prompts, completions_a, completions_b)
        if self.mode != "compare":  # each distinct answer scored once (K-way pairs share answers)
            a, b = score_pairs(self.score, prompts, completions_a, completions_b)
            return torch.sigmoid((a - b) / self.temperature)
        s, bias = self.compare_logodds(prompts, completions_a, completions_b)
        return torch.sigmoid(s / self.temperature)

    def compare_logodds(self, prompts, completions_a, completions_b) -> tuple[torch.Tensor, torch.Tensor]:
        """Compare mode's raw signal: ``(s [N], bias [N])`` with ``s`` the order-averaged log-odds
        that ``a`` is better and ``bias`` the letter bias (``> 0``: the judge leans to "A")."""
        texts = []
        for p, a, b in zip(prompts, completions_a, completions_b):
            texts += [self.compare_prompt(p, a, b), self.compare_prompt(p, b, a)]
        lp = self.choice_logprobs(texts)  # (2N, 2): rows (a, b), (b, a) per pair
        d = (lp[:, 0] - lp[:, 1]).view(-1, 2)  # log p(A) - log p(B) in each order
        s, bias = (d[:, 0] - d[:, 1]) / 2, (d[:, 0] + d[:, 1]) / 2
        mass = lp.exp().sum(-1)
        self.last_stats = {"letter_bias": float(bias.mean()) if len(bias) else 0.0,
                           "choice_mass": float(mass.mean()) if len(mass) else 0.0}
        return s, bias
