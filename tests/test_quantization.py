"""Mixed precision as in the paper (torchao): the text path stays the base quantized the same way, storage shrinks,
and no CPU-specific kernel is reached."""

import sys
from pathlib import Path

import pytest
import torch

from genieblue_hf.quantization import is_quantized, quantize_language_model, quantize_like_paper, storage_bytes

from conftest import base_twin, image_row, text_batch, tiny_genieblue

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


def test_text_path_is_the_base_quantized_the_same_way():
    model = tiny_genieblue("qwen2", dtype=torch.bfloat16)
    twin = base_twin(model)
    before = {part: storage_bytes(getattr(model, part)) for part in ("language_model", "replicated_layers", "lora")}
    quantize_like_paper(model)
    quantize_language_model(twin)
    assert type(model.language_model.model.layers[0].self_attn.q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert not is_quantized(model.language_model.lm_head.weight)  # kept in 16 bit
    assert all(is_quantized(m.weight) for n, m in model.vision_tower.named_modules() if n.endswith("mlp.fc1"))
    assert is_quantized(model.lora["0"].self_attn.q_proj.lora_A)
    # int4 values are stored one per byte in memory (torchao's unpacked layout) plus group scales: ~0.6 of bf16
    assert storage_bytes(model.replicated_layers) < 0.65 * before["replicated_layers"]
    assert storage_bytes(model.lora) < 0.65 * before["lora"]
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


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("in_features", [24, 36, 64])
def test_widths_not_divisible_by_32_run_in_any_process(in_features, bits):
    """The shapes that crashed optimum-quanto's int8 kernel on some CPUs (in_features % 32 != 0) run here."""
    from torch import nn

    from genieblue_hf.quantization import _quantize_linears

    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(in_features, 32)).to(torch.bfloat16)
    x = torch.randn(5, in_features, dtype=torch.bfloat16)
    reference = linear(x)
    _quantize_linears(linear, bits)
    assert is_quantized(linear[0].weight)
    error = (linear(x) - reference).abs().max().item()
    assert error < (0.05 if bits == 8 else 0.3), error


def test_quantization_report_runs():
    import bench_quantization

    report = bench_quantization.main(["--size", "tiny", "--prompts", "2", "--steps", "3"])
    assert report["text_path_equals_quantized_base"] is True
    assert report["storage_mb"]["language_model"]["ratio"] < 1
    assert 0 <= report["multimodal_path"]["greedy_agreement"] <= 1
