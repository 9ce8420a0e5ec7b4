"""Mixed precision as in the paper: the text path stays the base (quantized the same way), storage shrinks."""

import sys
from pathlib import Path

import torch

from genieblue_hf.quantization import quantize_language_model, quantize_like_paper, storage_bytes

from conftest import base_twin, image_row, text_batch, tiny_genieblue

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


def test_text_path_is_the_base_quantized_the_same_way():
    model = tiny_genieblue("qwen2", dtype=torch.bfloat16)
    twin = base_twin(model)
    bf16_bytes = storage_bytes(model)
    quantize_like_paper(model)
    quantize_language_model(twin)
    assert type(model.language_model.model.layers[0].self_attn.q_proj).__name__ == "QLinear"
    assert type(model.language_model.lm_head).__name__ == "Linear"  # kept in 16 bit
    assert storage_bytes(model) < 0.6 * bf16_bytes
    text = text_batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=text).logits, twin(input_ids=text).logits)
    assert torch.equal(model.generate(input_ids=text, max_new_tokens=5, do_sample=False),
                       twin.generate(input_ids=text, max_new_tokens=5, do_sample=False))
    row, pixels = image_row(model)
    with torch.no_grad():
        unmerged = model(input_ids=row[None], pixel_values=pixels).logits
        merged = model(input_ids=row[None], pixel_values=pixels, lora_mode="merged").logits
    assert torch.isfinite(unmerged).all() and torch.allclose(unmerged.float(), merged.float(), atol=0.05)


def test_quantization_report_runs():
    import bench_quantization

    report = bench_quantization.main(["--size", "tiny", "--prompts", "2", "--steps", "3"])
    assert report["text_path_equals_quantized_base"] is True
    assert report["storage_mb"]["language_model"]["ratio"] < 1
    assert 0 <= report["multimodal_path"]["greedy_agreement"] <= 1
