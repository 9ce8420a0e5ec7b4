"""Tiny random-initialised GenieBlue models and helpers shared by the tests (no Hub access needed)."""

import hashlib
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from genieblue_hf import GenieBlueForConditionalGeneration


os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 96
NUM_LAYERS = 8  # interval 4 -> replicated blocks 3 and 7
IMAGE_SIZE = 16
TOKENS_PER_TILE = 4  # (16 / 4 patches per side / 2x2 merge) ** 2

BASES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}


def tiny_text_config(kind="qwen2", **overrides):
    config_class, _ = BASES[kind]
    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return config_class(**kwargs)


def tiny_vision_config(**overrides):
    kwargs = dict(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=4,
        vision_use_head=False,
    )
    kwargs.update(overrides)
    return SiglipVisionConfig(**kwargs)


def tiny_base(kind="qwen2", seed=0, **text_overrides):
    torch.manual_seed(seed)
    _, model_class = BASES[kind]
    return model_class(tiny_text_config(kind, **text_overrides)).eval()


@torch.no_grad()
def perturb_multimodal(model, seed=1):
    """Give the multimodal path weights of its own, so a wrong route shows up in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.replicated_layers.parameters():
        param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)
    for name, param in model.lora.named_parameters():
        if name.endswith("lora_B"):
            param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)


def tiny_genieblue(kind="qwen2", seed=0, perturb=True, dtype=torch.float32, **overrides):
    base = tiny_base(kind, seed)
    torch.manual_seed(seed + 100)
    vision = SiglipVisionModel(tiny_vision_config()).eval()
    model = GenieBlueForConditionalGeneration.from_base(base, vision, **overrides).eval()
    if perturb:
        perturb_multimodal(model)
    return model.to(dtype)


def base_twin(model):
    """An independent instance of the base's own class holding the same weights, dtype and attention backend."""
    language_model = model.language_model
    twin = type(language_model)(language_model.config)
    twin.load_state_dict(language_model.state_dict())
    twin.to(language_model.dtype)
    for name, buffer in language_model.named_buffers():  # e.g. rotary inv_freq, kept in fp32 by from_pretrained
        *parents, leaf = name.split(".")
        twin.get_submodule(".".join(parents))._buffers[leaf] = buffer.clone()
    return twin.eval()


def state_hash(module):
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def text_batch(batch=2, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def image_row(model, num_images=1, prefix=3, suffix=4, seed=0):
    """input_ids of one sequence with ``num_images`` single-tile images, and their pixel_values."""
    generator = torch.Generator().manual_seed(seed)
    pieces = []
    for _ in range(num_images):
        pieces.append(torch.randint(3, VOCAB, (prefix,), generator=generator))
        pieces.append(torch.full((TOKENS_PER_TILE,), model.config.image_token_id))
    pieces.append(torch.randint(3, VOCAB, (suffix,), generator=generator))
    pixel_values = torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return torch.cat(pieces), pixel_values


def left_pad(rows, pad_id=0):
    """Left-padded ``input_ids`` and ``attention_mask`` for a list of 1-D sequences."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = row
        attention_mask[i, length - len(row) :] = 1
    return input_ids, attention_mask


@pytest.fixture(params=["qwen2", "llama"])
def kind(request):
    return request.param
