"""rlhf: reinforcement learning from human feedback (PPO, A2C, Bradley-Terry reward models).

The public API, imported on first use (``import rlhf`` stays light):

- configs: `Config`, `load_config`
- the trainer and its stages: `PPOTrainer`, `ExperienceMaker`, `Updater`, `ActorCritic`
- data: `Rollout`, `Experience`
- seams: `Generator`, `LocalGenerator` (generation), `TrainingEngine`, `AccelerateEngine`,
  `FSDP2Engine` (training), `Backend`, `CPUBackend` (device levers)
- maths: `rlhf.algos` (`register_advantage_estimator`, `register_policy_loss`, ...)
- errors: `UserInputError`, `ConfigError`, `NonFiniteError`
- reward models: `RewardModelConfig`, `train_reward_model`
- the offline stages: `SFTConfig`, `SFTTrainer`, `DPOConfig`, `DPOTrainer`
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "rlhf.config", "load_config": "rlhf.config",
    "PPOTrainer": "rlhf.ppo", "ExperienceMaker": "rlhf.experience_maker", "Updater": "rlhf.updater",
    "ActorCritic": "rlhf.actor_critic", "Rollout": "rlhf.experience", "Experience": "rlhf.experience",
    "Generator": "rlhf.generation", "LocalGenerator": "rlhf.generation",
    "TrainingEngine": "rlhf.engine", "AccelerateEngine": "rlhf.engine", "FSDP2Engine": "rlhf.fsdp_engine",
    "Backend": "rlhf.backend", "CPUBackend": "rlhf.backend",
    "UserInputError": "rlhf.errors", "ConfigError": "rlhf.errors", "NonFiniteError": "rlhf.errors",
    "RewardModelConfig": "rlhf.reward_model", "train_reward_model": "rlhf.reward_model",
    "SFTConfig": "rlhf.sft", "SFTTrainer": "rlhf.sft", "DPOConfig": "rlhf.dpo", "DPOTrainer": "rlhf.dpo",
    "algos": "rlhf.algos",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return module if name == "algos" else getattr(module, name)
