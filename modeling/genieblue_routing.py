"""Per-sequence routing between the text path and the multimodal path.

A sequence takes one path from its first token to its last decode step. During ``generate``, transformers drops
``pixel_values`` after prefill and decode steps carry no image placeholder, so the route cannot be re-derived from
the inputs: it is kept with the KV cache.

- A batch on one path keeps the cache the base model made (a ``DynamicCache``, a ``StaticCache``, ...); its routes
  are recorded against that cache object (``RouteRegistry``).
- A batch mixing both paths keeps each path's rows in a cache of their own, held together by a ``RoutedCache``
  that carries the routes itself. A decode step hands each path its own cache: nothing is copied between steps.

``select_rows`` and ``stitch_rows`` split a batch's inputs by path and put the outputs back in batch order.
"""

import threading
import weakref

import torch
from transformers import Cache


ROUTES = ("auto", "text", "multimodal")


class RouteRegistry:
    """Remembers, per KV-cache object, which rows run the multimodal path. Holds the caches weakly."""

    def __init__(self):
        self._routes = {}
        self._lock = threading.Lock()

    def get(self, cache):
        if cache is None:
            return None
        if isinstance(cache, RoutedCache):
            return cache.routes
        with self._lock:
            entry = self._routes.get(id(cache))
        if entry is None or entry[0]() is not cache:
            return None
        return entry[1]

    def record(self, cache, routes):
        if cache is None or isinstance(cache, RoutedCache):
            return
        key = id(cache)

        def forget(_, key=key):
            with self._lock:
                self._routes.pop(key, None)

        with self._lock:
            self._routes[key] = (weakref.ref(cache, forget), routes.detach().to("cpu", torch.bool))

    def forget(self, cache):
        """Drop what was recorded for ``cache`` (a cache object reused for a new sequence, e.g. a reset StaticCache)."""
        with self._lock:
            self._routes.pop(id(cache), None)

    def __len__(self):
        return len(self._routes)

    def __deepcopy__(self, memo):
        return RouteRegistry()  # routes belong to cache objects of the original model's sequences

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class RoutedCache(Cache):
    """The KV cache of a batch that mixes text-only and image sequences: one cache per path, each holding only its
    own rows, plus the per-row routes. ``generate`` sees one cache object; every batch operation it performs (beam
    reordering, cropping for assisted decoding, repetition) is applied to each part on its own rows."""

    def __init__(self, routes, text=None, multimodal=None):
        super().__init__(layers=[])
        self.routes = routes.detach().to("cpu", torch.bool)
        self.parts = {"text": text, "multimodal": multimodal}

    @property
    def row_groups(self):
        """``{path: batch rows}``, each in batch order."""
        return {"text": (~self.routes).nonzero().flatten(), "multimodal": self.routes.nonzero().flatten()}

    def get_seq_length(self, *args, **kwargs):
        part = self.parts["text"] or self.parts["multimodal"]
        return part.get_seq_length(*args, **kwargs) if part is not None else 0

    @property
    def is_compileable(self):
        return False

    def _each(self, method, *args):
        for part in self.parts.values():
            if part is not None:
                getattr(part, method)(*args)

    def crop(self, *args):
        self._each("crop", *args)

    def reset(self):
        self._each("reset")

    def activate_past_recording(self):
        self._each("activate_past_recording")

    def _regroup(self, new_rows_of, new_routes):
        """Apply a batch-row operation: ``new_rows_of[path]`` are, for each new row of that path, the index of the
        old row *within that path's part* it comes from."""
        for path, part in self.parts.items():
            if part is not None:
                part.batch_select_indices(new_rows_of[path])
        self.routes = new_routes

    def reorder_cache(self, beam_idx):
        """Beam search: new row ``r`` takes old row ``beam_idx[r]``, which must be on the same path."""
        beam_idx = beam_idx.detach().to("cpu")
        if not torch.equal(self.routes[beam_idx], self.routes):
            raise RuntimeError("beam search moved a sequence between the text and the multimodal path")
        position = torch.empty(len(self.routes), dtype=torch.long)
        for rows in self.row_groups.values():
            position[rows] = torch.arange(len(rows))
        groups = self.row_groups
        self._regroup({path: position[beam_idx[rows]] for path, rows in groups.items()}, self.routes)

    def batch_repeat_interleave(self, repeats):
        self._each("batch_repeat_interleave", repeats)
        self.routes = self.routes.repeat_interleave(repeats)

    def batch_select_indices(self, indices):
        indices = torch.as_tensor(indices).detach().to("cpu")
        position = torch.empty(len(self.routes), dtype=torch.long)
        for rows in self.row_groups.values():
            position[rows] = torch.arange(len(rows))
        new_routes = self.routes[indices]
        self._regroup(
            {path: position[indices[new_routes == (path == "multimodal")]] for path in self.parts}, new_routes
        )

    def __len__(self):
        part = self.parts["text"] or self.parts["multimodal"]
        return len(part) if part is not None else 0

    def __repr__(self):
        return f"RoutedCache(routes={self.routes.tolist()}, parts={self.parts})"


def select_rows(value, rows, batch_size):
    """``value``'s ``rows`` if it is a tensor with one entry per batch row, else ``value`` unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch_size:
        return value.index_select(0, rows.to(value.device))
    return value


def stitch_rows(tensors, row_groups, batch_size):
    """One tensor of ``batch_size`` rows from per-path tensors and the batch rows each holds."""
    first = next(t for t in tensors if t is not None)
    merged = first.new_empty((batch_size, *first.shape[1:]))
    for tensor, rows in zip(tensors, row_groups):
        merged.index_copy_(0, rows.to(first.device), tensor.to(first.dtype))
    return merged


def stitch_tuples(tuples, row_groups, batch_size):
    """Per-layer tuples (hidden states, attentions) stitched layer by layer, or None if a path has none."""
    if any(t is None for t in tuples):
        return None
    return tuple(stitch_rows(layer_values, row_groups, batch_size) for layer_values in zip(*tuples))
