"""Pure-PyTorch references of every fastrlhf op: the oracle in tests and a baseline in bench.

They favour clarity over speed (loops where the math is a recurrence) and accumulate in fp32
(fp64 for fp64 inputs), like the kernels. Each takes already-validated arguments.
"""

from fastrlhf.ops.reference.attention import attention, decode_attention
from fastrlhf.ops.reference.gae import discounted_returns, gae
from fastrlhf.ops.reference.group_advantages import group_advantages
from fastrlhf.ops.reference.losses import kl_penalty, policy_loss, value_loss
from fastrlhf.ops.reference.preference_loss import preference_loss
from fastrlhf.ops.reference.sample import processed_distribution, sample
from fastrlhf.ops.reference.td_targets import q_update, td_targets
from fastrlhf.ops.reference.token_logprobs import linear_token_logprobs, linear_token_loss, token_logprobs
from fastrlhf.ops.reference.whiten import whiten

__all__ = ["gae", "discounted_returns", "group_advantages", "whiten", "td_targets", "q_update",
           "token_logprobs", "linear_token_logprobs", "linear_token_loss",
           "kl_penalty", "policy_loss", "value_loss", "preference_loss",
           "sample", "processed_distribution", "attention", "decode_attention"]
