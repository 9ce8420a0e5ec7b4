"""Per-sequence routing between the text path and the multimodal path.

A sequence takes one path from its first token to its last decode step. During ``generate``, transformers drops
``pixel_values`` after prefill and decode steps carry no image placeholder, so the route cannot be re-derived
from the inputs: it is recorded against the KV cache the prefill produced (``RouteRegistry``) and looked up on
every later step. A mixed batch runs each path on its own rows; with a KV cache, the rows of the one cache object
that ``generate`` holds are split per path before the step and written back after it (``split_cache`` and
``merge_cache_rows``), so ``generate`` keeps seeing an ordinary ``DynamicCache``.
"""

import threading
import weakref

import torch
from transformers import DynamicCache


ROUTES = ("auto", "text", "multimodal")


class RouteRegistry:
    """Remembers, per KV-cache object, which rows run the multimodal path. Holds the caches weakly."""

    def __init__(self):
        self._routes = {}
        self._lock = threading.Lock()

    def get(self, cache):
        if cache is None:
            return None
        with self._lock:
            entry = self._routes.get(id(cache))
        if entry is None or entry[0]() is not cache:
            return None
        return entry[1]

    def record(self, cache, routes):
        if cache is None:
            return
        key = id(cache)

        def forget(_, key=key):
            with self._lock:
                self._routes.pop(key, None)

        with self._lock:
            self._routes[key] = (weakref.ref(cache, forget), routes.detach().to("cpu", torch.bool))

    def __deepcopy__(self, memo):
        return RouteRegistry()  # routes belong to cache objects of the original model's sequences

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def forget(self, cache):
        """Drop what was recorded for ``cache`` (a cache object reused for a new sequence, e.g. a reset StaticCache)."""
        with self._lock:
            self._routes.pop(id(cache), None)

    def __len__(self):
        return len(self._routes)


def _dynamic_layers(cache):
    """The per-layer key/value holders of a plain ``DynamicCache``; anything else cannot be split by rows."""
    if type(cache) is not DynamicCache or any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
        raise NotImplementedError(
            f"A batch mixing text-only and image sequences can only decode over a full-attention DynamicCache, got "
            f"{type(cache).__name__} with layers {sorted({type(layer).__name__ for layer in cache.layers})}. Run the "
            f"text-only and the image sequences as separate batches."
        )
    return cache.layers


def split_cache(cache, row_groups):
    """One new ``DynamicCache`` per group of batch rows, holding copies of those rows' keys and values."""
    parts = [DynamicCache() for _ in row_groups]
    if cache is None:
        return parts
    for layer_idx, layer in enumerate(_dynamic_layers(cache)):
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        for part, rows in zip(parts, row_groups):
            index = rows.to(layer.keys.device)
            part.update(layer.keys.index_select(0, index), layer.values.index_select(0, index), layer_idx)
    return parts


def merge_cache_rows(target, parts, row_groups, batch_size):
    """Write each part's rows back into ``target`` (a ``DynamicCache``) at their batch positions."""
    num_layers = len(parts[0].layers)
    if any(len(part.layers) != num_layers for part in parts):
        raise RuntimeError("the per-path KV caches of a mixed batch have different layer counts")
    for layer_idx in range(num_layers):
        sources = [part.layers[layer_idx] for part in parts]
        first = sources[0].keys
        shape = (batch_size, *first.shape[1:])
        keys = first.new_empty(shape)
        values = sources[0].values.new_empty((batch_size, *sources[0].values.shape[1:]))
        for source, rows in zip(sources, row_groups):
            index = rows.to(first.device)
            keys.index_copy_(0, index, source.keys)
            values.index_copy_(0, index, source.values)
        if layer_idx < len(target.layers) and getattr(target.layers[layer_idx], "keys", None) is not None and (
            target.layers[layer_idx].keys.numel() > 0
        ):
            # The layer already holds this batch's earlier tokens (split_cache checked it is a DynamicLayer):
            # replace them with the merged, longer states.
            target.layers[layer_idx].keys = keys
            target.layers[layer_idx].values = values
        else:
            target.update(keys, values, layer_idx)
    return target
