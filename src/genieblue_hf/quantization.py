"""Mixed precision as in the paper: the LLM (base and replicated blocks) at 4-bit weights, the vision tower,
projector and LoRA at 8-bit weights, activations in 16 bit (W4A16 / W8A16).

Library: torchao (``pip install 'genieblue-hf[quantization]'``), the quantization backend of transformers and
ExecuTorch. Every weight becomes a torchao ``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig``, symmetric):
int4 group-wise (``group_size`` columns share a scale) or int8 per output channel. Its matmul dequantizes and calls
``F.linear``, so it runs on any CPU and GPU with no special kernel. Storage in memory keeps each 4-bit value in a
byte (the "unpacked to int8" layout); ExecuTorch's XNNPACK lowering packs them two per byte in the ``.pte``
(``genieblue export-executorch``), which is where the paper's storage figure applies.

Why not optimum-quanto (the backend before): it has been in maintenance mode since Nov 2025, and its int8 CPU path
reaches ``torch._weight_int8pack_mm``, which crashes on some x86 CPUs when ``in_features % 32 != 0``.

Two activation schemes (``activations=``): ``"float"`` (the paper's W4A16/W8A16, the in-memory default) and
``"int8-dynamic"`` (activations quantized per token at run time, 8da4w/8da8w: what ExecuTorch's XNNPACK backend
runs as integer kernels; ``genieblue export-executorch --quantize paper`` uses it).

The base is quantized deterministically, so the text path stays *the base, quantized the same way*:
``quantize_language_model`` applied to a separate instance of the base class gives bit-identical logits (tested).
LoRA matrices are plain parameters, not ``nn.Linear``; they are quantized through a temporary linear so torchao does
the work. Quantized models are for inference; both LoRA modes work (merged mode dequantizes into its own tensors).
"""

import torch
from torch import nn


DEFAULT_GROUP_SIZE = 32


ACTIVATION_SCHEMES = ("float", "int8-dynamic")


def _torchao():
    try:
        from torchao.quantization import quantize_
    except ImportError:
        raise ImportError(
            "quantization needs torchao: pip install 'genieblue-hf[quantization]' (or pip install torchao)"
        ) from None
    return quantize_


def _weight_config(dtype, granularity, activations):
    """torchao's config for one scheme: weight-only, or with int8 dynamic per-token activations."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig

    if activations == "float":
        return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)


def _quantize_linears(module, bits, group_size=DEFAULT_GROUP_SIZE, exclude=(), activations="float"):
    """Quantize every ``nn.Linear`` of ``module`` (but those named in ``exclude``) in place."""
    if bits not in (4, 8):
        raise ValueError(f"weight bits must be 4 or 8, got {bits!r}")
    if activations not in ACTIVATION_SCHEMES:
        raise ValueError(f"activations must be one of {ACTIVATION_SCHEMES}, got {activations!r}")
    quantize_ = _torchao()
    from torchao.quantization.granularity import PerAxis, PerGroup

    dtype = {4: torch.int4, 8: torch.int8}[bits]

    def selected(linear, name):
        return isinstance(linear, nn.Linear) and name.rsplit(".", 1)[-1] not in exclude

    grouped = _weight_config(dtype, PerGroup(group_size), activations)
    per_channel = _weight_config(dtype, PerAxis(0), activations)
    # 4 bits are group-wise; a linear whose width the group does not divide (and every 8-bit one) is per channel.
    if bits == 4:
        quantize_(module, grouped, filter_fn=lambda m, n: selected(m, n) and m.in_features % group_size == 0)
    quantize_(module, per_channel, filter_fn=lambda m, n: selected(m, n) and not is_quantized(m.weight))
    return module


def is_quantized(tensor):
    """A torchao (or other tensor-subclass) quantized weight."""
    return hasattr(tensor, "__tensor_flatten__")


def quantize_language_model(language_model, bits=4, group_size=DEFAULT_GROUP_SIZE, activations="float"):
    """The paper's LLM precision for a causal LM (GenieBlue's base or any twin): ``lm_head`` kept."""
    return _quantize_linears(language_model, bits, group_size, exclude=("lm_head",), activations=activations)


def _quantize_lora(model, bits, activations):
    for tree in model.lora.values():
        for adapter in tree.adapters().values():
            for name in ("lora_A", "lora_B"):
                weight = getattr(adapter, name)
                holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
                holder.weight = weight
                _quantize_linears(nn.Sequential(holder), bits, activations=activations)
                setattr(adapter, name, nn.Parameter(holder.weight.detach(), requires_grad=False))


def quantize_like_paper(model, llm_bits=4, extras_bits=8, group_size=DEFAULT_GROUP_SIZE, activations="float"):
    """Quantize a ``GenieBlueForConditionalGeneration`` in place: LLM at ``llm_bits``, the rest at ``extras_bits``;
    ``activations`` is ``"float"`` (W4A16/W8A16) or ``"int8-dynamic"`` (for ExecuTorch's XNNPACK)."""
    _torchao()  # a clear error before anything is changed
    if activations not in ACTIVATION_SCHEMES:
        raise ValueError(f"activations must be one of {ACTIVATION_SCHEMES}, got {activations!r}")
    quantize_language_model(model.language_model, llm_bits, group_size, activations)
    _quantize_linears(model.replicated_layers, llm_bits, group_size, activations=activations)
    _quantize_linears(model.vision_tower, extras_bits, group_size, activations=activations)
    _quantize_linears(model.multi_modal_projector, extras_bits, group_size, activations=activations)
    _quantize_lora(model, extras_bits, activations)
    return model.eval()


def tensor_bytes(tensor):
    """Bytes a tensor really stores: a quantized tensor subclass counts its data and scales, not the dense size it
    reports through ``nbytes``."""
    if is_quantized(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.nbytes


def storage_bytes(module):
    """Bytes of ``module``'s state dict, quantized tensors counted as stored."""
    return sum(tensor_bytes(t) for t in module.state_dict().values() if hasattr(t, "nbytes"))


__all__ = ["quantize_like_paper", "quantize_language_model", "storage_bytes", "tensor_bytes", "is_quantized"]
