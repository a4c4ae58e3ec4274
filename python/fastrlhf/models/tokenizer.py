"""Tokenizers: a byte-level BPE trained on your corpus with the ``tokenizers`` library, or any local
Hugging Face fast-tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``), with
batch padding (left, for generation) and Jinja chat templates rendered as transformers does.

Directories written by :meth:`Tokenizer.save_pretrained` load in transformers
(``AutoTokenizer.from_pretrained``) and give the same ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# ChatML, the template of the tokenizers we train (Qwen's convention: no BOS, <|im_end|> ends a turn)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")


def _token_str(value):
    if isinstance(value, dict):  # transformers' serialized AddedToken
        return value.get("content")
    return value


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special tokens and chat template around it."""

    def __init__(self, backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None, model_max_length: int | None = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        for name in ("bos_token", "eos_token", "pad_token"):
            tok = getattr(self, name)
            if tok is not None and backend.token_to_id(tok) is None:
                raise ValueError(f"Tokenizer: {name} {tok!r} is not in the vocabulary")

    # ---- construction
    @classmethod
    def train(cls, corpus: Iterable[str] | str | Path | Sequence[str | Path], vocab_size: int = 8192, *,
              min_frequency: int = 2, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
              chat_template: str | None = CHATML_TEMPLATE, show_progress: bool = False) -> Tokenizer:
        """Train a byte-level BPE (GPT-2 style: every byte representable, no unknown token).
        ``corpus``: an iterable of texts, or a path / list of paths to text files. The first
        special token is EOS, the second padding."""
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 256 + len(special_tokens):
            raise ValueError(f"Tokenizer.train: vocab_size must be >= {256 + len(special_tokens)} (bytes + specials)")
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(special_tokens), show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        if isinstance(corpus, (str, Path)):
            corpus = [corpus]
        corpus = list(corpus) if not isinstance(corpus, list) else corpus
        if corpus and all(isinstance(c, Path) or (isinstance(c, str) and Path(c).is_file()) for c in corpus):
            backend.train([str(c) for c in corpus], trainer)
        else:
            backend.train_from_iterator(corpus, trainer, length=len(corpus))
        eos = special_tokens[0] if special_tokens else None
        pad = special_tokens[1] if len(special_tokens) > 1 else eos
        return cls(backend, eos_token=eos, pad_token=pad, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, path) -> Tokenizer:
        """Load a local Hugging Face tokenizer directory (``tokenizer.json`` is required; slow,
        sentencepiece-only tokenizers must be converted with transformers first)."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if not (path / TOKENIZER_FILE).exists():
            raise FileNotFoundError(f"Tokenizer: {path / TOKENIZER_FILE} not found (fast tokenizers only; convert a "
                                    "slow one with transformers: AutoTokenizer.from_pretrained(d).save_pretrained(d))")
        backend = Backend.from_file(str(path / TOKENIZER_FILE))
        cfg = json.loads((path / TOKENIZER_CONFIG).read_text()) if (path / TOKENIZER_CONFIG).exists() else {}
        if (path / "special_tokens_map.json").exists():  # older directories keep the special tokens there
            for k, v in json.loads((path / "special_tokens_map.json").read_text()).items():
                cfg.setdefault(k, v)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / CHAT_TEMPLATE_FILE).exists():
            template = (path / CHAT_TEMPLATE_FILE).read_text()
        max_len = cfg.get("model_max_length")
        return cls(backend, bos_token=_token_str(cfg.get("bos_token")), eos_token=_token_str(cfg.get("eos_token")),
                   pad_token=_token_str(cfg.get("pad_token")), chat_template=template,
                   model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None)

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / TOKENIZER_FILE))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token, "eos_token": self.eos_token,
               "pad_token": self.pad_token, "clean_up_tokenization_spaces": False}
        if self.model_max_length is not None:
            cfg["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (path / TOKENIZER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")

    # ---- vocabulary
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def bos_token_id(self):
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self):
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def pad_token_id(self):
        if self.pad_token is not None:
            return self.backend.token_to_id(self.pad_token)
        return self.eos_token_id

    # ---- encode / decode
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, *, skip_special_tokens: bool = True) -> list[str]:
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        return self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def __call__(self, texts: str | Sequence[str], *, padding_side: str = "left", max_length: int | None = None,
                 truncation_side: str = "right", add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
        """Encode and pad a batch -> ``{"input_ids": [B, T] int64, "attention_mask": [B, T] int64}``.
        ``padding_side="left"`` is what generation wants. ``max_length`` truncates rows longer than
        it on ``truncation_side`` (``"right"`` as transformers; ``"left"`` keeps a prompt's end)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        return self.pad(rows, padding_side=padding_side, max_length=max_length, truncation_side=truncation_side)

    def pad(self, rows: Sequence[Sequence[int]], *, padding_side: str = "left", max_length: int | None = None,
            truncation_side: str = "right") -> dict[str, torch.Tensor]:
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"Tokenizer: {name} must be 'left' or 'right', got {side!r}")
        pad_id = self.pad_token_id
        if pad_id is None:
            raise ValueError("Tokenizer: no pad_token (or eos_token) to pad with")
        if max_length is not None:
            if max_length < 1:
                raise ValueError(f"Tokenizer: max_length must be >= 1, got {max_length}")
            rows = [r[len(r) - max_length:] if truncation_side == "left" and len(r) > max_length else r[:max_length]
                    for r in rows]
        T = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            if not r:
                continue
            sl = slice(T - len(r), T) if padding_side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return {"input_ids": ids, "attention_mask": mask}

    # ---- chat
    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs):
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the tokenizer's Jinja
        chat template (transformers' environment: sandboxed, ``trim_blocks``, ``lstrip_blocks``).
        Returns token ids, or the text with ``tokenize=False``."""
        if self.chat_template is None:
            raise ValueError("Tokenizer: this tokenizer has no chat_template")
        text = _render(self.chat_template, messages=list(messages), add_generation_prompt=add_generation_prompt,
                       bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                       pad_token=self.pad_token or "", **kwargs)
        # the template already wrote BOS if it wants one
        return self.encode(text, add_special_tokens=False) if tokenize else text


_TEMPLATES: dict[str, object] = {}


def _render(template: str, **context) -> str:
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is a dependency
        raise ImportError("fastrlhf: chat templates need jinja2 (pip install jinja2)") from e
    if template not in _TEMPLATES:
        def raise_exception(message):
            raise TemplateError(message)

        def strftime_now(fmt):
            import datetime
            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        _TEMPLATES[template] = env.from_string(template)
    return _TEMPLATES[template].render(**context)
