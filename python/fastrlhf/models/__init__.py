"""fastrlhf.models: the Llama-family ``CausalLM`` (training forward through ``ops.attention``,
KV-cache decode through ``ops.decode_attention``), value / reward heads, LoRA adapters,
Hugging Face import/export and tokenizers. Checkpoints are safetensors + config.json."""

from fastrlhf.models.cache import KVCache
from fastrlhf.models.config import MODEL_TYPES, CausalLMConfig
from fastrlhf.models.heads import PolicyWithValue, RewardModel, ValueHead, ValueModel, last_token_index
from fastrlhf.models.llama import CausalLM, LlamaTrunk, RMSNorm
from fastrlhf.models.lora import (
    LoRALinear,
    apply_lora,
    load_lora,
    lora_disabled,
    lora_merged,
    merge_lora,
    merged_state_dict,
    save_lora,
)
from fastrlhf.models.pretrained import load_smollm2
from fastrlhf.models.tokenizer import Tokenizer

__all__ = [
    "CausalLM",
    "CausalLMConfig",
    "MODEL_TYPES",
    "KVCache",
    "LlamaTrunk",
    "RMSNorm",
    "ValueHead",
    "ValueModel",
    "RewardModel",
    "PolicyWithValue",
    "last_token_index",
    "LoRALinear",
    "apply_lora",
    "lora_disabled",
    "lora_merged",
    "merge_lora",
    "merged_state_dict",
    "save_lora",
    "load_lora",
    "Tokenizer",
    "load_smollm2",
]
