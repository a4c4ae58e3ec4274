"""fastrlhf.generation: batched KV-cache generation (``generate``) built on ``ops.sample`` and
``ops.decode_attention``, for fastrlhf's ``CausalLM`` and, through an adapter, any Hugging Face
causal LM."""

from fastrlhf.generation.config import GenerationConfig, GenerationOutput
from fastrlhf.generation.engine import generate

__all__ = ["generate", "GenerationConfig", "GenerationOutput"]
