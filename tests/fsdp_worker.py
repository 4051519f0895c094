"""One PPO step on fixed responses (tests/distributed_worker.py) under the engine the config
names, run by tests/test_fsdp.py in one process or under `accelerate launch` with two. Saves
the whole trained weights, the metrics, a real sample, the bytes of parameters and optimiser
state each process holds, and writes the final checkpoint.

    python fsdp_worker.py CONFIG.yaml OUT.pt
"""

import sys

import torch

from distributed_worker import FixedGenerator
from rlhf.cli import end_launched_process
from rlhf.config import Config, load_config
from rlhf.fsdp_engine import local_bytes
from rlhf.ppo import PPOTrainer


def main(config_path: str, out_path: str) -> None:
    trainer = PPOTrainer(load_config(Config, config_path))
    engine = trainer.engine
    sample = trainer.generator.generate([trainer.prompt_ids[0]]).response_ids  # the real sampler
    trainer.generator = FixedGenerator(trainer)
    metrics = trainer.step_once()
    held = {name: local_bytes(module, trainer.updater.optimizers[name]) for name, module in trainer.models.trained.items()}
    held = engine.gather_objects([held])
    weights = {name: engine.full_state_dict(module) for name, module in trainer.models.trained.items()}
    trainer.save_final()
    if engine.is_main:
        torch.save({**weights, "metrics": metrics, "world": engine.world, "sample": sample, "bytes": held,
                    "engine": type(engine).__name__}, out_path)
    engine.wait()
    engine.end()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    end_launched_process(0)
