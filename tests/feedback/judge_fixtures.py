"""Tiny tokenizer and models for the judge tests (shared by the tests in this folder)."""

from __future__ import annotations

import functools
import re

import torch

from fastrlhf.models import CausalLM, CausalLMConfig, Tokenizer

CORPUS = ["Question: What is 2 + 3? Answer A: 5 Answer B: 6 Which answer is better? good bad friendly rude",
          "Rate the answer from 1 to 5. The answer is correct, helpful and polite. Reply with only the digit.",
          "You are a careful, fair judge of answers. Hello, how are you? I am fine, thank you.",
          " A B" * 20] * 4  # " A", " B": single tokens (merged)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE with ChatML (letters and digits are single tokens)."""
    return Tokenizer.train(CORPUS, vocab_size=320, min_frequency=2)


def tiny_lm(seed: int = 0, vocab_size: int | None = None) -> CausalLM:
    torch.manual_seed(seed)
    cfg = CausalLMConfig(vocab_size=vocab_size or tiny_tokenizer().vocab_size, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096)
    return CausalLM(cfg).eval()


class ScriptedJudgeLM(CausalLM):
    """A judge model whose preferences are set by hand: the LM head is zero (every logit 0), then

    * after a compare prompt, the letter "A" gets ``letter_bias + (u(a) - u(b)) / 2`` and "B"
      ``-(u(a) - u(b)) / 2``: the true order-free log-odds are ``u(a) - u(b)``;
    * after a rate prompt, digit k gets ``-(k - (1 + 4 u(answer)))^2``.

    ``u(text)`` is ``utility(text)`` (default: 2 when "good" is in the text, else 0). The row texts
    are decoded from the input ids of the last forward (suffixes when a shared prefix was cached)."""

    def __init__(self, tokenizer, *, letter_bias: float = 3.0, utility=None):
        torch.manual_seed(0)
        super().__init__(tiny_lm().config)
        self.eval()
        with torch.no_grad():
            self.lm_head.weight.zero_()
        self.tokenizer, self.letter_bias = tokenizer, letter_bias
        self.utility = utility or (lambda text: 2.0 if "good" in text else 0.0)
        self.ids = {c: tokenizer.encode(c, add_special_tokens=False)[0] for c in "AB12345"}
        self.texts: list[str] = []

    def forward(self, input_ids, attention_mask=None, **kw):
        if input_ids.dim() == 2:
            self.texts = [self.tokenizer.decode(row, skip_special_tokens=False) for row in input_ids.tolist()]
        return super().forward(input_ids, attention_mask, **kw)

    def logits(self, hidden):
        out = super().logits(hidden)
        if hidden.dim() != 2 or hidden.shape[0] != len(self.texts):
            return out
        out = out.clone()
        for i, text in enumerate(self.texts):
            pair = re.findall(r"Answer A: (.*?)\n\nAnswer B: (.*?)\n\n", text, re.S)
            one = re.findall(r"Answer: (.*?)\n\n", text, re.S)
            if pair:
                d = self.utility(pair[-1][0]) - self.utility(pair[-1][1])
                out[i, self.ids["A"]] += self.letter_bias + d / 2
                out[i, self.ids["B"]] -= d / 2
            elif one:
                target = 1 + 4 * min(self.utility(one[-1]) / 2, 1.0)
                for k in range(1, 6):
                    out[i, self.ids[str(k)]] += -((k - target) ** 2)
        return out
