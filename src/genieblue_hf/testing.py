"""Helpers for testing GenieBlue models and code built on them (the package's own tests use them): tiny models from
``synthetic``'s factory, the base's independent twin for bit-exactness checks, inputs, and locally built tokenizers.
Nothing is downloaded."""

import hashlib
import shutil

import torch

from .modeling.modeling_genieblue import GenieBlueForConditionalGeneration
from .synthetic import TINY_TEXT, TINY_VISION, build_bpe_tokenizer, tiny_base, tiny_text_config, tiny_vision_config
from .synthetic import tiny_vision_tower


VOCAB = TINY_TEXT["vocab_size"]
NUM_LAYERS = TINY_TEXT["num_hidden_layers"]
IMAGE_SIZE = TINY_VISION["image_size"]
TOKENS_PER_TILE = (IMAGE_SIZE // TINY_VISION["patch_size"] // 2) ** 2  # 2x2 token merging
TOKENIZER_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a picture of a red square and a blue circle on a white background",
    "how many shapes are there in the image? there are three shapes",
    "describe the receipt and the phone screenshot in detail please",
] * 40


@torch.no_grad()
def perturb_multimodal(model, seed=1):
    """Give the multimodal path weights of its own, so a wrong route shows up in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.replicated_layers.parameters():
        param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)
    for name, param in model.lora.named_parameters():
        if name.endswith("lora_B"):
            param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)


def tiny_genieblue(kind="qwen2", seed=0, perturb=True, dtype=torch.float32, text_config=None, **overrides):
    """A tiny GenieBlue over ``tiny_base(kind, seed, **text_config)``; ``overrides`` go to its config."""
    base = tiny_base(kind, seed, **(text_config or {}))
    vision = tiny_vision_tower(seed + 100)
    model = GenieBlueForConditionalGeneration.from_base(base, vision, **overrides).eval()
    if perturb:
        perturb_multimodal(model)
    return model.to(dtype)


def model_for(tokenizer, kind="qwen2"):
    """A tiny GenieBlue whose vocabulary covers the tokenizer (the processor's marker stays outside it)."""
    model = GenieBlueForConditionalGeneration.from_base(
        tiny_base(kind, vocab_size=len(tokenizer) + 4), tiny_vision_tower()
    ).eval()
    perturb_multimodal(model)
    return model


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
    """SHA-256 over a module's state dict (names and bytes): equal hashes, equal weights."""
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


def colour_image(width, height, seed=0):
    """A PIL image of random colours."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def bpe_tokenizer():
    """Byte-level BPE with ChatML special tokens, as Qwen2 tokenizers are."""
    return build_bpe_tokenizer(TOKENIZER_CORPUS)


def sentencepiece_tokenizer(workdir):
    """A Llama tokenizer loaded from a sentencepiece model trained in ``workdir`` (no pad token, like Llama's)."""
    import sentencepiece
    from transformers import LlamaTokenizer

    corpus = workdir / "corpus.txt"
    corpus.write_text("\n".join(TOKENIZER_CORPUS))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(workdir / "sp"), vocab_size=150, model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2,
    )
    folder = workdir / "llama-tokenizer"
    folder.mkdir()
    shutil.copy(workdir / "sp.model", folder / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(folder)


# A text-only and an image prompt, as Hub-folder tests send them.
HUB_PROMPTS = ("the quick brown fox", "<|im_start|>user\n<image>\ndescribe the picture<|im_end|>\n<|im_start|>assistant\n")


def reference_generations(model, processor, image):
    """Five greedy tokens for each of ``HUB_PROMPTS`` (the image prompt with ``image``): what a loaded folder must give."""
    text = processor(text=HUB_PROMPTS[0])
    multimodal = processor(text=HUB_PROMPTS[1], images=[image])
    return {
        "text": model.generate(**text, max_new_tokens=5, do_sample=False)[0].tolist(),
        "image": model.generate(**multimodal, max_new_tokens=5, do_sample=False)[0].tolist(),
    }


def run_isolated(script, *args, env_extra=None, cwd=None):
    """Run ``python -c script *args`` in a fresh interpreter without HF_*/PYTHONPATH settings (plus ``env_extra``);
    returns the JSON it printed after ``RESULT`` on its last such line."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH"))}
    env.update(env_extra or {})
    completed = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = [l for l in completed.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def populate_hub_cache(folder, repo_id, hf_home):
    """Lay ``folder`` out in a Hugging Face cache the way the Hub client does, as revision ``main``."""
    from pathlib import Path

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)  # no trailing newline, as the Hub client writes it


__all__ = [
    "VOCAB", "NUM_LAYERS", "IMAGE_SIZE", "TOKENS_PER_TILE", "tiny_text_config", "tiny_vision_config", "tiny_base",
    "tiny_vision_tower", "tiny_genieblue", "perturb_multimodal", "model_for", "base_twin", "state_hash",
    "text_batch", "image_row", "left_pad", "colour_image", "bpe_tokenizer", "sentencepiece_tokenizer",
    "HUB_PROMPTS", "reference_generations", "run_isolated", "populate_hub_cache",
]
