"""GenieBlue in vLLM: both paths in one engine, text requests run exactly the base.

Installed with the package and registered through vLLM's plugin entry point (``vllm.general_plugins``), so a
GenieBlue folder (as ``genieblue publish`` writes it) serves with no conversion step::

    vllm serve path/to/genieblue --enable-lora --max-lora-rank 8 --max-loras 2 \\
        --default-mm-loras '{"image": "path/to/genieblue/multimodal_lora"}'

How a request finds its path: vLLM carries one per-request switch from the API through the scheduler, the prefix
cache and the model, the LoRA request. ``multimodal_lora/`` is GenieBlue's own LoRA in PEFT layout plus a one-matrix
"route probe"; ``--default-mm-loras`` attaches it to every request with an image. In the model, LoRA applies to the
image requests' tokens only (vLLM's own LoRA kernels), the route probe tells each token's path, and the replicated
blocks run on exactly those tokens (``model.GenieBlueForConditionalGeneration``). Text requests carry no LoRA: every
one of their tokens runs the base weights, and their KV blocks never hash like an image request's (the LoRA name is
part of vLLM's prefix-cache hash).

Nothing here imports vLLM until vLLM loads the plugin; ``route_adapter`` (writing ``multimodal_lora/``) needs only
torch and safetensors.
"""

ARCHITECTURE = "GenieBlueForConditionalGeneration"


def register():
    """vLLM's plugin hook: make the GenieBlue architecture and config known to vLLM and transformers."""
    from vllm import ModelRegistry

    import genieblue_hf  # noqa: F401  (registers GenieBlueConfig with transformers' AutoConfig)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "genieblue_hf.vllm.model:GenieBlueForConditionalGeneration")


def image_lora_request(model_folder):
    """The ``LoRARequest`` that puts an image request on GenieBlue's multimodal path. The OpenAI-compatible server
    attaches it to image requests by itself (``--default-mm-loras``); offline ``LLM.generate`` calls pass it along
    with each request that has images."""
    from pathlib import Path

    from vllm.lora.request import LoRARequest

    from .route_adapter import FOLDER

    return LoRARequest("genieblue-image", 1, str(Path(model_folder) / FOLDER))


__all__ = ["register", "image_lora_request", "ARCHITECTURE"]
