"""fastrlhf.trainers: SFT, reward models, PPO, GRPO / Dr. GRPO / RLOO / REINFORCE++, DPO / IPO
and online DPO, on a shared base (micro-batches, autocast, clipping, schedule, progress,
checkpoints with exact resume, metrics, guardrails)."""

from fastrlhf.trainers.base import BatchSampler, Reducer, TrainConfig, Trainer
from fastrlhf.trainers.dpo import DPOConfig, DPOTrainer, OnlineDPOConfig, OnlineDPOTrainer
from fastrlhf.trainers.grpo import GRPOConfig, GRPOTrainer
from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer
from fastrlhf.trainers.reward import RewardConfig, RewardTrainer
from fastrlhf.trainers.rl import RLConfig
from fastrlhf.trainers.sft import SFTConfig, SFTTrainer

__all__ = ["TrainConfig", "Trainer", "Reducer", "BatchSampler", "SFTConfig", "SFTTrainer", "RewardConfig",
           "RewardTrainer", "RLConfig", "PPOConfig", "PPOTrainer", "GRPOConfig", "GRPOTrainer", "DPOConfig",
           "DPOTrainer", "OnlineDPOConfig", "OnlineDPOTrainer"]
