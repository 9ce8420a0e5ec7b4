"""``multimodal_lora/``: the PEFT-layout adapter that routes a request onto GenieBlue's multimodal path in vLLM.

It holds GenieBlue's LoRA (``lora.<i>.<path>.lora_{A,B}`` as
``base_model.model.language_model.model.layers.<i>.<path>.lora_{A,B}.weight``) and a route probe: a square LoRA pair
on the model's ``language_model.genieblue_route`` linear whose delta is the identity, so the probe's output is 1 for
tokens of requests that carry this adapter and 0 for every other token. The LoRA tensors are stored a second time
here (about 0.4% of a 3B model), in the layout vLLM loads adapters from.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

FOLDER = "multimodal_lora"
PROBE = "genieblue_route"


def route_adapter_tensors(model):
    """``{PEFT key: tensor}`` of ``model``'s LoRA and the route probe."""
    config = model.config
    tensors = {}
    for index, tree in model.lora.items():
        for path, adapter in tree.adapters().items():
            prefix = f"base_model.model.language_model.model.layers.{index}.{path}"
            tensors[f"{prefix}.lora_A.weight"] = adapter.lora_A.detach().float().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = adapter.lora_B.detach().float().contiguous()
    rank = config.lora_rank
    tensors[f"base_model.model.language_model.{PROBE}.lora_A.weight"] = torch.eye(rank)
    tensors[f"base_model.model.language_model.{PROBE}.lora_B.weight"] = torch.eye(rank) / config.lora_scaling
    return tensors


def write_route_adapter(model, folder):
    """Write ``multimodal_lora/`` for ``model`` into ``folder`` (a Hub folder being assembled)."""
    config = model.config
    out = Path(folder) / FOLDER
    out.mkdir()
    targets = config.lora_target_modules
    targets = sorted({p.rsplit(".", 1)[-1] for tree in model.lora.values() for p in tree.adapters()}) if (
        targets == "all-linear") else list(targets)
    save_file(route_adapter_tensors(model), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA",
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": [*targets, PROBE],
        "task_type": "CAUSAL_LM",
    }, indent=2) + "\n")
    return out
