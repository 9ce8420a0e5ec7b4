"""The non-shared deployment layout: one Hub folder, two audiences, every tensor stored once.

::

    config.json, *.py, processor files        GenieBlue (remote code)
    model.safetensors.index.json              all tensors: multimodal shards here, base shards in language_model/
    multimodal-0000i-of-0000M.safetensors     vision tower, projector, replicated blocks, LoRA
    language_model/config.json                the base LLM's own config (e.g. Qwen2)
    language_model/model.safetensors.index.json
    language_model/language_model-0000j-of-0000N.safetensors   the frozen base, keys prefixed "language_model."

GenieBlue loads the whole folder as usual. A text-only user fetches ``language_model/*`` only
(``snapshot_download(repo, allow_patterns=["language_model/*"])``) and loads the base with its own class, without
remote code::

    AutoModelForCausalLM.from_pretrained(repo, subfolder="language_model", key_mapping={r"^language_model\\.": ""})

which is exactly GenieBlue's text path.
"""

import json
import logging
from pathlib import Path

from huggingface_hub import save_torch_state_dict

from .atomic import atomic_output_dir
from .conversion.side_files import write_side_files
from .conversion.keymap import tied_keys


logger = logging.getLogger(__name__)

BASE_SUBFOLDER = "language_model"
KEY_MAPPING = {r"^language_model\.": ""}
INDEX = "model.safetensors.index.json"


def _split_state_dict(model):
    tied = tied_keys(model.config)  # rebuilt from the input embeddings on load
    state = {model.portable_key(k): v for k, v in model.state_dict().items() if k not in tied}
    base = {k: v for k, v in state.items() if k.startswith("language_model.")}
    rest = {k: v for k, v in state.items() if not k.startswith("language_model.")}
    return base, rest


def write_non_shared(model, folder, processor=None, max_shard_size="2GB"):
    """Write ``model`` (and ``processor``) into the existing, empty ``folder`` in the non-shared layout."""
    folder = Path(folder)
    base, rest = _split_state_dict(model)
    sub = folder / BASE_SUBFOLDER
    sub.mkdir()
    save_torch_state_dict(base, sub, filename_pattern=BASE_SUBFOLDER + "{suffix}.safetensors",
                          max_shard_size=max_shard_size, force_contiguous=True)
    save_torch_state_dict(rest, folder, filename_pattern="multimodal{suffix}.safetensors",
                          max_shard_size=max_shard_size, force_contiguous=True)
    _write_combined_index(folder, sub, base, rest)
    write_side_files(folder, model.config)
    model.language_model.config.save_pretrained(sub)
    model.language_model.generation_config.save_pretrained(sub)
    if processor is not None:
        processor.save_pretrained(folder)
        processor.tokenizer.save_pretrained(sub)
    logger.info("non-shared layout: %d base tensors in %s/, %d multimodal tensors", len(base), BASE_SUBFOLDER, len(rest))


def save_non_shared(model, out_dir, processor=None, max_shard_size="2GB", overwrite=False):
    """``write_non_shared`` into a temporary folder next to ``out_dir``, renamed when complete."""
    with atomic_output_dir(out_dir, overwrite) as staging:
        write_non_shared(model, staging, processor=processor, max_shard_size=max_shard_size)
    return Path(out_dir)


def _take_weight_map(folder, stem, tensors):
    """The weight map ``save_torch_state_dict`` wrote for ``stem`` (removing its index), or its single file."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        index.unlink()
        return weight_map
    return {key: f"{stem}.safetensors" for key in tensors}


def _write_combined_index(staging, sub, base, rest):
    """One top-level index for GenieBlue; the base gets its own index inside its subfolder."""
    base_map = _take_weight_map(sub, BASE_SUBFOLDER, base)
    rest_map = _take_weight_map(staging, "multimodal", rest)
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors.values())  # noqa: E731
    (sub / INDEX).write_text(json.dumps({"metadata": {"total_size": nbytes(base)}, "weight_map": base_map},
                                        indent=2, sort_keys=True) + "\n")
    weight_map = {**{k: f"{BASE_SUBFOLDER}/{f}" for k, f in base_map.items()}, **rest_map}
    index = {"metadata": {"total_size": nbytes(base) + nbytes(rest)}, "weight_map": weight_map}
    (staging / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def load_text_only_base(folder_or_repo, **kwargs):
    """The base LLM from a non-shared folder, with its own class and no remote code (GenieBlue's text path)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder_or_repo, subfolder=BASE_SUBFOLDER, key_mapping=KEY_MAPPING,
                                                **kwargs)
