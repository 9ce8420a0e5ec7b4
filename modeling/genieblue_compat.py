"""What differs across the transformers 5.x releases this remote code serves, decided in one place.

The KV cache's name: transformers 5.24 renamed the forward argument, the ``generate`` model keyword and the output
field ``past_key_values`` to ``cache``; the old name still works there with a deprecation warning (until 5.40), and
is the only one before. GenieBlue accepts either name from its callers, passes the cache to its base under the name
the base's ``forward`` takes, and returns it under the installed release's output field name.
"""

import dataclasses
import functools
import inspect

from transformers.modeling_outputs import CausalLMOutputWithPast


# The installed release's name for the KV cache in outputs, in ``generate``'s model keywords and in its models' forward.
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
CACHE_NAMES = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _cache_argument_of(forward):
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(model):
    """The keyword ``model.forward`` takes the KV cache under (a remote-code base may keep the old name)."""
    return _cache_argument_of(type(model).forward)


@functools.lru_cache(maxsize=None)
def _cache_field_of(output_class):
    names = {f.name for f in dataclasses.fields(output_class)}
    return next((name for name in CACHE_NAMES if name in names), None)


def output_cache(output):
    """The KV cache a model output carries, whichever name its class declares (no deprecation warning)."""
    field = _cache_field_of(type(output))
    return None if field is None else getattr(output, field)


def one_cache(cache, past_key_values):
    """The KV cache a caller passed under either name (both at once is an error, as in transformers)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values
