"""Tokenizers: a byte-level BPE trained on your corpus with the ``tokenizers`` library, or any local
Hugging Face fast-tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``), with
batch padding (left, for generation) and Jinja chat templates rendered as transformers does.

Directories written by :meth:`Tokenizer.save_pretrained` load in transformers
(``AutoTokenizer.from_pretrained``) and give the same ids.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

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
    """A ``tokenizers.Tokenizer`` plus the special tokens and chat template around it.

    Build one with :meth:`train` or :meth:`from_pretrained`; the constructor wraps a backend you
    already have.

    Args:
        backend: a ``tokenizers.Tokenizer`` (its model, pre-tokenizer, decoder, post-processor).
        bos_token: the beginning-of-sequence token's text (must be in the vocabulary), or None.
            Templates see it as ``bos_token``; the backend's post-processor decides whether
            :meth:`encode` adds it.
        eos_token: the end-of-sequence token's text, or None.
        pad_token: the padding token's text, or None (then :meth:`pad` pads with ``eos_token``).
        chat_template: a Jinja chat template (as transformers' ``chat_template``), or None.
        model_max_length: the longest input the model takes, recorded in ``tokenizer_config.json``;
            informational (nothing here truncates to it).

    Raises:
        ValueError: a given special token is not in the backend's vocabulary.
    """

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
        special token is EOS, the second padding.

        Args:
            corpus: the training texts (an iterable of strings), or one path / a list of paths to
                text files (read as files when every entry is a ``Path`` or an existing file).
            vocab_size: the target vocabulary size, counting the 256 byte tokens and the special
                tokens (at least ``256 + len(special_tokens)``). A corpus too small for it gives a
                smaller vocabulary and a warning.
            min_frequency: how often a pair must occur to be merged.
            special_tokens: added tokens that are never split; ``special_tokens[0]`` becomes
                ``eos_token``, ``special_tokens[1]`` ``pad_token`` (``eos_token`` when there is only one).
                Default: ``<|endoftext|>``, ``<|pad|>``, ``<|im_start|>``, ``<|im_end|>``.
            chat_template: the Jinja chat template to attach (default ChatML, matching the default
                special tokens); None: none.
            show_progress: show the ``tokenizers`` trainer's progress bar.

        Returns:
            A new :class:`Tokenizer` (no BOS token).

        Raises:
            ValueError: ``vocab_size`` is too small, or the corpus is empty.
        """
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
        if not any(corpus):
            raise ValueError("Tokenizer.train: the corpus is empty (pass texts, or paths to text files)")
        if all(isinstance(c, Path) or (isinstance(c, str) and _is_file(c)) for c in corpus):
            backend.train([str(c) for c in corpus], trainer)
        else:
            backend.train_from_iterator(corpus, trainer, length=len(corpus))
        got = backend.get_vocab_size(with_added_tokens=True)
        if got < vocab_size:
            warnings.warn(f"Tokenizer.train: asked for vocab_size {vocab_size} but the corpus supports only {got} "
                          f"tokens (no pair occurs min_frequency={min_frequency} times more); the tokenizer has {got}",
                          stacklevel=2)
        eos = special_tokens[0] if special_tokens else None
        pad = special_tokens[1] if len(special_tokens) > 1 else eos
        return cls(backend, eos_token=eos, pad_token=pad, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, path) -> Tokenizer:
        """Load a local Hugging Face tokenizer directory (``tokenizer.json`` is required; slow,
        sentencepiece-only tokenizers must be converted with transformers first).

        Args:
            path: the directory (``str`` or ``Path``). Special tokens, ``model_max_length`` and the
                chat template are read from ``tokenizer_config.json`` (and ``special_tokens_map.json``,
                ``chat_template.jinja`` when present).

        Returns:
            A new :class:`Tokenizer`.

        Raises:
            FileNotFoundError: no ``tokenizer.json`` in ``path``.
        """
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
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, chat template,
        ``model_max_length``), loadable by :meth:`from_pretrained` and by transformers'
        ``AutoTokenizer``.

        Args:
            path: the directory (``str`` or ``Path``), created if missing.
        """
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
        """The number of token ids, added (special) tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """The id of the token whose text is ``token``, or None when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    @property
    def bos_token_id(self):
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self):
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def pad_token_id(self):
        """The id :meth:`pad` pads with: ``pad_token``'s, else ``eos_token``'s, else None."""
        if self.pad_token is not None:
            return self.backend.token_to_id(self.pad_token)
        return self.eos_token_id

    # ---- encode / decode
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text.

        Args:
            text: the string to encode.
            add_special_tokens: let the backend's post-processor add its tokens (e.g. Llama's BOS);
                a tokenizer from :meth:`train` adds none either way.

        Returns:
            The ids, a list of ints.
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Text of one sequence of ids.

        Args:
            ids: a list of ints or a 1-D integer tensor.
            skip_special_tokens: leave special tokens (EOS, padding, chat markers) out of the text.

        Returns:
            The decoded string.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, *, skip_special_tokens: bool = True) -> list[str]:
        """Texts of a batch of id sequences.

        Args:
            rows: a list of lists of ints, or a 2-D integer tensor ``[B, T]`` (padding is dropped
                only when ``skip_special_tokens`` and the pad token is special).
            skip_special_tokens: leave special tokens out of the texts.

        Returns:
            ``B`` strings.
        """
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        return self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def __call__(self, texts: str | Sequence[str], *, padding_side: Literal["left", "right"] = "left",
                 max_length: int | None = None, truncation_side: Literal["left", "right"] = "right",
                 add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
        """Encode and pad a batch -> ``{"input_ids": [B, T] int64, "attention_mask": [B, T] int64}``.
        ``padding_side="left"`` is what generation wants. ``max_length`` truncates rows longer than
        it on ``truncation_side`` (``"right"`` as transformers; ``"left"`` keeps a prompt's end).

        Args:
            texts: one string (a batch of one) or a sequence of strings.
            padding_side: where the padding goes: ``"left"`` (generation) or ``"right"`` (training).
            max_length: truncate longer rows to this many tokens (>= 1); None: no truncation. Rows
                are padded to the longest row, not to ``max_length``.
            truncation_side: which end truncation removes tokens from: ``"right"`` or ``"left"``.
            add_special_tokens: as in :meth:`encode`.

        Returns:
            ``{"input_ids": [B, T] int64, "attention_mask": [B, T] int64}`` (1 on tokens, 0 on padding).
        """
        if isinstance(texts, str):
            texts = [texts]
        rows = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        return self.pad(rows, padding_side=padding_side, max_length=max_length, truncation_side=truncation_side)

    def pad(self, rows: Sequence[Sequence[int]], *, padding_side: Literal["left", "right"] = "left",
            max_length: int | None = None,
            truncation_side: Literal["left", "right"] = "right") -> dict[str, torch.Tensor]:
        """Pad (and optionally truncate) already-encoded rows into a batch with ``pad_token_id``.

        Args:
            rows: ``B`` sequences of token ids (lists of ints); empty rows become all padding.
            padding_side: where the padding goes: ``"left"`` (generation) or ``"right"`` (training).
            max_length: truncate longer rows to this many tokens (>= 1); None: no truncation. Rows
                are padded to the longest row, not to ``max_length``.
            truncation_side: which end truncation removes tokens from: ``"right"`` or ``"left"``.

        Returns:
            ``{"input_ids": [B, T] int64, "attention_mask": [B, T] int64}`` (1 on tokens, 0 on padding).

        Raises:
            ValueError: a side that is not ``"left"`` / ``"right"``, ``max_length < 1``, or no pad
                (nor EOS) token.
        """
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
        Returns token ids, or the text with ``tokenize=False``.

        Args:
            messages: the conversation, dicts with at least ``"role"`` and ``"content"``.
            add_generation_prompt: end with the opening of an assistant turn (for generation).
            tokenize: return token ids (encoded without adding special tokens: the template writes
                any BOS itself); False returns the rendered text.
            **kwargs: more variables for the template (e.g. ``tools``, ``enable_thinking``);
                ``bos_token``, ``eos_token`` and ``pad_token`` are always provided.

        Returns:
            ``list[int]`` token ids, or ``str`` with ``tokenize=False``.

        Raises:
            ValueError: the tokenizer has no chat template.
        """
        if self.chat_template is None:
            raise ValueError("Tokenizer: this tokenizer has no chat_template")
        text = _render(self.chat_template, messages=list(messages), add_generation_prompt=add_generation_prompt,
                       bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                       pad_token=self.pad_token or "", **kwargs)
        # the template already wrote BOS if it wants one
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _is_file(text: str) -> bool:
    """Whether a corpus entry names a file (a long text line is not a path: the OS refuses it)."""
    try:
        return len(text) < 4096 and "\n" not in text and Path(text).is_file()
    except (OSError, ValueError):
        return False


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
