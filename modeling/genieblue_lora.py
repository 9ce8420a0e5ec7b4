"""LoRA for the multimodal path, built so that the base weights are never written.

Why not PEFT here: PEFT's LoRA wraps the target ``nn.Linear`` in place, which would put the adapter on the text path
as well, and its merge writes into the base tensors (merge/unmerge drifts in bf16). GenieBlue needs the adapter to
exist only on the multimodal path, so the adapter weights live in ``LoraAdapter`` modules owned by the GenieBlue model
(plain parameters, not ``nn.Linear``, so a downstream ``get_peft_model(target_modules="all-linear")`` does not wrap
them), and the multimodal path applies them to the base linear (``genieblue_dispatch``).

The adapter is *called* as a module (``adapter(x, scaling)``) rather than read: hooks that sharding engines put on it
(FSDP2, DeepSpeed ZeRO-3 gather its parameters in a pre-forward hook) then run as they do for any module.

Execution modes (``config.lora_execution_mode``, or ``lora_mode=`` per call):
- ``unmerged``: ``base(x) + s * B(A(dropout(x)))``; least memory.
- ``merged``: ``F.linear(x, W + s * B @ A, bias)``; the merged weight is a separate tensor (``MergedWeights``), cached
  and recomputed whenever ``W``, ``A`` or ``B`` change (tensor version counters track in-place updates such as an
  optimizer step or ``load_state_dict``). When gradients are needed, merged mode runs unmerged: a cached tensor
  cannot carry an autograd graph across steps.
"""

import math
import threading

import torch
from torch import nn
from torch.nn import functional as F


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

    def forward(self, x, scaling):
        """The additive LoRA branch ``scaling * B(A(x))`` (dropout is the caller's)."""
        lora_a = self.lora_A
        return F.linear(F.linear(x.to(lora_a.dtype), lora_a), self.lora_B) * scaling

    def delta_weight(self, scaling):
        """``scaling * B @ A`` in float32: the one place the merged formula lives (merged mode, dense export)."""
        return (dense_tensor(self.lora_B).float() @ dense_tensor(self.lora_A).float()) * scaling

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def merge_into(weight, adapter, scaling):
    """``W + s * B @ A`` as a new tensor in ``W``'s dtype (computed in float32); ``weight`` is not written."""
    dense = dense_tensor(weight)
    return (dense.float() + adapter.delta_weight(scaling).to(dense.device)).to(dense.dtype)


class MergedWeights:
    """Cached merged weights of one model's LoRA linears, keyed by the base linear; rebuilt when an input changes.

    A copied or unpickled model starts with an empty cache (the tensors belong to the original)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cache = {}

    def get(self, linear, adapter, scaling):
        weight = linear.weight
        if type(weight).__module__.startswith("bitsandbytes"):
            raise NotImplementedError(
                "merged LoRA mode needs the base weights in a dense or torchao format; this base is quantized with "
                "bitsandbytes. Use lora_execution_mode='unmerged' (or lora_mode='unmerged')."
            )
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (weight, adapter.lora_A, adapter.lora_B))
        key += (scaling,)
        with self._lock:
            cached = self._cache.get(id(linear))
            if cached is None or cached[0] != key:
                with torch.no_grad():
                    cached = (key, merge_into(weight, adapter, scaling))
                self._cache[id(linear)] = cached
            return cached[1]

    def clear(self):
        with self._lock:
            self._cache.clear()

    def __deepcopy__(self, memo):
        return MergedWeights()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def build_lora_adapters(layer, target_names, rank, dtype=None, device=None):
    """One ``LoraAdapter`` per ``nn.Linear`` in ``layer`` selected by ``target_names``, keyed by path.

    ``target_names`` is a set of last path components (``{"q_proj", ...}``) or ``"all-linear"`` (every linear of the
    block, for decoders whose projections have other names)."""
    adapters = {}
    for path, module in layer.named_modules():
        if not path or not isinstance(module, nn.Linear):
            continue
        if target_names == "all-linear" or path.rsplit(".", 1)[-1] in target_names:
            weight = module.weight
            adapters[path] = LoraAdapter(
                module.in_features,
                module.out_features,
                rank,
                dtype=dtype or (weight.dtype if weight.is_floating_point() else None),
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
