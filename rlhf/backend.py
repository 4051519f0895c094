"""Device backends: the precision policy and the speed levers of one kind of device,
applied once when models are built. The trainer asks the backend; it never branches on
dtype or device type itself.

- `Backend`: any device. bf16 runs forwards under autocast; frozen linear layers are then
  stored in bf16 and attention may run in fp32 (`model.fp32_attention`).
- `CPUBackend`: adds the CPU levers: thread count, keeping freed memory mapped
  (`rlhf.memory`), oneDNN matmuls for fp32 linears and prepacked decoding weights
  (`rlhf.onednn`).
"""

from __future__ import annotations

from contextlib import nullcontext

import logging

import torch
from torch import nn

from rlhf import memory, onednn
from rlhf.precision import Precision

log = logging.getLogger(__name__)


def fp32_attention(model: nn.Module) -> nn.Module:
    """Under bf16 autocast, compute attention (softmax(QK^T/sqrt(d)) V) in fp32; the linear
    layers stay bf16. torch's bf16 attention kernels on the CPU are much slower than fp32 at
    these sizes, and fp32 is the more precise. Applies to models using transformers' `sdpa`
    attention; others are left as they are."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
        with torch.autocast(query.device.type, enabled=False):
            return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)

    AttentionInterface.register("rlhf_fp32_sdpa", sdpa_in_fp32)
    AttentionMaskInterface.register("rlhf_fp32_sdpa", sdpa_mask)
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(hf_model.config, "_attn_implementation", None) == "sdpa":
        hf_model.set_attn_implementation("rlhf_fp32_sdpa")
    return model


def frozen_linears_to_bf16(model: nn.Module) -> nn.Module:
    """Store the weights of frozen linear layers in bf16, for a model that only ever runs
    under bf16 autocast: autocast casts them to bf16 on every forward anyway (the numbers
    are the same), so this saves that cast each time and half their memory. Weights tied to
    an embedding stay fp32 (the lookup is not autocast)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad and id(module.weight) not in embeddings:
            module.to(torch.bfloat16)
    # transformers maps the checkpoint file into memory (storages that cannot be resized);
    # the file stays resident while one tensor points into it, so the fp32 weights kept
    # here (embedding, norms) are copied out and the fp32 pages of the cast linears released.
    for param in model.parameters():
        if not param.untyped_storage().resizable():
            param.data = param.data.clone()
    return model


class Backend:
    """Precision and levers that hold on any device."""

    def __init__(self, device: torch.device, precision: Precision, model_cfg=None, rollout_cfg=None):
        self.device = torch.device(device)
        self.precision = precision
        self.model_cfg = model_cfg
        self.rollout_cfg = rollout_cfg

    def setup_process(self, train_cfg) -> None:
        """Process-wide settings, before any model is built."""

    def prepare_frozen(self, model: nn.Module) -> nn.Module:
        """A model that only runs forwards (reference, reward model, a LoRA policy's base)."""
        if self.precision.bf16:
            frozen_linears_to_bf16(model)
        return model

    def prepare_model(self, model: nn.Module, checkpointed: bool = False) -> nn.Module:
        """Any model that runs forwards under this backend (after `prepare_frozen`)."""
        if self.precision.bf16 and self.model_cfg is not None and self.model_cfg.fp32_attention:
            fp32_attention(model)
        return model

    def decoding(self, model: nn.Module, batch: int):
        """Context for the decoding loop of `batch` sequences."""
        return nullcontext()

    def autocast(self):
        return self.precision.autocast(self.device)


class CPUBackend(Backend):
    """The CPU: threads, allocator, oneDNN matmuls and prepacked decoding weights."""

    def setup_process(self, train_cfg) -> None:
        if train_cfg.threads:
            torch.set_num_threads(train_cfg.threads)
        if train_cfg.keep_freed_memory:
            memory.keep_freed_memory()  # no page faults on each step's large tensors
        if not onednn.available() and self.model_cfg is not None and (
                self.model_cfg.onednn_matmul or (self.rollout_cfg is not None and self.rollout_cfg.packed_decoding)):
            log.warning("torch %s has no oneDNN linear operator (torch.ops.mkldnn._linear_pointwise): fp32 matmuls "
                        "and decoding run on torch's default kernels, slower on the CPU", torch.__version__)

    def prepare_model(self, model: nn.Module, checkpointed: bool = False) -> nn.Module:
        if not self.precision.bf16 and self.model_cfg is not None and self.model_cfg.onednn_matmul:
            # MKL runs these fp32 matmuls well below oneDNN's rate on AMD processors; the
            # lean gated MLP saves nothing under checkpointing, which keeps no activations.
            onednn.use_onednn(model, lean_mlp=not checkpointed)
        return super().prepare_model(model, checkpointed)

    def decoding(self, model: nn.Module, batch: int):
        cfg = self.rollout_cfg
        if cfg is not None and cfg.packed_decoding and cfg.max_new_tokens > 1:
            # The small (batch x hidden) matmuls of a decoding step run far below the
            # machine's rate with unpacked weights.
            return onednn.packed_for_decoding(model, batch, self.precision.compute_dtype)
        return nullcontext()


def make_backend(device: torch.device, precision: Precision, model_cfg=None, rollout_cfg=None) -> Backend:
    cls = CPUBackend if torch.device(device).type == "cpu" else Backend
    return cls(device, precision, model_cfg, rollout_cfg)
