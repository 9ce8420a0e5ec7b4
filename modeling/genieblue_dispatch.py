"""The multimodal path, run on the base's own module objects.

An image request runs ``model.language_model`` itself, the same decoder code and the same module objects as a text
request, with two substitutions that only that request sees:

- the base block at each replicated slot hands the call to its trained copy (``replicated_layers[i]``), which runs
  as a module of its own (its own hooks, its own FSDP unit, its own gradient checkpointing);
- each LoRA-targeted base linear adds its adapter's branch (or, in merged mode, computes with ``W + s·B·A`` held in
  a separate tensor).

The substitutions are looked up by a ``Dispatch`` object installed as the instance ``forward`` of exactly those base
modules (a block at a replicated slot, a targeted linear). Outside a multimodal call it runs the module's own
forward and nothing else, so the text path is the base, bit for bit, and its hooks (sharding, offload, device
maps, output capture) run as always. Inside a multimodal call (``running(call)``, a ContextVar, so per thread and
per asyncio task) it consults the call's ``MultimodalPlan``. Nothing in the base is registered, replaced or
written: ``language_model.state_dict()`` and its module tree stay the base's.

Gradient checkpointing recomputes a block during backward, after the multimodal call has returned; the checkpoint's
``context_fn`` (``checkpoint_context``) re-enters the same call for the recompute, so the replayed block sees the
same substitutions (non-reentrant checkpointing only; reentrant offers no such hook).

``torch.compile`` of the text path: with no multimodal call in flight anywhere in the process, a dispatcher reads one
module-level integer and calls the module's own forward, which dynamo traces as a plain call (a ContextVar is not
traceable). The multimodal path checks that every replicated slot was substituted and raises if the base ran
without its substitutions (for example a ``language_model`` compiled in place).
"""

import copy
import threading
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar

import torch
from torch import nn
from torch.nn import functional as F


_ACTIVE = ContextVar("genieblue_multimodal_call", default=None)
# Multimodal calls in flight in this process, any thread. Zero means no dispatcher needs to look anything up.
_in_flight = 0
_in_flight_lock = threading.Lock()


def active_call():
    """The multimodal call this thread (or task) is inside, or None."""
    if not _in_flight:
        return None
    return _ACTIVE.get()


@contextmanager
def running(call):
    """Make ``call`` the active multimodal call of this thread/task for the duration of the block."""
    global _in_flight
    with _in_flight_lock:
        _in_flight += 1
    token = _ACTIVE.set(call)
    try:
        yield call
    finally:
        _ACTIVE.reset(token)
        with _in_flight_lock:
            _in_flight -= 1


def checkpoint_context():
    """``context_fn`` for ``torch.utils.checkpoint``: the recompute runs inside the call the forward ran in."""
    call = active_call()
    return nullcontext(), (running(call) if call is not None else nullcontext())


class Dispatch:
    """Installed as the instance ``forward`` of one base module; runs it as itself unless the active multimodal call
    substitutes it. ``inner`` is an instance ``forward`` that was there before (e.g. accelerate's offload hook)."""

    def __init__(self, module, inner=None):
        self.module = module
        self.inner = inner

    def run_original(self, *args, **kwargs):
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        call = active_call()
        if call is None:
            return self.run_original(*args, **kwargs)
        return call.dispatch(self, args, kwargs)


def install_dispatch(module):
    """Put a ``Dispatch`` in front of ``module.forward`` (once; a copied model's dispatcher is re-pointed)."""
    current = module.__dict__.get("forward")
    if isinstance(current, Dispatch):
        current.module = module
        return
    module.forward = Dispatch(module, current)


def strip_dispatch(module):
    """Remove GenieBlue's dispatchers from ``module`` and its children (a copy of a base block must not keep them)."""
    for child in module.modules():
        current = child.__dict__.get("forward")
        if isinstance(current, Dispatch):
            if current.inner is None:
                del child.__dict__["forward"]
            else:
                child.forward = current.inner


def clear_hooks(module):
    """Drop the forward and backward hooks a deep copy carried over from the module it copied (output capture,
    accelerate's device hooks, ...), so a replicated block starts with none. torch keeps them in per-instance dicts
    named ``_forward*hooks*`` / ``_backward*hooks*`` (tested: a hook on a base block does not fire on its copy)."""
    for child in module.modules():
        for name, value in list(vars(child).items()):
            if name.startswith(("_forward", "_backward")) and "hooks" in name and isinstance(value, dict):
                child.__dict__[name] = type(value)()
    strip_dispatch(module)


class MultimodalPlan:
    """Which base module is substituted by what on the multimodal path of one model.

    ``blocks``: base decoder block -> trained copy. ``linears``: base linear -> ``LoraAdapter``. Both keyed by the
    module object; the plan holds the modules, so it stays valid exactly as long as they are the ones in place.
    """

    def __init__(self, layers, replicas, lora_trees):
        self.blocks, self.linears, self._bound = {}, {}, []
        for index, replica in replicas.items():
            block = layers[index]
            install_dispatch(block)
            self.blocks[id(block)] = replica
            self._bound.append((layers, str(index), block))
        for index, tree in lora_trees.items():
            block = layers[index]
            for path, adapter in tree.adapters().items():
                parent_path, _, name = path.rpartition(".")
                parent = block.get_submodule(parent_path) if parent_path else block
                linear = getattr(parent, name)
                install_dispatch(linear)
                self.linears[id(linear)] = adapter
                self._bound.append((parent, name, linear))
        self._replicas = dict(replicas)
        self._trees = dict(lora_trees)

    def is_current(self, layers, replicas, lora_trees):
        """The modules in place are still the ones this plan was built for (no block, linear, copy or tree swapped)."""
        if replicas.keys() != self._replicas.keys() or lora_trees.keys() != self._trees.keys():
            return False
        if any(replicas[i] is not m for i, m in self._replicas.items()):
            return False
        if any(lora_trees[i] is not t for i, t in self._trees.items()):
            return False
        return all(getattr(parent, name) is module for parent, name, module in self._bound)


class PlanCache:
    """The model's current ``MultimodalPlan``; rebuilt when the modules it refers to were replaced. A copied or
    unpickled model starts empty (its plan must refer to its own modules)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._plan = None

    def get(self, layers, replicas, lora_trees):
        with self._lock:
            if self._plan is None or not self._plan.is_current(layers, replicas, lora_trees):
                self._plan = MultimodalPlan(layers, replicas, lora_trees)
            return self._plan

    def clear(self):
        with self._lock:
            self._plan = None

    def __deepcopy__(self, memo):
        return PlanCache()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class MultimodalCall:
    """One multimodal forward: the plan, the LoRA settings it runs with, and what it substituted (checked after)."""

    def __init__(self, plan, mode, scaling, dropout, training, merged_weights):
        self.plan = plan
        self.mode = mode
        self.scaling = scaling
        self.dropout = dropout if training else 0.0
        self.merged_weights = merged_weights
        self.replica_hits = 0
        self.lora_hits = 0
        self._entered = set()

    def dispatch(self, dispatcher, args, kwargs):
        module = dispatcher.module
        key = id(module)
        if key in self._entered:  # a second dispatcher in front of the same module: already substituted
            return dispatcher.run_original(*args, **kwargs)
        replica = self.plan.blocks.get(key)
        if replica is not None:
            self.replica_hits += 1
            return replica(*args, **kwargs)
        adapter = self.plan.linears.get(key)
        if adapter is None:
            return dispatcher.run_original(*args, **kwargs)
        self.lora_hits += 1
        self._entered.add(key)
        try:
            return self._lora_linear(dispatcher, adapter, *args, **kwargs)
        finally:
            self._entered.discard(key)

    def _merged_applies(self, linear, adapter):
        weight = linear.weight
        if self.mode != "merged" or self.dropout or weight.device.type == "meta":
            return False  # dropout needs the separate branch; a weight an offload hook has not loaded yet
        needs_grad = torch.is_grad_enabled() and (
            adapter.lora_A.requires_grad or adapter.lora_B.requires_grad or weight.requires_grad
        )
        return not needs_grad

    def _lora_linear(self, dispatcher, adapter, x, *args, **kwargs):
        linear = dispatcher.module
        if self._merged_applies(linear, adapter):
            return F.linear(x, self.merged_weights.get(linear, adapter, self.scaling), linear.bias)
        result = dispatcher.run_original(x, *args, **kwargs)
        branch_input = F.dropout(x, self.dropout, training=True) if self.dropout else x
        return result + adapter(branch_input, self.scaling).to(result.dtype)

    def check_complete(self):
        """Every replicated slot ran its copy, and LoRA reached the base (or the base ran without GenieBlue)."""
        expected = len(self.plan.blocks)
        if self.replica_hits != expected or (self.plan.linears and not self.lora_hits):
            raise RuntimeError(
                f"the multimodal path ran {self.replica_hits} of {expected} replicated blocks and {self.lora_hits} "
                f"LoRA linears: the base decoder ran without GenieBlue's substitutions. Is model.language_model "
                f"compiled or wrapped in place? Compile or wrap it only for text use, or compile the whole model "
                f"without fullgraph."
            )


def find_decoder_layers(language_model, num_layers):
    """``(path, ModuleList)`` of the decoder blocks of a Hugging Face causal LM (``layers``, Falcon's ``h``, ...)."""
    decoder = language_model.get_decoder() if hasattr(language_model, "get_decoder") else None
    candidates = []
    for path, module in language_model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            parent = path.rpartition(".")[0]
            owner = language_model.get_submodule(parent) if parent else language_model
            candidates.append((owner is decoder, path, module))
    if candidates:
        candidates.sort(key=lambda c: (not c[0], c[1].count(".")))
        return candidates[0][1], candidates[0][2]
    raise ValueError(
        f"{type(language_model).__name__} has no ModuleList of {num_layers} decoder blocks; GenieBlue needs a decoder "
        f"that keeps its blocks in a list (`layers`, `h`, ...)"
    )


@torch.no_grad()
def copy_non_persistent_buffers(source, target):
    """Give ``target`` (a replicated block) the non-persistent buffers of ``source`` (the base block it copies).

    They are never saved and never trained (rotary tables, scales, FalconH1's ``mup_vector``), so a reloaded copy must
    take them from the base; some bases initialise them from a parent module that only walks its own blocks."""
    persistent = set(target.state_dict())
    source_buffers = dict(source.named_buffers())
    for name, buffer in target.named_buffers():
        if name not in persistent and name in source_buffers:
            buffer.copy_(source_buffers[name])


def copy_decoder_layer(layer, config):
    """A trainable copy of a decoder block that still shares the base config object, with no hooks or dispatchers.

    ``copy.deepcopy`` would copy the config too, and ``set_attn_implementation`` would then no longer reach the copy.
    A deep copy keeps ``layer_idx`` (the KV-cache slot of the block it replaces) and every buffer, non-persistent
    ones included (rotary tables, scales), which a freshly constructed block would lack.
    """
    memo = {id(config): config}
    for module in layer.modules():
        module_config = getattr(module, "config", None)
        if module_config is not None:
            memo[id(module_config)] = module_config
    replica = copy.deepcopy(layer, memo)
    clear_hooks(replica)
    return replica
