"""fastrlhf.ops: the public functional API over the compiled kernels.

Every op takes ``impl="auto" | "kernel" | "reference"``: ``auto`` runs the compiled kernel
when the extension supports the device and dtype, else the pure-PyTorch reference in
``fastrlhf.ops.reference``. ``FASTRLHF_FORCE_REFERENCE=1`` forces the reference everywhere.
Inputs are validated here; errors name the argument and what was expected.
"""

from fastrlhf.ops import reference
from fastrlhf.ops._common import AggMode, Impl, KLEstimator
from fastrlhf.ops.attention import attention, decode_attention
from fastrlhf.ops.gae import GAE, GAEOutput, discounted_returns, gae
from fastrlhf.ops.group_advantages import GroupAdvantages, group_advantages
from fastrlhf.ops.kl_penalty import KLPenalty, kl_penalty
from fastrlhf.ops.linear_token_logprobs import LinearTokenLogprobs, linear_token_logprobs
from fastrlhf.ops.linear_token_loss import LinearTokenLossOutput, linear_token_loss
from fastrlhf.ops.policy_loss import PolicyLoss, PPOLoss, policy_loss
from fastrlhf.ops.preference_loss import PreferenceLoss, preference_loss
from fastrlhf.ops.sample import SampleOutput, sample
from fastrlhf.ops.td_targets import q_update, td_targets
from fastrlhf.ops.token_logprobs import TokenLogprobs, token_logprobs
from fastrlhf.ops.value_loss import ValueLoss, value_loss
from fastrlhf.ops.whiten import Whiten, whiten

__all__ = [
    "reference",
    "Impl",
    "AggMode",
    "KLEstimator",
    "gae",
    "GAE",
    "GAEOutput",
    "discounted_returns",
    "group_advantages",
    "GroupAdvantages",
    "whiten",
    "Whiten",
    "td_targets",
    "q_update",
    "token_logprobs",
    "TokenLogprobs",
    "linear_token_logprobs",
    "LinearTokenLogprobs",
    "linear_token_loss",
    "LinearTokenLossOutput",
    "kl_penalty",
    "KLPenalty",
    "policy_loss",
    "PolicyLoss",
    "PPOLoss",
    "value_loss",
    "preference_loss",
    "PreferenceLoss",
    "ValueLoss",
    "sample",
    "SampleOutput",
    "attention",
    "decode_attention",
]
