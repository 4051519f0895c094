"""The models of one PPO run and their forward passes: the policy (actor), its frozen
reference, and the critic (a separate network, or a value head on the policy's trunk).

`ActorCritic` owns one speed lever: when a single forward over the whole rollout batch is
also the update's first micro-batch, `rollout_forward` runs it with gradients and keeps it,
and `train_forward` hands it back instead of recomputing the same numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from rlhf.experience import Rollout
from rlhf.rollout import critic_forward, policy_forward

log = logging.getLogger(__name__)


@dataclass
class ForwardOut:
    """What the losses need from one forward with gradients, all (B, R)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor


class ActorCritic:
    def __init__(self, policy: nn.Module, critic: nn.Module | None, value_head: nn.Module | None,
                 ref: nn.Module | None, engine, backend, temperature: float, *, checkpointing: bool = False,
                 entropy_grad: bool = True, keep_rollout_forward: bool = False, share_prefix: bool = False):
        """`critic` or `value_head` (on the policy's last hidden states) is the critic, or
        neither for critic-free estimators (values are then 0); `ref` None means a LoRA
        policy whose adapter-disabled base is the reference. `share_prefix`: the policy's and
        reference's forwards compute a prompt shared by several rows once (`rlhf.prefix`)."""
        self.policy, self.critic, self.value_head, self.ref = policy, critic, value_head, ref
        self.engine, self.backend, self.temperature = engine, backend, temperature
        self.checkpointing, self.entropy_grad = checkpointing, entropy_grad
        self.keep_rollout_forward, self.share_prefix = keep_rollout_forward, share_prefix
        self._kept: tuple[Rollout, ForwardOut] | None = None

    @property
    def has_critic(self) -> bool:
        return self.critic is not None or self.value_head is not None

    @property
    def trained(self) -> dict[str, nn.Module]:
        """The modules with their own optimiser, by name."""
        critic = self.value_head if self.value_head is not None else self.critic
        return {"policy": self.policy, **({"critic": critic} if critic is not None else {})}

    def unwrapped_policy(self) -> nn.Module:
        return self.engine.unwrap(self.policy)

    # Scoring (no gradients, or kept for the update) ---------------------------------

    def rollout_forward(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi_old and V_old of the rollout, (B, R) each, detached; values 0 on padding."""
        mask = rollout.response_mask
        if self.keep_rollout_forward:
            out = self._train_forward(rollout)
            self._kept = (rollout, out)
            return out.logprobs.detach(), out.values.detach() * mask
        with torch.no_grad():
            logprobs, _, hidden = policy_forward(self.policy, rollout, self.temperature, self.backend.precision,
                                                 with_hidden=self.value_head is not None, **self._sharing())
            values = self._values(rollout, hidden) * mask
        return logprobs, values

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        """log pi of the response tokens under the current policy."""
        return policy_forward(self.policy, rollout, self.temperature, self.backend.precision, **self._sharing())[0]

    @torch.no_grad()
    def ref_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """log pi_ref of the response tokens."""
        if self.ref is not None:
            return policy_forward(self.ref, rollout, self.temperature, self.backend.precision,
                                  **self._sharing(self.ref))[0]
        with self.unwrapped_policy().disable_adapter():
            return policy_forward(self.policy, rollout, self.temperature, self.backend.precision,
                                  **self._sharing())[0]

    def _sharing(self, model: nn.Module | None = None) -> dict:
        """policy_forward's prefix sharing arguments; the prefix runs on the unwrapped model
        (a DDP wrapper expects one forward per backward)."""
        if not self.share_prefix:
            return {}
        return {"share_prefix": True, "prefix_model": model if model is not None else self.unwrapped_policy()}

    def _values(self, rollout: Rollout, hidden: torch.Tensor | None) -> torch.Tensor:
        if self.value_head is not None:
            return self.value_head(hidden.float()).squeeze(-1)
        if self.critic is None:
            return torch.zeros_like(rollout.response_mask)
        return critic_forward(self.critic, rollout, self.backend.precision)

    # The update's forward ------------------------------------------------------------

    def holds_forward_of(self, rollout: Rollout) -> bool:
        """True when the scoring pass over `rollout` is kept for the update."""
        return self._kept is not None and self._kept[0] is rollout

    def train_forward(self, rollout: Rollout, index: torch.Tensor) -> ForwardOut:
        """Log-probs, entropy and values with gradients for the rows `index` of `rollout`.
        The kept scoring pass is used once, when `index` is the whole batch in order."""
        if self.holds_forward_of(rollout) and torch.equal(index.cpu(), torch.arange(rollout.response_ids.shape[0])):
            out, self._kept = self._kept[1], None
            return out
        self._kept = None  # the weights change after this minibatch: a kept pass is stale
        return self._train_forward(rollout.select(index))

    def _train_forward(self, rollout: Rollout) -> ForwardOut:
        # transformers checkpoints only in training mode; dropout is already 0.
        trained = [m for m in (self.policy, self.critic) if m is not None] if self.checkpointing else []
        for model in trained:
            model.train()
        logprobs, entropy, hidden = policy_forward(
            self.policy, rollout, self.temperature, self.backend.precision, with_entropy=True,
            entropy_grad=self.entropy_grad, with_hidden=self.value_head is not None, **self._sharing())
        values = self._values(rollout, hidden)
        for model in trained:
            model.eval()
        return ForwardOut(logprobs, entropy, values)


def load_policy_and_reference(cfg, policy_path, backend):
    """The policy to train (LoRA-wrapped when asked) and the frozen reference: a copy of
    the starting weights, or None under LoRA (the adapter-disabled base is the reference)."""
    from rlhf.models import load_policy

    policy = load_trainable_policy(cfg, policy_path)
    if cfg.model.lora:
        return policy, None
    ref = load_policy(policy_path, cfg.model.trust_remote_code).eval().requires_grad_(False)
    return policy, backend.prepare_frozen(ref.to(backend.device))  # frozen: not prepared, placed by hand


def load_trainable_policy(cfg, policy_path):
    """The policy to train, with activation checkpointing as `cfg.model` asks, wrapped in LoRA
    adapters (peft, on every linear layer) when `cfg.model.lora` is on."""
    from rlhf.models import enable_activation_checkpointing, load_policy

    policy = load_policy(policy_path, cfg.model.trust_remote_code)
    enable_activation_checkpointing(policy, cfg.model.gradient_checkpointing)
    if not cfg.model.lora:
        return policy
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha, lora_dropout=cfg.model.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(policy, lora)


def load_critic_or_head(cfg, policy, policy_path, tokenizer, reward):
    """(critic, value_head): a value head on the policy's trunk, or a separate critic
    started from the reward model, the policy or a directory (same tokenizer required);
    (None, None) when the advantage estimator reads no values."""
    from rlhf import algos
    from rlhf.errors import UserInputError
    from rlhf.models import enable_activation_checkpointing, init_value_head, load_critic, load_tokenizer, resolve_model

    if not algos.advantage_estimator(cfg.ppo.advantage).needs_critic:
        return None, None
    if cfg.model.value_head:
        head = nn.Linear(policy.config.hidden_size, 1)
        init_value_head(head)
        return None, head
    choice = cfg.model.critic
    if choice == "auto":
        choice = "reward" if reward.model is not None and reward.same_tokenizer else "policy"
        log.info("model.critic=auto: the critic starts from the %s", "reward model's backbone" if choice == "reward"
                 else "policy (no reward model with the policy's tokenizer)")
    from_reward = choice == "reward"
    if from_reward:
        if reward.model is None or not reward.same_tokenizer:
            raise UserInputError(
                "model.critic=reward needs a reward model with the policy's tokenizer (values are read "
                "per policy token); use model.critic=auto, policy or a directory")
        critic_path = reward.path
    elif choice == "policy":
        critic_path = policy_path
    else:
        critic_path = resolve_model(cfg.model.critic, cfg.model.cache_dir, field="model.critic")
    critic = load_critic(critic_path, from_reward, cfg.model.trust_remote_code)
    # A TrunkValueModel checkpoints its base model.
    enable_activation_checkpointing(getattr(critic, "trunk", critic), cfg.model.gradient_checkpointing)
    if load_tokenizer(critic_path, "left", cfg.model.trust_remote_code).get_vocab() != tokenizer.get_vocab():
        raise UserInputError(f"model.critic: {critic_path} has another tokenizer than the policy")
    return critic, None
