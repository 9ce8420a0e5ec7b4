"""Writing safetensors shards one tensor at a time (bounded memory), with the trained tensors checked for NaN/Inf."""

import json
import logging
import math
import struct

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.utils import tqdm

from .keymap import TRAINED_PARTS, part_of
from .sources import _SAFETENSORS_DTYPES, ConversionError


logger = logging.getLogger(__name__)


def check_finite(key, tensor, allow_nonfinite=False):
    """Trained tensors must hold no NaN/Inf (the base is taken as it is)."""
    if part_of(key) in TRAINED_PARTS and tensor.is_floating_point() and not torch.isfinite(tensor).all():
        message = f"tensor {key} holds NaN or Inf values"
        if not allow_nonfinite:
            raise ConversionError(message + " (pass --allow-nonfinite to write it anyway)")
        logger.warning(message)


def _materialise(key, provider, out_dtype, allow_nonfinite):
    tensor = provider.get(key)
    if tensor.dtype != out_dtype:
        tensor = tensor.to(out_dtype)
    check_finite(key, tensor, allow_nonfinite)
    return tensor.contiguous()


def write_safetensors(path, keys, shapes, dtypes, load, metadata):
    """Write one safetensors file tensor by tensor.

    Hand-written on purpose: ``safetensors.torch.save_file`` takes the whole shard as a dict of tensors and builds a
    serialized copy (about three shards in memory); writing the header from shapes and then each tensor's bytes in
    turn keeps one tensor in memory. The layout is the standard one (8-byte little-endian header size, JSON header
    padded to 8 bytes, contiguous data), and ``verify`` reads every file back with ``safe_open``.
    """
    header, offset = {}, 0
    for key in keys:
        nbytes = math.prod(shapes[key]) * dtypes[key].itemsize
        header[key] = {"dtype": _SAFETENSORS_NAMES[dtypes[key]], "shape": list(shapes[key]),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for key in keys:
            tensor = load(key)
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            if data.nbytes != header[key]["data_offsets"][1] - header[key]["data_offsets"][0]:
                raise ConversionError(f"tensor {key} changed size while being written")
            handle.write(data)
            del tensor, data


_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def write_shards(folder, plan, dtypes, metadata, max_shard_size, allow_nonfinite):
    """Plan shards from shapes, then write them one tensor at a time; returns ``{key: file}``."""
    shapes = {key: tuple(plan[key].meta(key)[0]) for key in plan}
    meta_tensors = {key: torch.empty(shapes[key], dtype=dtypes[key], device="meta") for key in plan}
    split = split_torch_state_dict_into_shards(meta_tensors, max_shard_size=max_shard_size)
    with tqdm(total=len(plan), desc="Writing tensors", unit="tensor") as progress:

        def load(key):
            tensor = _materialise(key, plan[key], dtypes[key], allow_nonfinite)
            progress.update(1)
            return tensor

        for filename, keys in split.filename_to_tensors.items():
            write_safetensors(folder / filename, keys, shapes, dtypes, load, metadata)
    if split.is_sharded:
        index = {"metadata": {**split.metadata, **metadata}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return split.tensor_to_filename
