"""LLMJudge mechanics on tiny models: prompts, choice tokens, both orders, bias cancellation,
expected ratings, answer likelihoods, the shared-prefix KV cache."""

from __future__ import annotations

import pytest
import torch
from judge_fixtures import ScriptedJudgeLM, tiny_lm, tiny_tokenizer

from fastrlhf.feedback import Judge, LLMJudge
from fastrlhf.feedback.judges import llm as llm_module
from fastrlhf.feedback.judges.llm import LIKELIHOOD_SHOTS, choice_token_ids, question_text
from fastrlhf.models import CausalLM

PROMPTS = ["What is 2 + 3?", [{"role": "user", "content": "Say hello."}]]
GOOD, BAD = ["5, good", "hello, good"], ["6", "go away"]


def test_choice_token_ids_with_and_without_space():
    tok = tiny_tokenizer()
    ids, prefix, texts = choice_token_ids(tok, ["A", "B"], "")
    assert ids == [tok.encode("A", add_special_tokens=False)[0], tok.encode("B", add_special_tokens=False)[0]]
    assert prefix == "" and texts == ["A", "B"]
    # after a word: the spaced token when it is one token ...
    spaced = [tok.encode(" " + c, add_special_tokens=False) for c in "AB"]
    assert all(len(t) == 1 for t in spaced)  # " A", " B" are merges of this tokenizer
    assert choice_token_ids(tok, ["A", "B"], "The answer is") == ([t[0] for t in spaced], "The answer is",
                                                                  [" A", " B"])
    # ... else the space moves into the prefix (" Z" is two tokens here, as " 4" is for SmolLM2)
    assert len(tok.encode(" Z", add_special_tokens=False)) == 2
    z = tok.encode("Z", add_special_tokens=False)[0]
    assert choice_token_ids(tok, ["A", "Z"], "The answer is") == ([ids[0], z], "The answer is ", ["A", "Z"])
    with pytest.raises(ValueError, match="not single tokens"):
        choice_token_ids(tok, ["AB", "Question"], "")


def test_shots_end_with_the_prefix_and_the_choice():
    tok = tiny_tokenizer()
    j = LLMJudge(tiny_lm(), tok, mode="compare", prefix="The answer is")
    text = j.compare_prompt("Q?", "x", "y")
    assert text.count("The answer is A<|im_end|>") == 2 and text.count("The answer is B<|im_end|>") == 2
    assert text.endswith("<|im_start|>assistant\nThe answer is")
    r = LLMJudge(tiny_lm(), tok, mode="rate", prefix="Score:")  # " 5" is two tokens: "Score: " + "5"
    assert "Score: 5<|im_end|>" in r.rate_prompt("Q?", "x") and r.rate_prompt("Q?", "x").endswith("Score: ")


def test_question_text():
    assert question_text("hi") == "hi"
    assert question_text([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]) == "q"
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert question_text(conv) == "user: a\nassistant: b\nuser: c"


def test_compare_prompt_holds_both_orders_and_shots():
    tok = tiny_tokenizer()
    j = LLMJudge(tiny_lm(), tok, mode="compare")
    ab, ba = j.compare_prompt("Q?", "first", "second"), j.compare_prompt("Q?", "second", "first")
    assert "Answer A: first\n\nAnswer B: second" in ab and "Answer A: second\n\nAnswer B: first" in ba
    assert ab.endswith("<|im_start|>assistant\n")
    assert ab.count("<|im_start|>user") == len(j.shots) + 1  # the solved examples come first
    assert sorted(s[3] for s in j.shots) == ["A", "A", "B", "B"]  # balanced letters


def test_compare_reads_both_orders_and_cancels_the_letter_bias():
    tok = tiny_tokenizer()
    model = ScriptedJudgeLM(tok, letter_bias=3.0)  # leans hard to "A"; truly prefers answers with "good"
    j = LLMJudge(model, tok, mode="compare", shots=())
    p = j.compare(PROMPTS, GOOD, BAD)
    # a single order picks "A" every time (bias 3 > preference 2) ...
    lp = j.choice_logprobs([j.compare_prompt(q, b, g) for q, g, b in zip(PROMPTS, GOOD, BAD)])
    assert bool((lp[:, 0] > lp[:, 1]).all())
    # ... but the order average recovers exactly the preference: sigmoid(u(a) - u(b)) = sigmoid(2)
    torch.testing.assert_close(p, torch.sigmoid(torch.tensor([2.0, 2.0])), atol=1e-5, rtol=0)
    torch.testing.assert_close(j.compare(PROMPTS, BAD, GOOD), 1 - p, atol=1e-5, rtol=0)
    assert j.last_stats["letter_bias"] == pytest.approx(3.0, abs=1e-4)
    torch.testing.assert_close(j.compare(PROMPTS, GOOD, GOOD), torch.full((2,), 0.5), atol=1e-6, rtol=0)
    with pytest.raises(NotImplementedError):
        j.score(PROMPTS, GOOD)


def test_compare_with_shots_uses_the_cached_prefix_and_matches():
    tok = tiny_tokenizer()
    j = LLMJudge(ScriptedJudgeLM(tok, letter_bias=-1.0), tok, mode="compare", temperature=2.0)
    torch.testing.assert_close(j.compare(PROMPTS, GOOD, BAD), torch.sigmoid(torch.tensor([1.0, 1.0])), atol=1e-5,
                               rtol=0)


def test_choice_logprobs_match_a_direct_forward_with_and_without_prefix_cache(monkeypatch):
    tok, model = tiny_tokenizer(), tiny_lm(seed=1)
    j = LLMJudge(model, tok, mode="compare", batch_size=3)
    texts = [j.compare_prompt(q, a, b) for q, a, b in [("Q1?", "x", "yy"), ("Question 2?", "zzz", "w"),
                                                        ("Q3?", "1", "2"), ("Q4?", "a b", "c")]]
    got = j.choice_logprobs(texts)
    expected = []
    for t in texts:
        ids = torch.tensor([tok.encode(t, add_special_tokens=False)])
        with torch.no_grad():
            logits = model(ids)[0, -1].float()
        expected.append(torch.log_softmax(logits, -1)[j.choice_ids])
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(llm_module, "_MIN_SHARED_PREFIX", 10**9)  # the plain padded path
    torch.testing.assert_close(j.choice_logprobs(texts), got, atol=1e-4, rtol=1e-4)


def test_rate_mode_expected_rating():
    tok = tiny_tokenizer()
    j = LLMJudge(ScriptedJudgeLM(tok), tok, mode="rate", shots=())
    s = j.score(PROMPTS, ["good answer", "meh"])
    k = torch.arange(1, 6, dtype=torch.float32)
    e_good = (torch.softmax(-((k - 5) ** 2), 0) * k).sum()
    e_bad = (torch.softmax(-((k - 1) ** 2), 0) * k).sum()
    torch.testing.assert_close(s, torch.stack([e_good, e_bad]), atol=1e-5, rtol=0)
    assert 0.999 > j.last_stats["choice_mass"] > 0  # the digits' share of the full softmax
    p = j.compare(PROMPTS, ["good", "good"], ["bad", "bad"])  # Bradley-Terry on the expected ratings
    torch.testing.assert_close(p, torch.sigmoid(e_good - e_bad).expand(2), atol=1e-5, rtol=0)
    scored = []  # K-way pairs share answers: each distinct (prompt, answer) is rated once
    score = j.score
    j.score = lambda prompts, answers: scored.append(list(answers)) or score(prompts, answers)
    p3 = j.compare([PROMPTS[0]] * 3, ["good", "good", "bad"], ["bad", "meh", "meh"])
    assert scored == [["good", "bad", "meh"]]
    s3 = score([PROMPTS[0]] * 3, ["good", "bad", "meh"])  # the same as rating each side apart
    torch.testing.assert_close(p3, torch.sigmoid(s3[[0, 0, 1]] - s3[[1, 2, 2]]), atol=1e-5, rtol=0)
    # contextual calibration divides by the content-free answer's distribution (here: rating 1)
    jc = LLMJudge(ScriptedJudgeLM(tok), tok, mode="rate", shots=(), calibrate=True)
    sc = jc.score(PROMPTS, ["good answer", "meh"])
    assert sc[0] > s[0] and sc[1] == pytest.approx(3.0, abs=1e-4)  # equal to the reference: uniform


def _mean_logprob(model, tok, context: list[dict], completion: str) -> float:
    p = tok.apply_chat_template(context, add_generation_prompt=True)
    full = tok.apply_chat_template(context + [{"role": "assistant", "content": completion}])
    c = full[len(p):]
    end = tok.token_to_id("<|im_end|>")
    c = c[: c.index(end) + 1]
    with torch.no_grad():
        lp = model.token_logprobs(torch.tensor([p + c]))[0]
    return float(lp[len(p) - 1:].mean())


def test_likelihood_mode_is_the_mean_answer_logprob_and_pmi():
    tok, model = tiny_tokenizer(), tiny_lm(seed=2)
    j = LLMJudge(model, tok, mode="likelihood", shots=(), system="Judge.")
    s = j.score(PROMPTS, GOOD)
    sys = [{"role": "system", "content": "Judge."}]
    expected = [_mean_logprob(model, tok, sys + [{"role": "user", "content": "What is 2 + 3?"}], GOOD[0]),
                _mean_logprob(model, tok, sys + [{"role": "user", "content": "Say hello."}], GOOD[1])]
    torch.testing.assert_close(s, torch.tensor(expected), atol=1e-4, rtol=1e-4)
    jp = LLMJudge(model, tok, mode="likelihood", shots=(), system="Judge.", pmi=1.0)
    null = [_mean_logprob(model, tok, sys + [{"role": "user", "content": ""}], c) for c in GOOD]
    torch.testing.assert_close(jp.score(PROMPTS, GOOD), s - torch.tensor(null), atol=1e-4, rtol=1e-4)
    p = j.compare(PROMPTS, GOOD, BAD)
    torch.testing.assert_close(p, torch.sigmoid(s - j.score(PROMPTS, BAD)), atol=1e-5, rtol=0)


def test_likelihood_with_shots_cached_prefix_matches_plain(monkeypatch):
    tok, model = tiny_tokenizer(), tiny_lm(seed=3)
    j = LLMJudge(model, tok, mode="likelihood", batch_size=4, shots=LIKELIHOOD_SHOTS)
    assert j.system is None and LLMJudge(model, tok).shots == ()  # the likelihood defaults
    prompts, answers = ["Q a?", "Q bb?", "What?", "Hmm?"], ["1", "two words", "x", "good"]
    cached = j.score(prompts, answers)
    calls = []
    monkeypatch.setattr(model, "new_cache", lambda *a: calls.append(a) or CausalLM.new_cache(model, *a))
    j.score(prompts, answers)
    assert calls  # the shared prefix went through the KV cache
    monkeypatch.setattr(llm_module, "_MIN_SHARED_PREFIX", 10**9)
    torch.testing.assert_close(j.score(prompts, answers), cached, atol=1e-4, rtol=1e-4)


def test_llm_judge_is_a_judge_and_checks_arguments():
    tok = tiny_tokenizer()
    assert isinstance(LLMJudge(tiny_lm(), tok, mode="compare"), Judge)
    with pytest.raises(ValueError, match="mode"):
        LLMJudge(tiny_lm(), tok, mode="vote")
    with pytest.raises(ValueError, match="tokenizer"):
        LLMJudge(tiny_lm())
    with pytest.raises(ValueError, match="temperature"):
        LLMJudge(tiny_lm(), tok, temperature=0)
    with pytest.raises(ValueError, match="2 prompts but 1"):
        LLMJudge(tiny_lm(), tok, mode="compare").compare(PROMPTS, GOOD[:1], BAD)
