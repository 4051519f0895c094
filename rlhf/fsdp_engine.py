"""Sharded training with torch's FSDP2 (`train.distributed: fsdp2`).

Accelerate (or torchrun) starts the processes and the process group (gloo on CPUs, NCCL on
GPUs); this engine then applies `torch.distributed.fsdp.fully_shard` itself, once per
decoder layer and once on the root of every trained model, so each process keeps 1/N of
their parameters, gradients and optimiser state (Accelerate sets FSDP up on accelerators
only; the same calls run on both). The frozen reference is sharded too when asked
(`train.shard_reference`); the reward model stays whole.

What needs whole weights gets them gathered, on every process: generation runs on an
unsharded copy of the policy refreshed after each update (`GatheredGenerator`), and the
final save writes plain Hugging Face checkpoints. Checkpoints are sharded with
`torch.distributed.checkpoint`: each process writes its own shard of the weights and
optimiser state.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rlhf.engine import AccelerateEngine
from rlhf.errors import NonFiniteError, UserInputError

log = logging.getLogger(__name__)


def ensure_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group even for one process; a run started without a launcher
    gets a group of one (gloo on CPUs, NCCL on GPUs)."""
    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (the classes it names in `_no_split_modules`,
    e.g. LlamaDecoderLayer): the units FSDP2 gathers one at a time."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    inner = getattr(model, "base_model", model)
    names |= set(getattr(inner, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def unsharded_class(module: nn.Module) -> type:
    """The model class under FSDP2's wrapper class (FSDPLlamaForCausalLM -> LlamaForCausalLM)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def local_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes this process holds of a module's parameters and its optimiser state (the local
    shards of sharded tensors)."""
    from torch.distributed.tensor import DTensor

    def size(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    total = sum(size(p) for p in module.parameters())
    if optimizer is not None:
        total += sum(size(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return total


class FSDP2Engine(AccelerateEngine):
    """FSDP2 over the processes Accelerate launched: the collectives, metrics and clock of
    `AccelerateEngine`, with the models, gradients, optimiser state and checkpoints sharded."""

    shards_parameters = True

    def __init__(self, accelerator=None, shard_reference: bool = False):
        super().__init__(accelerator)
        from torch.distributed.device_mesh import init_device_mesh

        ensure_process_group(self.device)
        # A token-classification critic's logits are a view; rlhf reads them out of place
        # (rollout.critic_forward), which is what FSDP2's warning asks for.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        self.mesh = init_device_mesh(self.device.type, (self.world,))
        self.shard_reference = shard_reference
        self.trained: list[tuple[nn.Module, torch.optim.Optimizer]] = []
        self.schedulers: list = []
        self.weights_version = 0
        """Counts changes of the sharded weights (steps, loads): whole copies compare it."""

    # Models and gradients ------------------------------------------------------------

    def shard(self, module: nn.Module) -> nn.Module:
        """fully_shard each decoder layer, then the root (embeddings, norm, head, and any
        module without layers, such as a value head)."""
        from torch.distributed.fsdp import fully_shard

        module.to(self.device)
        for layer in decoder_layers(module):
            fully_shard(layer, mesh=self.mesh)
        return fully_shard(module, mesh=self.mesh, shard_placement_fn=self._placement)

    def _placement(self, param: nn.Parameter):
        """Rows (dim 0) as usual; a matrix with fewer rows than processes (a value head's
        1 x hidden weight) by its widest dimension instead, so it is spread too."""
        from torch.distributed.tensor import Shard

        if param.dim() < 2 or param.shape[0] >= self.world:
            return Shard(0)
        return Shard(max(range(param.dim()), key=lambda d: param.shape[d]))

    def prepare(self, *objects):
        """Shard the modules and point their optimisers at the sharded parameters. Objects
        come as the trainer passes them: modules, then their optimisers, then their schedules,
        in the same order (module i is trained by optimiser i)."""
        modules = [o for o in objects if isinstance(o, nn.Module)]
        optimizers = [o for o in objects if isinstance(o, torch.optim.Optimizer)]
        for module, opt in zip(modules, optimizers):
            names = {id(p): n for n, p in module.named_parameters()}
            self.shard(module)
            sharded = dict(module.named_parameters())
            for group in opt.param_groups:
                group["params"] = [sharded[names[id(p)]] for p in group["params"]]
            self.trained.append((module, opt))
        self.schedulers += [o for o in objects if not isinstance(o, (nn.Module, torch.optim.Optimizer))]
        return objects

    def prepare_frozen(self, module: nn.Module) -> nn.Module:
        return self.shard(module) if self.shard_reference else module

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module  # FSDP2 shards in place: the module keeps its class's methods and names

    @contextmanager
    def accumulating(self, modules, last: bool):
        """Gradients of earlier micro-batches stay local and unsharded; the last one's
        backward reduce-scatters the sum."""
        modules = list(modules)
        for module in modules:
            module.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            for module in modules:
                module.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def apply_gradients(self, optimizers: dict, modules: dict, max_grad_norm: float | None) -> None:
        """As `AccelerateEngine.apply_gradients`, on sharded gradients: the norm is of the
        whole gradient (torch reduces it over the shards)."""
        from torch.distributed.tensor import DTensor

        for name, module in modules.items():
            params = [q for q in module.parameters() if q.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")) if params else torch.zeros(())
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            if not torch.isfinite(norm):
                for opt in optimizers.values():
                    opt.zero_grad(set_to_none=True)
                raise NonFiniteError(f"non-finite {name} gradient norm; the optimiser step was refused")
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.weights_version += 1

    # Whole weights ---------------------------------------------------------------------

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Every weight of a sharded module, whole, on every process (a collective: all
        processes call it together)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))

    def full_model(self, module: nn.Module) -> nn.Module:
        """An unsharded copy of a sharded transformers model, on this process's device (a
        collective: all processes call it together)."""
        from transformers.initialization import no_init_weights

        with torch.random.fork_rng(devices=[]), no_init_weights():
            copy = unsharded_class(module)(module.config)
        copy.to(device=self.device, dtype=next(module.parameters()).dtype)
        for name, buffer in module.named_buffers():  # FSDP2 leaves buffers whole
            copy.get_buffer(name).copy_(buffer)
        self.refresh(copy, module)
        if getattr(module, "generation_config", None) is not None:
            copy.generation_config = module.generation_config
        return copy.eval().requires_grad_(False)

    @torch.no_grad()
    def refresh(self, copy: nn.Module, module: nn.Module) -> None:
        """Copy the sharded module's current weights into an unsharded `copy` of it, one
        parameter at a time (the gathered whole tensors never all exist at once)."""
        from torch.distributed.tensor import DTensor

        target = dict(copy.named_parameters())
        if target.keys() != dict(module.named_parameters()).keys():
            raise RuntimeError(f"{type(copy).__name__}: the copy's parameters are not the sharded module's")
        for name, param in module.named_parameters():
            target[name].copy_(param.full_tensor() if isinstance(param, DTensor) else param)

    # State on disk ------------------------------------------------------------------

    def _sharded_states(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        states = {}
        for i, (module, opt) in enumerate(self.trained):
            states[f"model{i}"], states[f"optim{i}"] = get_state_dict(module, opt)
        return states

    def save_state(self, directory: str) -> None:
        """Weights and optimiser state as a torch.distributed.checkpoint (one file per process
        under `sharded/`), schedules as JSON (main process), random states as JSON plus
        safetensors (every process): nothing that loading would have to unpickle."""
        import torch.distributed.checkpoint as dcp

        directory = Path(directory)
        dcp.save(self._sharded_states(), checkpoint_id=str(directory / "sharded"))
        if self.is_main:
            (directory / "schedules.json").write_text(json.dumps([s.state_dict() for s in self.schedulers]))
        write_random_states(directory, self.rank)

    def load_state(self, directory: str) -> None:
        """Restore what `save_state` wrote. The weights reshard to any number of processes;
        random states are restored per rank where the checkpoint has one."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        directory = Path(directory)
        if not (directory / "sharded").is_dir():
            raise UserInputError(f"--resume: {directory} was written with train.distributed=ddp; "
                                 "resume with the setting the run was written with")
        states = self._sharded_states()
        dcp.load(states, checkpoint_id=str(directory / "sharded"))
        for i, (module, opt) in enumerate(self.trained):
            set_state_dict(module, opt, model_state_dict=states[f"model{i}"], optim_state_dict=states[f"optim{i}"])
        for scheduler, state in zip(self.schedulers, json.loads((directory / "schedules.json").read_text())):
            scheduler.load_state_dict(state)
        read_random_states(directory, self.rank)
        self.weights_version += 1


def write_random_states(directory: Path, rank: int) -> None:
    """Python's and numpy's generator states as JSON, torch's as safetensors (a torch.save of
    them would need an unrestricted unpickler to read back)."""
    from safetensors.torch import save_file

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    (directory / f"random_states_{rank}.json").write_text(json.dumps(state))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(directory / f"random_states_{rank}.safetensors"))


def read_random_states(directory: Path, rank: int) -> None:
    """Restore what `write_random_states` wrote for `rank`; a rank the checkpoint lacks (more
    processes than it was written with) keeps its own states."""
    from safetensors.torch import load_file

    path = directory / f"random_states_{rank}.json"
    if not path.is_file():
        return
    state = json.loads(path.read_text())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(directory / f"random_states_{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


class GatheredGenerator:
    """The lean decoding loop (`LocalGenerator`) on an unsharded copy of the sharded policy.
    Every process holds the copy (sampling runs on each process's own prompts, with no
    collective per token); it is refreshed whenever the sharded weights changed (an update,
    a resume) before the next rollout."""

    def __init__(self, engine: FSDP2Engine, policy: nn.Module, cfg, tokenizer, backend):
        from rlhf.generation import LocalGenerator

        self.engine, self.policy = engine, policy
        self.copy = backend.prepare_model(backend.prepare_frozen(engine.full_model(policy)))
        self.version = engine.weights_version
        self.inner = LocalGenerator(self.copy, cfg, tokenizer, backend)

    def generate(self, prompt_ids: list[list[int]]):
        if self.version != self.engine.weights_version:
            self.engine.refresh(self.copy, self.policy)
            self.version = self.engine.weights_version
        return self.inner.generate(prompt_ids)

    def update_weights(self, policy: nn.Module) -> None:
        self.policy = policy  # gathered lazily, before the next rollout


__all__ = ["FSDP2Engine", "GatheredGenerator", "local_bytes", "decoder_layers"]
