"""Linear layers through oneDNN on the CPU: the matmuls that are nearly all of the work.

torch runs fp32 matmuls on the CPU with MKL, which takes a slow path on AMD processors;
oneDNN runs the same products near the machine's peak. (bf16 under autocast already goes
to oneDNN.)

- `use_onednn(model)`: every fp32 nn.Linear does its forward and both backward matmuls
  with oneDNN. Same maths; the fp32 sums are rounded in another order (~1e-6 relative).
  A gated MLP (Llama's `down(act(gate(x)) * up(x))`) then keeps only `gate(x)` and `up(x)`
  for its backward pass and recomputes `act(gate) * up` there: two of the four
  intermediate-width tensors autograd would keep per layer, for two element-wise
  operations. The gradients are the same numbers.
  (Off under activation checkpointing, which keeps none of them anyway.)
- `packed_for_decoding(model, batch, dtype)`: while decoding, each weight is prepacked
  once into oneDNN's blocked layout for the small (batch x hidden) matmuls of a step,
  which otherwise run far below the machine's rate (fp32 or bf16); a LoRA layer is packed
  with its adapter merged in.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D fp32 tensors, by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b by oneDNN, for 2-D x."""
    y = _matmul_t(x.contiguous(), weight)
    return y + bias if bias is not None else y


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _unrows(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The 2-D output of a Function back in the leading shape of its input. Reshaped out
    here, not inside the Function: autograd forbids in-place changes (Falcon adds to its
    MLP's output in place) to a view created inside a custom Function."""
    return y.reshape(*like.shape[:-1], y.shape[-1])


def _linear_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs: tuple) -> tuple:
    """(dL/dx, dL/dW, dL/db) of y = x W^T + b by oneDNN, each only where `needs` (three
    flags; the third False when there is no bias) asks for it."""
    g = grad.reshape(-1, grad.shape[-1]).contiguous()
    grad_x = _matmul_t(g, weight.t()).reshape(x.shape) if needs[0] else None  # g @ W
    # g^T @ x on transposed views: oneDNN reads the strides (no transposed copies).
    grad_w = _matmul_t(g.t(), x.reshape(-1, x.shape[-1]).t()) if needs[1] else None
    grad_b = g.sum(0) if needs[2] else None
    return grad_x, grad_w, grad_b


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with all three matmuls (y, dL/dx, dL/dW) by oneDNN; x is 2-D."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        return _linear_backward(grad, x, weight, (needs[0], needs[1], ctx.has_bias and needs[2]))


class _OneDNNGatedDown(torch.autograd.Function):
    """y = down(act(gate) * up) for the 2-D outputs `gate` and `up` of a gated MLP's first two
    projections. The backward pass gets `gate` and `up` only and recomputes h = act(gate) *
    up from them; autograd would keep act(gate) and h as well. The matmuls are those of
    _OneDNNLinear and act's and the product's gradients are autograd's own, so every
    gradient is the same number as without this."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, act):
        ctx.act, ctx.has_bias = act, bias is not None
        ctx.save_for_backward(gate, up, weight)
        return _linear(act(gate) * up, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with torch.enable_grad():
            inputs = [gate.detach().requires_grad_(), up.detach().requires_grad_()]
            h = ctx.act(inputs[0]) * inputs[1]
        grad_h, grad_w, grad_b = _linear_backward(grad, h.detach(), weight,
                                                  (needs[0] or needs[1], needs[2], ctx.has_bias and needs[3]))
        grad_gate, grad_up = torch.autograd.grad(h, inputs, grad_h) if grad_h is not None else (None, None)
        return grad_gate, grad_up, grad_w, grad_b, None


def _runs_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu"))


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if _runs_onednn(x, self.weight):
        return _unrows(_OneDNNLinear.apply(_rows(x), self.weight, self.bias), x)
    return F.linear(x, self.weight, self.bias)


def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up, down = self.gate_proj(x), self.up_proj(x), self.down_proj
    # Without gradients (scoring, or decoding with prepacked weights) the plain path: the
    # down projection's own forward, nothing kept.
    if isinstance(down, nn.Linear) and _runs_onednn(gate, down.weight) and torch.is_grad_enabled():
        return _unrows(_OneDNNGatedDown.apply(_rows(gate), _rows(up), down.weight, down.bias, self.act_fn), gate)
    return down(self.act_fn(gate) * up)


def _is_gated_mlp(module: nn.Module) -> bool:
    """A module whose forward is, to the bytecode, transformers' LlamaMLP.forward (which
    many architectures copy): `down_proj(act_fn(gate_proj(x)) * up_proj(x))`."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    code, llama = getattr(getattr(type(module), "forward", None), "__code__", None), LlamaMLP.forward.__code__
    return code is not None and (code.co_code, code.co_names) == (llama.co_code, llama.co_names)


def use_onednn(model: nn.Module, lean_mlp: bool = True) -> nn.Module:
    """Route the fp32 matmuls of every nn.Linear of `model` through oneDNN, and with
    `lean_mlp` let its gated MLPs keep two intermediate tensors instead of four for the
    backward pass (CPU only; other dtypes, devices and autocast regions keep torch's own
    path). Under activation checkpointing those tensors are not kept anyway, and the lean
    MLP then only adds memory: pass False."""
    if available():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.forward = types.MethodType(_onednn_forward, module)
            elif lean_mlp and _is_gated_mlp(module):
                module.forward = types.MethodType(_gated_mlp_forward, module)
    return model


def _is_lora_linear(module: nn.Module) -> bool:
    """A peft LoRA layer around an nn.Linear, adapters active and not merged (DoRA excluded)."""
    return (isinstance(getattr(module, "base_layer", None), nn.Linear) and hasattr(module, "get_delta_weight")
            and not getattr(module, "merged", True) and not getattr(module, "disable_adapters", True)
            and not any(getattr(module, "use_dora", {}).get(a, False) for a in module.active_adapters))


def _merged_weight(module: nn.Module) -> torch.Tensor:
    weight = module.base_layer.weight.detach().float()
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            weight = weight + module.get_delta_weight(adapter).detach().float()
    return weight


def _adapters(module: nn.Module, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, scaling) of each active LoRA adapter of `module`, in `dtype`."""
    return [(module.lora_A[a].weight.detach().to(dtype), module.lora_B[a].weight.detach().to(dtype), module.scaling[a])
            for a in module.active_adapters if a in module.lora_A]


def _packed_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    packed, dtype, adapters = self._rlhf_packed
    bias = getattr(self, "base_layer", self).bias
    rows = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    y = torch.ops.mkldnn._linear_pointwise(rows, packed, None if bias is None else bias.to(dtype), "none", [], "")
    for a, b, scaling in adapters:
        y = y + (rows @ a.t()) @ b.t() * scaling
    return y.reshape(*x.shape[:-1], y.shape[-1])


@contextmanager
def packed_for_decoding(model: nn.Module, batch: int, dtype: torch.dtype):
    """Inside the context every nn.Linear of `model` computes with a copy of its weight
    prepacked for `batch`-row matmuls in `dtype` (fp32, or bf16 as autocast would cast it:
    bf16 in, bf16 out). The copies are made on entry, so they hold the current weights."""
    if not available():
        yield
        return
    patched, inside_lora = [], set()
    try:
        for module in model.modules():
            if id(module) in inside_lora:
                continue
            adapters = []
            if _is_lora_linear(module):
                inside_lora.update(id(m) for m in module.modules())
                if dtype == torch.float32:
                    # fp32 decodes with the merged weight W + scaling * B A: one matmul instead
                    # of three and the adapter's bookkeeping, for every layer and token.
                    weight = _merged_weight(module)
                else:
                    # bf16 keeps 8 bits of mantissa: W + dW rounded to bf16 loses most of a
                    # small update dW, and the sampler would draw from (nearly) the base
                    # policy. The adapter stays apart, as in training.
                    weight, adapters = module.base_layer.weight.detach(), _adapters(module, dtype)
            elif isinstance(module, nn.Linear):
                weight = module.weight.detach()
            else:
                continue
            if weight.device.type != "cpu":
                continue
            module._rlhf_packed = (torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), batch), dtype, adapters)
            patched.append((module, module.__dict__.get("forward")))
            module.forward = types.MethodType(_packed_forward, module)
        yield
    finally:
        for module, previous in patched:
            del module._rlhf_packed
            if previous is None:
                del module.forward
            else:
                module.forward = previous
