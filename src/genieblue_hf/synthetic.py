"""Small, locally built ingredients for demos, examples and tests: a BPE tokenizer, tiny base models, and a
procedurally generated image-question dataset. Nothing is downloaded."""

import random

import torch
from PIL import Image, ImageDraw


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220)}
SHAPES = ("square", "circle")


def build_bpe_tokenizer(corpus, vocab_size=300):
    """A byte-level BPE tokenizer with ChatML special tokens (Qwen-style), trained on ``corpus`` in a moment."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def shape_image(colour, shape, size=32, seed=0):
    """A white image with one coloured square or circle at a random place."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), "white")
    side = rng.randint(size // 3, size // 2)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)((x, y, x + side, y + side), fill=COLOURS[colour])
    return image


def shapes_dataset(count, seed=0, size=32):
    """Conversations asking for the colour of the shape in a generated image (answer: one word)."""
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        samples.append({
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"what colour is the {shape}?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": colour}]},
            ],
            "images": [shape_image(colour, shape, size=size, seed=seed * 100_003 + index)],
            "answer": colour,
        })
    return samples


def corpus():
    """Text the demo tokenizer is trained on."""
    words = [f"what colour is the {s}?" for s in SHAPES] + list(COLOURS) + [
        "the quick brown fox jumps over the lazy dog", "a picture of a shape on a white background",
        "describe the image", "user", "assistant",
    ]
    return words * 20


# The one tiny-model factory (tests, examples, benchmarks and the miniature pass their own sizes). Its defaults are the
# test suite's: 8 blocks (interval 4 -> replicated blocks 3 and 7), a 16x16 image in 4x4 patches (4 tokens per tile).
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=96, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False,
)
TINY_VISION = dict(
    hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4,
    vision_use_head=False,
)
BASE_KINDS = ("qwen2", "llama")


def tiny_text_config(kind="qwen2", **overrides):
    """A small decoder config (``BASE_KINDS``); ``overrides`` set any field."""
    from transformers import LlamaConfig, Qwen2Config

    if kind not in BASE_KINDS:
        raise ValueError(f"kind must be one of {BASE_KINDS}, got {kind!r}")
    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[kind]
    return config_class(**{**TINY_TEXT, **overrides})


def tiny_vision_config(**overrides):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**{**TINY_VISION, **overrides})


def tiny_base(kind="qwen2", seed=0, **overrides):
    """A randomly initialised base LLM (the base's own CausalLM class), seeded, in evaluation mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_text_config(kind, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_vision_tower(seed=0, **overrides):
    """A randomly initialised SigLIP vision tower, seeded, in evaluation mode."""
    from transformers import SiglipVisionModel

    config = tiny_vision_config(**overrides)
    torch.manual_seed(seed)
    return SiglipVisionModel(config).eval()


def tiny_models(tokenizer, seed=0, hidden_size=64, num_layers=8, image_size=32, patch_size=8):
    """A tiny Qwen2-style base LLM sized for ``tokenizer`` and a tiny SigLIP vision tower (the demo's and examples')."""
    base = tiny_base(
        "qwen2", seed, hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
        vocab_size=len(tokenizer) + 8, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    vision = tiny_vision_tower(seed, hidden_size=32, intermediate_size=64, image_size=image_size, patch_size=patch_size)
    return base, vision


def compose_tiny(seed=0, max_tiles=1):
    """A freshly composed tiny GenieBlue (training starting point) and its processor."""
    from .modeling.modeling_genieblue import GenieBlueForConditionalGeneration
    from .modeling.processing_genieblue import GenieBlueProcessor

    tokenizer = build_bpe_tokenizer(corpus())
    base, vision = tiny_models(tokenizer, seed=seed)
    model = GenieBlueForConditionalGeneration.from_base(base, vision)
    return model, GenieBlueProcessor.for_model(model.config, tokenizer, max_tiles=max_tiles)
