"""One PPO step on fixed responses, run by tests/test_distributed.py in one process or under
`accelerate launch --cpu --num_processes 2`.

Generation is replaced by fixed responses (a function of the prompt index) so that one
process on the global batch and two processes on its halves see the same sequences; every
other part of the step is the trainer's own: prompt sharding, scoring, reward and advantage
statistics over all processes, gradient averaging, the optimiser step, metric reduction.

    python distributed_worker.py CONFIG.yaml OUT.pt
"""

import sys

import torch

from rlhf.cli import end_launched_process
from rlhf.config import Config, load_config
from rlhf.data import left_pad
from rlhf.ppo import PPOTrainer
from rlhf.experience import Rollout

RESPONSE_WIDTH = 8


def fixed_rollout(trainer: PPOTrainer, indices: list[int]) -> Rollout:
    """The k-th sample of prompt i is answered by byte tokens derived from i and k, ending
    with EOS after 2 + (i + k) % 5 of them: different lengths, so the token weighting across
    processes is exercised, and different answers within a group of samples of one prompt."""
    tok = trainer.tokenizer
    prompt_ids, prompt_mask = left_pad([trainer.prompt_ids[i] for i in indices], tok.pad_token_id)
    response_ids = torch.full((len(indices), RESPONSE_WIDTH), tok.pad_token_id)
    lengths = []
    for row, i in enumerate(indices):
        k = indices[:row].count(i)
        n = 2 + (i + k) % 5
        response_ids[row, :n] = torch.tensor([tok.convert_tokens_to_ids("a") + (7 * i + 3 * t + 5 * k) % 26
                                              for t in range(n)])
        response_ids[row, n] = tok.eos_token_id
        lengths.append(n)
    response_mask = (torch.arange(RESPONSE_WIDTH)[None] <= torch.tensor(lengths)[:, None]).float()
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, torch.ones(len(indices), dtype=torch.bool))


class FixedGenerator:
    """The generation seam answered by `fixed_rollout`."""

    def __init__(self, trainer: PPOTrainer):
        self.trainer = trainer

    def generate(self, prompt_ids: list[list[int]]) -> Rollout:
        return fixed_rollout(self.trainer, [self.trainer.prompt_ids.index(ids) for ids in prompt_ids])

    def update_weights(self, policy) -> None:
        pass


def main(config_path: str, out_path: str) -> None:
    trainer = PPOTrainer(load_config(Config, config_path))
    acc = trainer.accelerator
    # The real sampler, same prompt on every process.
    samples = acc.gather(trainer.generator.generate([trainer.prompt_ids[0]]).response_ids)
    trainer.generator = FixedGenerator(trainer)
    metrics = trainer.step_once()
    if acc.is_main_process:
        torch.save({"policy": acc.unwrap_model(trainer.policy).state_dict(),
                    "critic": acc.unwrap_model(trainer.critic).state_dict() if trainer.critic is not None else {},
                    "metrics": metrics, "world": acc.num_processes, "samples": samples}, out_path)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    end_launched_process(0)  # under a launch, leave as `rlhf` does
