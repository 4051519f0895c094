"""rlhf: reinforcement learning from human feedback (PPO, A2C, Bradley-Terry reward models)."""

__version__ = "0.1.0"
