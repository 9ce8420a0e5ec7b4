"""A tiny published GenieBlue, its base and its dense export, shaped for vLLM's CPU kernels, and the engine settings
the vLLM tests and benchmark share. Built with ``genieblue_hf.synthetic``'s tiny-model factory; needs no vLLM to build."""

import json
from pathlib import Path

import torch

# vLLM's CPU attention takes head sizes of 32 and up; SigLIP at 64 wide with one head, Qwen2 at 128 with two.
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=1024, tie_word_embeddings=False)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, image_size=32,
              patch_size=8, vision_use_head=False)


def build(root, seed=0, text=None, vision=None):
    """``root/genieblue`` (published, with multimodal_lora/), ``root/base`` (the base alone) and
    ``root/dense`` (``genieblue export-dense``: the multimodal path as one dense VLM); returns the folders."""
    from .. import GenieBlueForConditionalGeneration, GenieBlueProcessor
    from ..cli import main
    from ..synthetic import build_bpe_tokenizer, corpus, tiny_base, tiny_vision_tower

    root = Path(root)
    tokenizer = build_bpe_tokenizer(corpus())
    base = tiny_base("qwen2", seed, vocab_size=len(tokenizer) + 16, pad_token_id=tokenizer.pad_token_id,
                     eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **(text or TEXT))
    with torch.no_grad():  # a sharper base than N(0, 0.02), so greedy tokens are not ties
        for param in base.parameters():
            if param.ndim > 1:
                param.normal_(0, 0.2)
    vision = tiny_vision_tower(seed, **(vision or VISION))
    model = GenieBlueForConditionalGeneration.from_base(base, vision).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.replicated_layers.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
        for name, param in model.lora.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    processor = GenieBlueProcessor.for_model(model.config, tokenizer, max_tiles=2)
    model.save_pretrained(root / "saved")
    processor.save_pretrained(root / "saved")
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    if main(["publish", str(root / "saved"), str(root / "genieblue"), "--repo-id", "org/tiny"]) != 0:
        raise RuntimeError("publish failed")
    if main(["export-dense", str(root / "genieblue"), str(root / "dense")]) != 0:
        raise RuntimeError("export-dense failed")
    return {name: root / name for name in ("genieblue", "base", "dense")}


def engine_kwargs(folder, **overrides):
    """The settings every engine in the tests shares (fp32, small CPU memory share, eager)."""
    kwargs = dict(model=str(folder), dtype="float32", gpu_memory_utilization=0.1, max_model_len=512,
                  enforce_eager=True, seed=0, max_num_seqs=8)
    kwargs.update(overrides)
    return kwargs


def genieblue_kwargs(folder, **overrides):
    folder = Path(folder)
    rank = json.loads((folder / "config.json").read_text())["lora_rank"]
    return engine_kwargs(folder, enable_lora=True, max_lora_rank=max(8, rank), max_loras=2,
                         default_mm_loras={"image": str(folder / "multimodal_lora")}, **overrides)

