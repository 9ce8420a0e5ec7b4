"""Assemble a GenieBlue Hub folder with a model card, and optionally push it.

The folder is written under a temporary name next to the output and renamed when complete, so a failure leaves no
partial folder; a failed push leaves the finished folder in place.
"""

import logging
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData
from transformers import AutoProcessor

from .atomic import atomic_output_dir, refuse_existing
from .conversion.converter import require_genieblue_folder
from .conversion.side_files import PROCESSOR_FILES
from .conversion.writer import check_finite
from .modeling.modeling_genieblue import GenieBlueForConditionalGeneration


logger = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """Publishing failed; the message says what and where the finished folder (if any) is."""


def parameter_counts(model):
    """Parameters per part, counted from the model (shared tensors counted once)."""
    parts = {
        "vision tower": model.vision_tower,
        "projector": model.multi_modal_projector,
        "base LLM (frozen)": model.language_model,
        "replicated blocks": model.replicated_layers,
        "LoRA": model.lora,
    }
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    counts["multimodal extras"] = sum(v for k, v in counts.items() if k != "base LLM (frozen)")
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def _human(count):
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


QUICK_START = '''```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

repo = "{repo_id}"
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

# Text only: runs the original base LLM, bit for bit.
messages = [{{"role": "user", "content": [{{"type": "text", "text": "Write one sentence about the sea."}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])

# With an image: the multimodal path (replicated blocks + LoRA).
image = Image.new("RGB", (640, 320), "white")
messages = [{{"role": "user", "content": [{{"type": "image", "image": image}},
                                         {{"type": "text", "text": "Describe this image."}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```'''


TEXT_ONLY = '''
### Text only, without the multimodal files

This repo uses the non-shared layout: the base LLM sits in `language_model/` in its own format, so text-only use
downloads only those files and needs no remote code (it is exactly this model's text path):

```python
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM

folder = snapshot_download("{repo_id}", allow_patterns=["language_model/*"])
llm = AutoModelForCausalLM.from_pretrained(folder, subfolder="language_model",
                                           key_mapping={{r"^language_model\\.": ""}})
```
'''


def build_model_card(model, repo_id, base_model=None, license="apache-2.0", non_shared=False):
    """A ``huggingface_hub.ModelCard`` whose numbers are computed from ``model``."""
    config = model.config
    text = config.text_config
    base_model = base_model or getattr(text, "_name_or_path", None) or None
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license,
        base_model=base_model or None,
        tags=["genieblue", "multimodal", "image-text-to-text", "custom_code", "lora"],
    )
    counts = parameter_counts(model)
    rows = "\n".join(f"| {name} | {_human(count)} ({count:,}) |" for name, count in counts.items())
    content = f"""---
{data.to_yaml()}
---

# {repo_id.split("/")[-1]}

A [GenieBlue](https://arxiv.org/abs/2503.06019) multimodal model: a SigLIP vision tower and an MLP projector feed a
frozen base LLM ({type(model.language_model).__name__}{f", `{base_model}`" if base_model else ""}). Text-only requests
run the original base LLM untouched; image requests run a multimodal path made of trained copies of some decoder
blocks plus LoRA on the others.

## Quick start

{QUICK_START.format(repo_id=repo_id)}
{TEXT_ONLY.format(repo_id=repo_id) if non_shared else ""}
## Architecture

- Decoder blocks: {text.num_hidden_layers}; replicated ({config.replication_strategy!r} strategy, interval
  {config.replication_interval}): {config.replicated_layers}
- LoRA on the other {len(config.lora_layers)} blocks: rank {config.lora_rank}, alpha {config.lora_alpha}{", rsLoRA" if config.use_rslora else ""},
  targets {", ".join(config.lora_target_modules)}; execution mode `{config.lora_execution_mode}`
- Vision: {type(model.vision_tower).__name__}, {config.vision_image_size}px tiles, {config.image_tokens_per_tile} image
  tokens per tile after {config.downsample_ratio}x{config.downsample_ratio} token merging

| part | parameters |
|---|---|
{rows}

## Non-shared base guarantee

A request without images runs `model.language_model`, the base model's own class with its original weights, and
produces exactly the base model's logits and tokens (same dtype and attention implementation). The multimodal path
never writes the base weights: LoRA is applied on the fly, or merged into separate tensors. The route is chosen per
sequence and kept for all of its decoding steps.
"""
    return ModelCard(content)


def publish(model_dir, out_dir, repo_id=None, push=False, overwrite=False, license="apache-2.0", base_model=None,
            max_shard_size="2GB", non_shared=False, allow_nonfinite=False, vllm_adapter=True):
    """Write a complete Hub folder for ``model_dir`` into ``out_dir`` (and push it when ``push``)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    require_genieblue_folder(model_dir)
    refuse_existing(out_dir, overwrite)
    if push and not repo_id:
        raise PublishError("--push needs --repo-id org/name")
    repo_id = repo_id or f"your-org/{model_dir.name}"

    logger.info("loading %s", model_dir)
    model = GenieBlueForConditionalGeneration.from_pretrained(model_dir)
    for key, tensor in model.state_dict().items():  # as convert does: trained weights must be finite
        check_finite(key, tensor, allow_nonfinite)
    processor = None
    if any((model_dir / name).is_file() for name in PROCESSOR_FILES if name.endswith("config.json")):
        processor = AutoProcessor.from_pretrained(model_dir)
    else:
        logger.warning("%s has no processor files; the Hub folder will hold the model only", model_dir)

    with atomic_output_dir(out_dir, overwrite) as staging:
        if non_shared:
            from .deployment import write_non_shared

            write_non_shared(model, staging, processor=processor, max_shard_size=max_shard_size)
        else:
            model.save_pretrained(staging, max_shard_size=max_shard_size)
            if processor is not None:
                processor.save_pretrained(staging)
        if vllm_adapter and model.lora:
            from .vllm.route_adapter import write_route_adapter

            write_route_adapter(model, staging)  # multimodal_lora/: how vLLM routes image requests
        card = build_model_card(model, repo_id, base_model=base_model, license=license, non_shared=non_shared)
        card.save(staging / "README.md")
    logger.info("Hub folder ready at %s", out_dir)

    if push:
        try:
            api = HfApi()
            api.create_repo(repo_id, exist_ok=True)
            api.upload_folder(folder_path=str(out_dir), repo_id=repo_id, commit_message="Upload GenieBlue model")
        except Exception as error:  # network, auth and Hub errors all mean the same thing to the user here
            raise PublishError(
                f"could not push to the Hub repo {repo_id}: {type(error).__name__}: {error}. The folder is complete at "
                f"{out_dir}; push it later with `hf upload {repo_id} {out_dir}`."
            ) from error
        logger.info("pushed to %s", repo_id)
    return out_dir
