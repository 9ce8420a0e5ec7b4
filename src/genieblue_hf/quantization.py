"""Mixed-precision deployment as in the paper: the LLM (base and replicated blocks) at 4-bit weights, the vision
tower, projector and LoRA at 8-bit weights, activations in 16 bit (W4A16 / W8A16).

Library: optimum-quanto. It stores 4-bit weights packed two per byte with group-wise scales and has CPU kernels for
them; torchao 0.18's packed int4 layouts need CUDA (or the separate mslk package) and its CPU fallback keeps 4-bit
values in 8-bit storage, which would not show the paper's memory saving here. bitsandbytes targets GPUs.

The base is quantized in place and deterministically, so the text path stays *the base, quantized the same way*:
``quantize_language_model`` applied to a separate instance of the base class gives bit-identical logits (tested).
LoRA matrices are plain parameters, not ``nn.Linear``; they are quantized through a temporary linear so that quanto
does the work. Quantized models are for inference: prefer the ``unmerged`` LoRA mode (merged mode would materialise
dense merged weights for the LoRA blocks).
"""

from torch import nn


def _qtype(bits):
    from optimum.quanto import qint4, qint8

    try:
        return {4: qint4, 8: qint8}[bits]
    except KeyError:
        raise ValueError(f"weight bits must be 4 or 8, got {bits!r}") from None


def _quantize_modules(module, bits, exclude=None, group_size=None):
    from optimum.quanto import freeze, quantize

    quantize(module, weights=_qtype(bits), exclude=exclude)
    freeze(module)
    return module


def quantize_language_model(language_model, bits=4):
    """The paper's LLM precision for a causal LM (GenieBlue's base or any twin): weight-only, ``lm_head`` kept."""
    return _quantize_modules(language_model, bits, exclude=["lm_head"])


def _quantize_lora(model, bits):
    for tree in model.lora.values():
        for adapter in tree.adapters().values():
            for name in ("lora_A", "lora_B"):
                weight = getattr(adapter, name)
                holder = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
                holder[0].weight = weight
                _quantize_modules(holder, bits)
                setattr(adapter, name, nn.Parameter(holder[0].weight.detach(), requires_grad=False))


def quantize_like_paper(model, llm_bits=4, extras_bits=8):
    """Quantize a ``GenieBlueForConditionalGeneration`` in place: LLM at ``llm_bits``, the rest at ``extras_bits``."""
    quantize_language_model(model.language_model, llm_bits)
    _quantize_modules(model.replicated_layers, llm_bits)
    _quantize_modules(model.vision_tower, extras_bits)
    _quantize_modules(model.multi_modal_projector, extras_bits)
    _quantize_lora(model, extras_bits)
    model.drop_multimodal_view()
    return model.eval()


def tensor_bytes(tensor):
    """Bytes a tensor really stores: a quantized tensor subclass counts its packed data and scales, not the dense
    size it reports through ``nbytes``."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.nbytes


def storage_bytes(module):
    """Bytes of ``module``'s state dict, quantized tensors counted as stored."""
    return sum(tensor_bytes(t) for t in module.state_dict().values() if hasattr(t, "nbytes"))


__all__ = ["quantize_like_paper", "quantize_language_model", "storage_bytes"]
