"""Quick start: compose a tiny GenieBlue, run a text-only and an image request, and check the text path.

Everything is built locally from small random-initialised configs (no download): a Qwen2-style base LLM and a
SigLIP vision tower are composed with ``GenieBlueForConditionalGeneration.from_base``. The multimodal path is then
given weights of its own (standing in for training), so the two paths really differ.
"""

import logging

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from genieblue_hf import GenieBlueForConditionalGeneration


logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("quickstart")


def main():
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
        )
    ).eval()
    vision = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, vision_use_head=False)
    ).eval()
    model = GenieBlueForConditionalGeneration.from_base(base, vision).eval()
    with torch.no_grad():  # stand-in for stage-2 training: give LoRA and the replicated blocks their own weights
        for name, param in model.named_parameters():
            if name.startswith("replicated_layers.") or name.endswith("lora_B"):
                param.add_(torch.randn_like(param) * 0.05)

    config = model.config
    log.info("replicated blocks %s, LoRA rank %d on blocks %s", config.replicated_layers, config.lora_rank,
             config.lora_layers)

    prompt = torch.randint(3, 128, (1, 10))
    text_ids = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    base_ids = base.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    log.info("text-only request -> %s", text_ids[0, 10:].tolist())

    tokens = config.image_tokens_per_tile
    image_prompt = torch.cat([prompt[:, :3], torch.full((1, tokens), config.image_token_id), prompt[:, 3:]], dim=1)
    pixel_values = torch.rand(1, 3, 32, 32) * 2 - 1
    image_ids = model.generate(input_ids=image_prompt, pixel_values=pixel_values, max_new_tokens=8, do_sample=False)
    log.info("image request     -> %s", image_ids[0, image_prompt.shape[1]:].tolist())

    identical = torch.equal(text_ids, base_ids)
    log.info("text path equals the base LLM, bit for bit: %s", identical)
    if not identical:
        raise SystemExit("text path differs from the base LLM")


if __name__ == "__main__":
    main()
