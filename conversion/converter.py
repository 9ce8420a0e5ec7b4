"""``convert``: a GenieBlue training checkpoint to a sharded-safetensors Hub folder, streamed, verified, atomic.

Steps: detect the source format; map its keys onto the GenieBlue schema (``keymap``); check them against the config
(missing, unexpected, shapes) from metadata alone; take the frozen base from ``--base`` when given (and compare it
with any base tensors the training checkpoint holds: a difference means the base was not frozen); plan shards from
shapes (``huggingface_hub.split_torch_state_dict_into_shards`` on meta tensors); write one shard at a time into a
temporary folder next to the output, one tensor at a time; verify; rename. Peak memory is about the largest tensor
(plus its cast), whatever the shard or model size.
"""

import json
import logging
from pathlib import Path

import torch
from huggingface_hub.utils import tqdm
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from ..modeling.configuration_genieblue import GenieBlueConfig
from ..modeling.modeling_genieblue import GenieBlueForConditionalGeneration
from ..atomic import atomic_output_dir, refuse_existing
from .keymap import (
    DEFAULT_RULES, IGNORED_TRAINING_STATE, PARTS, PEFT_RULES, parse_key_map, part_of, portable_rules,
    tied_keys,
)
from .side_files import write_side_files
from .writer import check_finite, write_shards
from .sources import (
    ConversionError, DistributedCheckpointSource, MappedSource, MergedSource, SafetensorsSource,
    open_weights,
)


logger = logging.getLogger(__name__)

FORMATS = ("trainer", "torch", "peft", "dcp")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def detect_format(src):
    src = Path(src)
    if src.is_file():
        return "torch"
    if (src / ".metadata").is_file():
        return "dcp"
    if (src / "adapter_config.json").is_file():
        return "peft"
    if src.is_dir():
        return "trainer"
    raise ConversionError(f"{src} does not exist")


def load_config(path):
    """The GenieBlue config in ``path`` (a ``config.json`` or its folder), checked before any tensor is read."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConversionError(f"no GenieBlue config at {path}; pass --config DIR_OR_JSON")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object, got a {type(data).__name__}")
    if data.get("model_type") != GenieBlueConfig.model_type:
        raise ConversionError(f"{path} is a {data.get('model_type')!r} config, not a GenieBlue config")
    try:
        return GenieBlueConfig.from_dict(data)
    except Exception as error:  # sub-config classes validate with their own error types
        raise ConversionError(f"{path} is not a valid GenieBlue config: {' '.join(str(error).split())}") from None


def require_genieblue_folder(folder, what="the model folder"):
    """A saved GenieBlue folder's config, or a clear error (missing, not a folder, not GenieBlue) before any loading."""
    folder = Path(folder)
    if not folder.exists():
        raise ConversionError(f"{what} {folder} does not exist (a local folder is expected; download Hub repos first)")
    if not folder.is_dir():
        raise ConversionError(f"{what} {folder} is not a folder")
    return load_config(folder)


def expected_tensors(config):
    """``{key: shape}`` a GenieBlue model of ``config`` saves, in the portable key layout (tied output embeddings
    left out)."""
    with torch.device("meta"):
        model = GenieBlueForConditionalGeneration(config)
    tied = tied_keys(config)
    return {model.portable_key(key): tuple(t.shape) for key, t in model.state_dict().items() if key not in tied}


def _peft_source(src, config, rest):
    if not (src / "adapter_config.json").is_file():
        raise ConversionError(f"--format peft needs a PEFT adapter folder; {src} has no adapter_config.json")
    try:
        adapter_config = json.loads((src / "adapter_config.json").read_text())
    except ValueError as error:
        raise ConversionError(f"cannot read {src / 'adapter_config.json'}: {error}") from None
    if not isinstance(adapter_config, dict):
        raise ConversionError(f"{src / 'adapter_config.json'} must hold a JSON object")
    for field, ours in (("r", config.lora_rank), ("lora_alpha", config.lora_alpha),
                        ("use_rslora", config.use_rslora)):
        theirs = adapter_config.get(field, False if field == "use_rslora" else None)
        if theirs != ours:
            raise ConversionError(
                f"adapter_config.json has {field}={theirs!r} but the GenieBlue config has {ours!r}; the LoRA scale "
                f"would change"
            )
    files = sorted(src.glob("adapter_model*.safetensors")) or sorted(src.glob("adapter_model*.bin"))
    if not files:
        raise ConversionError(f"{src} has adapter_config.json but no adapter_model.safetensors/.bin")
    adapter = open_weights(files[0]) if len(files) == 1 else SafetensorsSource(files)
    sources = [MappedSource(adapter, PEFT_RULES)]
    if rest is None:
        raise ConversionError("a PEFT adapter holds only LoRA; pass --rest with the replicated blocks, projector and "
                              "vision tower (a folder or a file)")
    sources.append(open_weights(rest))
    return MergedSource(sources)


def open_source(src, fmt, config, rest=None, key_map=()):
    src = Path(src)
    if fmt == "trainer":
        raw = open_weights(src)
    elif fmt == "torch":
        raw = open_weights(src)
    elif fmt == "peft":
        raw = _peft_source(src, config, rest)
    elif fmt == "dcp":
        raw = DistributedCheckpointSource(src)
    else:
        raise ConversionError(f"--format must be one of {FORMATS}, got {fmt!r}")
    ignore = IGNORED_TRAINING_STATE if fmt == "dcp" else ()
    return MappedSource(raw, DEFAULT_RULES + parse_key_map(key_map) + portable_rules(config), ignore=ignore)


def _group_by_part(keys):
    groups = {}
    for key in sorted(keys):
        groups.setdefault(part_of(key), []).append(key)
    return "; ".join(f"{part}: {', '.join(names)}" for part, names in sorted(groups.items()))


def plan_tensors(expected, source, base_source):
    """``{key: (source, source_key)}`` for every output tensor, after checking names and shapes."""
    plan, errors = {}, []
    for key in expected:
        provider = base_source if (base_source is not None and key.startswith("language_model.")) else source
        if key in provider.keys():
            plan[key] = provider
    missing = [k for k in expected if k not in plan]
    if missing:
        errors.append(f"missing tensors ({len(missing)}) - {_group_by_part(missing)}")
    tied = {"language_model.lm_head.weight"} - set(expected)
    unexpected = [
        k for k in source.keys()
        if k not in expected and k not in tied and not (base_source is not None and k.startswith("language_model."))
    ]
    if unexpected:
        errors.append(f"unexpected tensors ({len(unexpected)}) - {_group_by_part(unexpected)}")
    for key, provider in plan.items():
        shape = tuple(provider.meta(key)[0])
        if shape != expected[key]:
            errors.append(f"shape mismatch for {key}: checkpoint has {list(shape)}, the config needs {list(expected[key])}")
    if errors:
        raise ConversionError("the checkpoint does not match the GenieBlue config:\n  " + "\n  ".join(errors))
    return plan


def check_base_frozen(source, base_source, plan, allow_base_drift):
    """The training checkpoint's copy of the base must equal the base checkpoint, tensor for tensor."""
    drifted = []
    for key in sorted(k for k in source.keys() if k.startswith("language_model.") and k in plan):
        if not torch.equal(source.get(key), base_source.get(key)):
            drifted.append(key)
    if drifted:
        message = (f"{len(drifted)} base tensors in the training checkpoint differ from --base (the base was not "
                   f"frozen during training): {', '.join(drifted[:20])}{' ...' if len(drifted) > 20 else ''}")
        if not allow_base_drift:
            raise ConversionError(message + "; the output would take the --base tensors (pass --allow-base-drift)")
        logger.warning("%s; writing the --base tensors", message)


def _output_dtype(key, stored, dtype, cast_base):
    if dtype is None or not stored.is_floating_point:
        return stored
    if key.startswith("language_model.") and not cast_base:
        return stored
    return dtype


def same_bits(a, b):
    """Bit-for-bit equality (NaN equals a NaN of the same bits, which ``torch.equal`` never says)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def verify_output(folder, plan, dtypes, weight_map, base_path):
    """Every written tensor equals its source; the text path of the result equals the base, bit for bit."""
    mismatched = []
    for filename in tqdm(sorted(set(weight_map.values())), desc="Verifying shards", unit="shard"):
        with safe_open(str(folder / filename), framework="pt") as handle:
            for key in handle.keys():
                expected = plan[key].get(key).to(dtypes[key])
                if not same_bits(handle.get_tensor(key), expected):
                    mismatched.append(key)
    if mismatched:
        raise ConversionError(f"written tensors differ from the source: {mismatched}")
    model = GenieBlueForConditionalGeneration.from_pretrained(folder, dtype="auto").eval()
    if base_path is not None:
        # the base as a user loads it in the converted text path's dtype (buffers such as rotary tables keep theirs)
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=model.language_model.dtype).eval()
    else:
        base = type(model.language_model)(model.language_model.config)
        prefix = "language_model."
        loaded = base.load_state_dict({k[len(prefix):]: plan[k].get(k) for k in plan if k.startswith(prefix)},
                                      strict=False)
        tied = {"lm_head.weight"} if getattr(base.config, "tie_word_embeddings", False) else set()
        if set(loaded.missing_keys) - tied or loaded.unexpected_keys:
            raise ConversionError(f"the base tensors do not build {type(base).__name__}: missing "
                                  f"{sorted(set(loaded.missing_keys) - tied)}, unexpected {loaded.unexpected_keys}")
        base.tie_weights()
        dtype = model.language_model.dtype
        for param in base.parameters():  # parameters only: buffers (rotary tables) keep their dtype, as on load
            param.data = param.data.to(dtype)
        base.eval()
    base.set_attn_implementation(model.language_model.config._attn_implementation)
    vocab = model.config.text_config.vocab_size
    input_ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(model(input_ids=input_ids).logits, base(input_ids=input_ids).logits):
            raise ConversionError("verification failed: the converted text path differs from the base model")
    logger.info("verified %d tensors and the text path's bit-identity with the base", len(plan))


def _provenance(sources):
    """``{"role:path": sha256}`` of every file read. Hashed before the tensors are read and again after the output is
    written: equal hashes mean the recorded ones are of the bytes actually read."""
    return {f"{role}:{path}": digest for role, source in sources.items() if source is not None
            for path, digest in source.provenance().items()}


def convert(src, out, *, format=None, config=None, base=None, rest=None, processor=None, key_map=(), dtype=None,
            cast_base=False, max_shard_size="2GB", verify=True, overwrite=False, allow_nonfinite=False,
            allow_base_drift=False):
    """Convert a training checkpoint at ``src`` into a Hub folder at ``out``; see the module docstring."""
    from .. import __version__

    src, out = Path(src), Path(out)
    refuse_existing(out, overwrite)
    for option, value in (("--base", base), ("--rest", rest), ("--processor", processor), ("--config", config)):
        if value is not None and not Path(value).exists():
            raise ConversionError(f"{option} {value} does not exist")
    fmt = format or detect_format(src)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config_path = config or (src if src.is_dir() and (src / "config.json").is_file() else rest)
    if config_path is None:
        raise ConversionError(f"{src} has no config.json; pass --config DIR_OR_JSON")
    genieblue_config = load_config(config_path)
    source = open_source(src, fmt, genieblue_config, rest=rest, key_map=key_map)
    base_source = None
    if base is not None:
        base_source = MappedSource(open_weights(base), [(r"^(?!language_model\.)", "language_model.")])
    expected = expected_tensors(genieblue_config)
    plan = plan_tensors(expected, source, base_source)
    if base_source is not None:
        check_base_frozen(source, base_source, plan, allow_base_drift)
    target_dtype = DTYPES.get(dtype)
    dtypes = {key: _output_dtype(key, provider.meta(key)[1], target_dtype, cast_base) for key, provider in plan.items()}
    # from_pretrained loads every tensor in config.dtype: keep it the base's dtype unless the base is cast too, so
    # the text path stays the base (trained tensors stored in a smaller dtype are upcast exactly on load).
    base_dtypes = {dtypes[k] for k in plan if k.startswith("language_model.") and dtypes[k].is_floating_point}
    if len(base_dtypes) == 1:
        genieblue_config.dtype = base_dtypes.pop()

    sources = {"checkpoint": source, "base": base_source}
    provenance = _provenance(sources)
    metadata = {
        "format": "pt",
        "genieblue_converter": __version__,
        "source_format": fmt,
        "source_sha256": json.dumps(provenance, sort_keys=True),
    }
    with atomic_output_dir(out, overwrite) as staging:
        weight_map = write_shards(staging, plan, dtypes, metadata, max_shard_size, allow_nonfinite)
        if not write_side_files(staging, genieblue_config, [processor, src if src.is_dir() else None, rest]):
            logger.warning("no tokenizer/processor files found; pass --processor DIR to include them")
        if verify:
            verify_output(staging, plan, dtypes, weight_map, base)
        if _provenance(sources) != provenance:
            raise ConversionError("a source file changed while it was being converted; convert it again")
    logger.info("converted %s (%s, %d tensors) into %s", src, fmt, len(plan), out)
    return out


__all__ = ["convert", "detect_format", "ConversionError", "FORMATS", "PARTS", "require_genieblue_folder", "check_finite"]
