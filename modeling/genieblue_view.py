"""The multimodal path as a *view* of the base language model.

The multimodal path must run the library's own decoder code (masks, rotary embeddings, caches and output capture
change between transformers releases), with two differences: the replicated blocks stand in their slots, and the
other blocks' linears carry LoRA. Mutating the base module tree to get there would break the text path (shared
hooks, concurrent requests), so ``build_multimodal_view`` makes a structural clone instead: every module object is
new (fresh hook dictionaries, no instance-level ``forward`` overrides), but every parameter and buffer is the
*same tensor* as in the base, the replicated blocks or the adapters. Nothing is copied, nothing is registered twice
(the view lives outside the model's module tree), and the base is never written.
"""

import copy
import sys

from torch import nn

from .genieblue_lora import LoraLinear


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
# Per-instance state that belongs to the original object: accelerate's dispatch hooks replace ``forward`` on the
# instance, and transformers marks a model whose output-capture hooks are installed.
_INSTANCE_STATE_NOT_CLONED = ("forward", "_hf_hook", "_old_forward", "_output_capturing_hooks_installed")


def _clone_module_object(module):
    """A new module object of the same class sharing ``module``'s parameters and buffers, with no hooks."""
    clone = module.__class__.__new__(module.__class__)
    state = {k: v for k, v in module.__dict__.items() if k not in _INSTANCE_STATE_NOT_CLONED}
    for name in _HOOK_DICTS:
        if name in state:
            state[name] = type(state[name])()
    state["_parameters"] = dict(module._parameters)
    state["_buffers"] = dict(module._buffers)
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = {}
    clone.__dict__.update(state)
    return clone


def clone_module_tree(module, replace=None, prefix=""):
    """Structural clone of ``module``; ``replace(path, original)`` may return a module to put at ``path`` instead."""
    if replace is not None:
        replacement = replace(prefix, module)
        if replacement is not None:
            return replacement
    clone = _clone_module_object(module)
    hf_hook = module.__dict__.get("_hf_hook")
    for name, child in module._modules.items():
        path = f"{prefix}.{name}" if prefix else name
        clone._modules[name] = None if child is None else clone_module_tree(child, replace, path)
    if hf_hook is not None:
        # A model dispatched with ``device_map`` keeps its device-alignment hooks on the view as well. The hook's
        # own module (accelerate.hooks, loaded since it made the hook) attaches it: remote code must not import
        # accelerate, which a plain single-device install may lack.
        sys.modules[type(hf_hook).__module__].add_hook_to_module(clone, hf_hook)
    return clone


def _is_fsdp_module(module):
    """A module FSDP2 manages on its own (``fully_shard`` adds ``unshard``/``reshard`` to its class)."""
    return callable(getattr(module, "unshard", None)) and callable(getattr(module, "reshard", None))


def find_decoder_layers(language_model, num_layers):
    """``(path, ModuleList)`` of the decoder blocks of a Hugging Face causal LM."""
    decoder = language_model.get_decoder() if hasattr(language_model, "get_decoder") else None
    for path, module in language_model.named_modules():
        if decoder is not None and module is decoder and isinstance(getattr(module, "layers", None), nn.ModuleList):
            return (f"{path}.layers" if path else "layers"), module.layers
    for path, module in language_model.named_modules():
        if path.rsplit(".", 1)[-1] == "layers" and isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return path, module
    raise ValueError(
        f"{type(language_model).__name__} has no `layers` ModuleList of {num_layers} decoder blocks; GenieBlue needs a "
        f"decoder whose blocks sit in a `layers` list"
    )


def copy_decoder_layer(layer, config):
    """A trainable copy of a decoder block that still shares the base config object.

    ``copy.deepcopy`` would copy the config too, and ``set_attn_implementation`` would then no longer reach the copy.
    The copy keeps ``layer_idx``, so it writes the KV-cache slot of the block it replaces.
    """
    memo = {id(config): config}
    for module in layer.modules():
        module_config = getattr(module, "config", None)
        if module_config is not None:
            memo[id(module_config)] = module_config
    replica = copy.deepcopy(layer, memo)
    for module in replica.modules():
        for name in _HOOK_DICTS:
            if name in module.__dict__:
                module.__dict__[name] = type(module.__dict__[name])()
    return replica


def build_multimodal_view(language_model, layers_path, replicated, lora_trees, scaling, dropout, mode):
    """The language model with replicated blocks in their slots and LoRA on every other block's targets.

    ``replicated`` maps a layer index to its trained copy; ``lora_trees`` maps a layer index to its
    ``LoraAdapterTree``. Returns a module that is called exactly like ``language_model``.
    """
    layer_prefix = layers_path + "."
    adapters = {index: tree.adapters() for index, tree in lora_trees.items()}

    def replace(path, original):
        if not path.startswith(layer_prefix):
            return None
        index, _, inner = path[len(layer_prefix) :].partition(".")
        index = int(index)
        if not inner and index in replicated:
            if _is_fsdp_module(replicated[index]):
                # FSDP2 gathers a sharded block's parameters in hooks on that very object: use it, not a clone.
                return replicated[index]
            return clone_module_tree(replicated[index])
        if not inner and _is_fsdp_module(original):
            raise NotImplementedError(
                f"base decoder block {index} is sharded with FSDP on its own; the multimodal path reads the frozen "
                f"base through a view that FSDP's per-module hooks do not reach. Shard the base as part of the root "
                f"unit (fully_shard(model)); vision tower, projector and replicated blocks may be sharded per module."
            )
        adapter = adapters.get(index, {}).get(inner)
        if adapter is not None:
            lora_linear = LoraLinear(clone_module_tree(original), adapter, scaling, dropout, mode)
            return lora_linear.train(original.training)
        return None

    return clone_module_tree(language_model, replace)
