"""Lazy tensor sources for every checkpoint format a GenieBlue training run produces.

A source answers ``keys()``, ``meta(key)`` (shape and dtype, without reading data) and ``get(key)`` (one tensor),
so conversion can plan shards from shapes and hold only what it is writing. Readers:

- ``SafetensorsSource``: ``*.safetensors`` files, read with ``safetensors.safe_open``.
- ``TorchFileSource``: ``.bin``/``.pt`` pickles, loaded with ``torch.load(weights_only=True, mmap=True)``.
- ``DistributedCheckpointSource``: a ``torch.distributed.checkpoint`` folder (FSDP/DCP), read with torch's own
  ``FileSystemReader``, one tensor per ``dcp.load`` call.
- ``MappedSource``: renames and filters another source's keys (prefixes, PEFT names, ``--key-map``).
- ``MergedSource``: several sources as one (a PEFT adapter plus the rest of the model).
"""

import hashlib
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file, key or part at fault."""


def sha256_of(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class TensorSource:
    files = ()

    def keys(self):
        raise NotImplementedError

    def meta(self, key):
        """``(shape, dtype)`` of ``key`` without reading its data."""
        raise NotImplementedError

    def get(self, key):
        raise NotImplementedError

    def provenance(self):
        """``{file name: sha256}`` of the files this source reads."""
        return {str(path): sha256_of(path) for path in self.files}


class SafetensorsSource(TensorSource):
    def __init__(self, files):
        self.files = [Path(f) for f in files]
        self._where = {}
        self._meta = {}
        for path in self.files:
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():
                        piece = handle.get_slice(key)
                        self._where[key] = path
                        self._meta[key] = (tuple(piece.get_shape()), _SAFETENSORS_DTYPES[piece.get_dtype()])
            except (SafetensorError, OSError, KeyError) as error:
                raise ConversionError(f"cannot read {path}: truncated or not a safetensors file ({error})") from None

    def keys(self):
        return list(self._where)

    def meta(self, key):
        return self._meta[key]

    def get(self, key):
        path = self._where[key]
        try:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(key)
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"cannot read tensor {key} from {path}: {error}") from None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class TorchFileSource(TensorSource):
    """A pickled state dict; ``weights_only=True`` refuses anything but tensors and plain containers."""

    def __init__(self, files):
        self.files = [Path(f) for f in files]
        self._tensors = {}
        for path in self.files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as error:
                raise ConversionError(
                    f"{path} holds objects other than tensors; torch.load(weights_only=True) refused it ({error})"
                ) from None
            except (RuntimeError, OSError, EOFError) as error:
                raise ConversionError(f"cannot read {path}: truncated or not a PyTorch checkpoint ({error})") from None
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]
            if not isinstance(state, dict):
                raise ConversionError(f"{path} does not hold a state dict (got {type(state).__name__})")
            bad_keys = [key for key in state if not isinstance(key, str)]
            if bad_keys:
                raise ConversionError(
                    f"{path} is not a state dict: its keys must be parameter names, got {type(bad_keys[0]).__name__} "
                    f"keys such as {bad_keys[0]!r}"
                )
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    self._tensors[key] = value

    def keys(self):
        return list(self._tensors)

    def meta(self, key):
        tensor = self._tensors[key]
        return tuple(tensor.shape), tensor.dtype

    def get(self, key):
        return self._tensors[key]


# What a torch.distributed.checkpoint ``.metadata`` pickle may name: DCP's own metadata classes and the plain values
# they hold. Anything else (a ``__reduce__`` payload calling os.system, say) is refused before it runs.
_DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,  # every class of DCP's metadata module
    "torch.distributed.checkpoint.planner": None,
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, resolving only the globals DCP's metadata is made of."""

    def find_class(self, module, name):
        allowed = _DCP_METADATA_GLOBALS.get(module, ())
        if allowed is None or name in allowed or (module == "torch" and _is_torch_dtype_like(name)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's metadata")


def _is_torch_dtype_like(name):
    value = getattr(torch, name, None)
    return isinstance(value, (torch.dtype, torch.layout, torch.memory_format))


def _safe_reader(folder):
    """torch's ``FileSystemReader`` reading ``.metadata`` with ``_MetadataUnpickler`` instead of ``pickle.load``
    (torch unpickles it unrestricted, so a crafted checkpoint could run code)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = Path(folder) / ".metadata"
            with open(path, "rb") as handle:
                try:
                    metadata = _MetadataUnpickler(handle).load()
                except pickle.UnpicklingError as error:
                    raise ConversionError(f"{path} is not a plain distributed-checkpoint index: {error}") from None
                except Exception as error:  # truncated or corrupt pickles raise many types
                    raise ConversionError(f"cannot read {path}: corrupt or not a distributed checkpoint ({error})"
                                          ) from None
            if not isinstance(metadata, Metadata):
                raise ConversionError(f"{path} holds a {type(metadata).__name__}, not distributed-checkpoint metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(folder))


class DistributedCheckpointSource(TensorSource):
    """A ``torch.distributed.checkpoint`` folder (what FSDP's ``dcp.save`` writes), read without a process group.
    Its ``.metadata`` index is read with a restricted unpickler; tensors with ``torch.load(weights_only=True)``."""

    def __init__(self, folder):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder = Path(folder)
        self.files = sorted(p for p in self.folder.iterdir() if p.is_file())
        metadata = _safe_reader(self.folder).read_metadata()
        self._meta = {
            key: (tuple(item.size), item.properties.dtype)
            for key, item in metadata.state_dict_metadata.items()
            if isinstance(item, TensorStorageMetadata)
        }

    def keys(self):
        return list(self._meta)

    def meta(self, key):
        return self._meta[key]

    def get(self, key):
        import torch.distributed.checkpoint as dcp

        shape, dtype = self._meta[key]
        target = {key: torch.empty(shape, dtype=dtype)}
        try:
            dcp.load(target, storage_reader=_safe_reader(self.folder), no_dist=True)
        except ConversionError:
            raise
        except Exception as error:
            raise ConversionError(f"cannot read tensor {key} from {self.folder}: {error}") from None
        return target[key]


class MappedSource(TensorSource):
    """``source`` with keys renamed by ``rules`` (``[(regex, replacement)]``, applied in order, repeatedly until
    nothing changes) and keys matching ``ignore`` dropped."""

    def __init__(self, source, rules, ignore=()):
        self.source = source
        self.files = source.files
        compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
        ignored = [re.compile(pattern) for pattern in ignore]
        self._original = {}
        for key in source.keys():
            if any(p.search(key) for p in ignored):
                continue
            new = _apply_rules(key, compiled)
            if new in self._original:
                raise ConversionError(f"keys {self._original[new]!r} and {key!r} both map to {new!r}")
            self._original[new] = key

    def keys(self):
        return list(self._original)

    def meta(self, key):
        return self.source.meta(self._original[key])

    def get(self, key):
        return self.source.get(self._original[key])


def _apply_rules(key, rules):
    for _ in range(16):
        new = key
        for pattern, replacement in rules:
            new = pattern.sub(replacement, new)
        if new == key:
            return key
        key = new
    return key


class MergedSource(TensorSource):
    def __init__(self, sources):
        self.sources = sources
        self.files = [f for s in sources for f in s.files]
        self._owner = {}
        for source in sources:
            for key in source.keys():
                if key in self._owner:
                    raise ConversionError(f"tensor {key} is present in more than one source")
                self._owner[key] = source

    def keys(self):
        return list(self._owner)

    def meta(self, key):
        return self._owner[key].meta(key)

    def get(self, key):
        return self._owner[key].get(key)


def read_weight_map(index):
    """The ``weight_map`` of a sharded checkpoint's index file, checked to be ``{tensor name: shard file}``."""
    try:
        data = json.loads(Path(index).read_text())
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot read the checkpoint index {index}: {error}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ConversionError(f"{index} has no weight_map of tensor names to shard files")
    if any(Path(v).is_absolute() or ".." in Path(v).parts for v in weight_map.values()):
        raise ConversionError(f"{index} names shard files outside its folder")
    return weight_map


def open_weights(path):
    """A source for a model folder or file: safetensors (sharded or not) or PyTorch pickles."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsSource([path])
        return TorchFileSource([path])
    if not path.is_dir():
        raise ConversionError(f"{path} does not exist")
    for index_name, reader in (("model.safetensors.index.json", SafetensorsSource),
                               ("pytorch_model.bin.index.json", TorchFileSource)):
        index = path / index_name
        if index.is_file():
            files = sorted(set(read_weight_map(index).values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise ConversionError(f"{index} lists shards that are missing: {missing}")
            return reader([path / f for f in files])
    for pattern, reader in (("*.safetensors", SafetensorsSource), ("pytorch_model*.bin", TorchFileSource),
                            ("*.pt", TorchFileSource)):
        files = sorted(path.glob(pattern))
        if files:
            return reader(files)
    raise ConversionError(f"{path} holds no model.safetensors, pytorch_model.bin or *.pt weights")
