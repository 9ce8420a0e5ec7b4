"""LoRA for the multimodal path, built so that the base weights are never written.

Why not PEFT here: PEFT's LoRA wraps the target ``nn.Linear`` in place, which would put the adapter on the
text path as well, and its merge writes into the base tensors (merge/unmerge drifts in bf16). GenieBlue needs
the adapter to exist only on the multimodal path, so the adapter weights live in ``LoraAdapter`` (plain
parameters, not ``nn.Linear``, so a downstream ``get_peft_model(target_modules="all-linear")`` does not wrap
them), and ``LoraLinear`` applies them to a *reference* of the base linear.

Execution modes:
- ``unmerged``: ``base(x) + s * B(A(dropout(x)))``; least memory.
- ``merged``: ``F.linear(x, W + s * B @ A, bias)``; the merged weight is a separate tensor, cached and
  recomputed whenever ``W``, ``A`` or ``B`` change (tensor version counters track in-place updates such as an
  optimizer step or ``load_state_dict``). When gradients are needed, merged mode runs unmerged: a cached
  tensor cannot carry an autograd graph across steps.
"""

import math
import threading
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from torch.nn import functional as F


_MODE_OVERRIDE = ContextVar("genieblue_lora_mode", default=None)


@contextmanager
def lora_execution_mode(mode):
    """Run the multimodal path of every GenieBlue model with ``mode`` inside this block (thread/context-local)."""
    token = _MODE_OVERRIDE.set(mode)
    try:
        yield
    finally:
        _MODE_OVERRIDE.reset(token)


def dense_tensor(tensor):
    """A plain tensor: a weight-only quantized tensor subclass (torchao) is dequantized, any other tensor is returned
    as is. (``Tensor.dequantize()`` is not the identity on a plain bf16/fp16 tensor: it returns float32.)"""
    if hasattr(tensor, "__tensor_flatten__"):
        return tensor.dequantize()
    return tensor


class LoraAdapter(nn.Module):
    """The trainable low-rank pair of one base linear: ``delta_W = scaling * lora_B @ lora_A``."""

    def __init__(self, in_features, out_features, rank, dtype=None, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """PEFT's default init: A as ``nn.Linear`` (Kaiming uniform), B zero, so the adapter starts as a no-op."""
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LoraLinear(nn.Module):
    """A base linear seen through a LoRA adapter. Lives only in the multimodal view; holds references, no copies."""

    def __init__(self, base_layer, adapter, scaling, dropout, default_mode):
        super().__init__()
        self.base_layer = base_layer
        # The adapter is owned (registered) by the GenieBlue model; keep it out of this module tree.
        object.__setattr__(self, "adapter", adapter)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.default_mode = default_mode
        self._merged = None
        self._merged_key = None
        self._lock = threading.Lock()

    @property
    def weight(self):
        # Some attention implementations read ``proj.weight.dtype``; answer with the base weight.
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def _mode(self):
        mode = _MODE_OVERRIDE.get() or self.default_mode
        needs_grad = torch.is_grad_enabled() and (
            self.adapter.lora_A.requires_grad or self.adapter.lora_B.requires_grad or self.base_layer.weight.requires_grad
        )
        if mode == "merged" and (needs_grad or (self.training and not isinstance(self.dropout, nn.Identity))):
            return "unmerged"
        return mode

    def merged_weight(self):
        """``W + s * B @ A`` in a tensor of its own, recomputed only when one of its inputs changed."""
        weight, lora_a, lora_b = self.base_layer.weight, self.adapter.lora_A, self.adapter.lora_B
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (weight, lora_a, lora_b)) + (self.scaling,)
        with self._lock:
            if self._merged_key != key:
                with torch.no_grad():
                    delta = (dense_tensor(lora_b).float() @ dense_tensor(lora_a).float()) * self.scaling
                    dense = dense_tensor(weight)
                    self._merged = (dense.float() + delta.to(dense.device)).to(dense.dtype)
                self._merged_key = key
            return self._merged

    def forward(self, x):
        if self._mode() == "merged":
            return F.linear(x, self.merged_weight(), self.base_layer.bias)
        result = self.base_layer(x)
        lora_a, lora_b = self.adapter.lora_A, self.adapter.lora_B
        delta = F.linear(F.linear(self.dropout(x).to(lora_a.dtype), lora_a), lora_b) * self.scaling
        return result + delta.to(result.dtype)

    def extra_repr(self):
        return f"scaling={self.scaling}, default_mode={self.default_mode!r}"


def build_lora_adapters(layer, target_names, rank, dtype=None, device=None):
    """One ``LoraAdapter`` per ``nn.Linear`` in ``layer`` whose name is in ``target_names``, keyed by path."""
    adapters = {}
    for path, module in layer.named_modules():
        if path and path.rsplit(".", 1)[-1] in target_names and isinstance(module, nn.Linear):
            weight = module.weight
            adapters[path] = LoraAdapter(
                module.in_features,
                module.out_features,
                rank,
                dtype=dtype or weight.dtype,
                device=device or weight.device,
            )
    return adapters


class LoraAdapterTree(nn.Module):
    """Adapters of one decoder block, nested so state-dict keys read like module paths.

    ``lora.3.self_attn.q_proj.lora_A`` is the A matrix for ``layers.3.self_attn.q_proj``.
    """

    def __init__(self, adapters):
        super().__init__()
        for path, adapter in adapters.items():
            parent = self
            *parents, leaf = path.split(".")
            for name in parents:
                if name not in parent._modules:
                    parent.add_module(name, nn.Module())
                parent = parent._modules[name]
            parent.add_module(leaf, adapter)

    def adapters(self):
        """``{path: LoraAdapter}`` for this block."""
        return {path: m for path, m in self.named_modules() if isinstance(m, LoraAdapter)}
