"""The training-engine seam: how models are wrapped for several processes, how gradients
are accumulated, synchronised and applied, the collectives the statistics need, and the
training state on disk.

`AccelerateEngine` is data parallelism (DDP) through Accelerate, on CPUs or GPUs;
`rlhf.fsdp_engine.FSDP2Engine` shards the trained models with FSDP2 and implements the same
methods (`make_engine` picks by `train.distributed`); the trainer calls nothing else.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from typing import Iterable, Protocol

import torch
from torch import nn

from rlhf import algos
from rlhf.errors import NonFiniteError, UserInputError


class TrainingEngine(Protocol):
    """What the trainer needs from a training backend (see `AccelerateEngine` for each)."""

    device: torch.device
    rank: int
    world: int
    is_main: bool
    shards_parameters: bool

    def prepare(self, *objects): ...
    def prepare_frozen(self, module: nn.Module) -> nn.Module: ...
    def unwrap(self, module: nn.Module) -> nn.Module: ...
    def accumulating(self, modules: Iterable[nn.Module], last: bool): ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def apply_gradients(self, optimizers: dict, modules: dict, max_grad_norm: float | None) -> None: ...
    def gather(self, x: torch.Tensor) -> torch.Tensor: ...
    def gather_objects(self, items: list) -> list: ...
    def mean(self, x: torch.Tensor) -> torch.Tensor: ...
    def sum(self, x: torch.Tensor) -> torch.Tensor: ...
    def reduce_mean(self, value: float) -> float: ...
    def full_state_dict(self, module: nn.Module) -> dict: ...
    def full_model(self, module: nn.Module) -> nn.Module: ...
    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor: ...
    def whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor: ...
    def save_state(self, directory: str) -> None: ...
    def load_state(self, directory: str) -> None: ...
    def wait(self) -> None: ...
    def clock(self) -> float: ...
    def end(self) -> None: ...


def make_accelerator():
    """The Accelerator of this launch; a setup Accelerate cannot build (FSDP asked for on a
    machine without accelerators, say) is a one-line configuration error."""
    from accelerate import Accelerator

    try:
        return Accelerator()
    except (RuntimeError, ValueError) as e:
        raise UserInputError(f"accelerate config: {e}") from None


def make_engine(train_cfg, accelerator=None) -> TrainingEngine:
    """The engine `train.distributed` names: `ddp` (AccelerateEngine) or `fsdp2` (FSDP2Engine)."""
    if train_cfg.distributed == "fsdp2":
        from rlhf.fsdp_engine import FSDP2Engine

        return FSDP2Engine(accelerator, shard_reference=train_cfg.shard_reference)
    return AccelerateEngine(accelerator)


def check_data_parallel(accelerator) -> None:
    """Refuse the Accelerate setups that shard parameters or wrap models themselves (FSDP,
    DeepSpeed, Megatron-LM): rlhf shards with FSDP2 itself (`train.distributed=fsdp2`) over
    processes Accelerate launched for data parallelism; under Accelerate's own sharding a run
    would stop deep inside a library or hang, not train."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise UserInputError(
            f"accelerate config: distributed type {kind.value} is not supported; launch with `accelerate launch "
            "--multi_gpu` (DDP), and set train.distributed=fsdp2 to shard the trained models")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        # On CPUs Accelerate turns an FSDP2 config into data parallelism, while transformers still
        # loads the weights of every process but the first on the meta device for FSDP to fill.
        raise UserInputError(
            "accelerate config: FSDP was asked for through Accelerate, which runs it only on accelerators and "
            f"set up {kind.value} here; launch with `accelerate launch --multi_gpu` and set train.distributed=fsdp2")


class AccelerateEngine:
    """Data parallelism through Accelerate: one full copy of every model per process,
    gradients averaged across processes on the last micro-batch of each minibatch."""

    shards_parameters = False

    def __init__(self, accelerator=None):
        self.accelerator = acc = accelerator or make_accelerator()
        check_data_parallel(acc)
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process

    # Models and gradients ------------------------------------------------------------

    def prepare(self, *objects):
        return self.accelerator.prepare(*objects)

    def prepare_frozen(self, module: nn.Module) -> nn.Module:
        """A frozen model (the reference): every process keeps it whole."""
        return module

    def unwrap(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module)

    def full_state_dict(self, module: nn.Module) -> dict:
        """Every weight of `module`, whole (sharding engines gather it: call on every process)."""
        return self.unwrap(module).state_dict()

    def full_model(self, module: nn.Module) -> nn.Module:
        """The whole model (sharding engines return a gathered copy: call on every process)."""
        return self.unwrap(module)

    def accumulating(self, modules: Iterable[nn.Module], last: bool):
        """Context of one micro-batch's backward: DDP syncs gradients on the last one only."""
        stack = ExitStack()
        if not last and self.world > 1:
            for module in modules:
                stack.enter_context(self.accelerator.no_sync(module))
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def apply_gradients(self, optimizers: dict, modules: dict, max_grad_norm: float | None) -> None:
        """Clip each module's gradients to `max_grad_norm` (global norm; 0/None: no clip),
        refuse the step when a norm is not finite, then step and zero every optimiser.
        `optimizers` and `modules` share their keys (names used in the error)."""
        for name, module in modules.items():
            params = [q for q in module.parameters() if q.grad is not None]
            if max_grad_norm:
                norm = self.accelerator.clip_grad_norm_(params, max_grad_norm)
            else:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(q.grad) for q in params])) \
                    if params else torch.zeros(())
            if not torch.isfinite(torch.as_tensor(norm)):
                for opt in optimizers.values():
                    opt.zero_grad(set_to_none=True)
                raise NonFiniteError(f"non-finite {name} gradient norm; the optimiser step was refused")
        for opt in optimizers.values():
            opt.step()
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)

    # Collectives over all processes -------------------------------------------------

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """A per-sequence tensor of every process, concatenated in rank order."""
        return self.accelerator.gather(x)

    def gather_objects(self, items: list) -> list:
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of a per-sequence tensor over all processes."""
        return self.accelerator.gather(x).float().mean()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over all its elements and all processes."""
        return self.accelerator.reduce(x.sum(), "sum") if self.world > 1 else x.sum()

    def reduce_mean(self, value: float) -> float:
        """A python float averaged over processes (through a float32 tensor on any world size)."""
        return self.accelerator.reduce(torch.tensor(value, device=self.device), "mean").item()

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """A per-token (B, R) tensor of every process, padded to the widest R (with zeros)."""
        if self.world == 1:
            return x
        return self.accelerator.gather(self.accelerator.pad_across_processes(x, dim=1))

    def whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """Masked whitening with the statistics of the global batch (all processes)."""
        if self.world == 1:
            return algos.masked_whiten(x, mask, shift_mean)
        return algos.masked_whiten(x, mask, shift_mean, stats_from=(self.gather_tokens(x), self.gather_tokens(mask)))

    # State on disk ------------------------------------------------------------------

    def save_state(self, directory: str) -> None:
        """Weights as safetensors; optimiser and random states through torch.save (the
        learning-rate schedules are not prepared: they travel in the trainer's state)."""
        self.accelerator.save_state(directory, safe_serialization=True)

    def load_state(self, directory: str) -> None:
        """Accelerate reads all of it back with `weights_only=True`: nothing registered as a
        custom object, whose pickles it would load with `weights_only=False`."""
        if os.path.isdir(os.path.join(directory, "sharded")):
            raise UserInputError(f"--resume: {directory} was written with train.distributed=fsdp2; "
                                 "resume with the setting the run was written with")
        self.accelerator.load_state(directory)

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def clock(self) -> float:
        """time.perf_counter() once the device has run its queued work (CUDA is asynchronous:
        without this a phase's time would land in whichever phase next waits on a result)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def end(self) -> None:
        """Destroys the process group under `accelerate launch`."""
        self.accelerator.end_training()
