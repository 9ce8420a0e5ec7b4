"""Mixed precision as in the paper (torchao): the text path stays the base quantized the same way, storage shrinks,
and no CPU-specific kernel is reached."""


import pytest
import torch

from genieblue_hf.quantization import is_quantized, quantize_language_model, quantize_like_paper, storage_bytes

from genieblue_hf.testing import base_twin, image_row, perturb_multimodal, text_batch, tiny_base, tiny_genieblue, tiny_vision_config



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


def test_quantization_report_runs(run_benchmark):
    report = run_benchmark("bench_quantization.py", "--size", "tiny", "--prompts", "2", "--steps", "3")
    assert report["text_path_equals_quantized_base"] is True
    assert report["storage_mb"]["language_model"]["ratio"] < 1
    assert 0 <= report["multimodal_path"]["greedy_agreement"] <= 1


def _saved(tmp_path):
    # widths in multiples of 64: bitsandbytes' CPU backend packs 4-bit weights in blocks of 64 input features on CPUs
    # with AVX512-BF16 (and takes another path on the others); real models' widths always are
    from transformers import SiglipVisionModel

    from genieblue_hf import GenieBlueForConditionalGeneration

    base = tiny_base("qwen2", hidden_size=64, intermediate_size=128)
    torch.manual_seed(100)
    vision = SiglipVisionModel(tiny_vision_config(hidden_size=64, intermediate_size=128)).eval()
    model = GenieBlueForConditionalGeneration.from_base(base, vision).eval()
    perturb_multimodal(model)
    model.save_pretrained(tmp_path / "genieblue")
    model.language_model.save_pretrained(tmp_path / "base")
    return model


def test_4bit_bitsandbytes_load_keeps_the_text_path_the_4bit_base(tmp_path):
    """QLoRA's load: a published GenieBlue in 4 bits (bitsandbytes, CPU backend here); the text path is the base
    loaded alone with the same quantization; merged LoRA mode refuses 4-bit base weights with a clear error."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from genieblue_hf import GenieBlueForConditionalGeneration

    _saved(tmp_path)
    four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = GenieBlueForConditionalGeneration.from_pretrained(tmp_path / "genieblue", quantization_config=four_bit)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=four_bit).eval()
    model.eval()
    assert type(model.language_model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    text = text_batch()
    row, pixels = image_row(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=text).logits, base(input_ids=text).logits)
        assert torch.isfinite(model(input_ids=row[None], pixel_values=pixels).logits).all()
        with pytest.raises(NotImplementedError, match="merged LoRA mode needs the base weights in a dense or torchao"):
            model(input_ids=row[None], pixel_values=pixels, lora_mode="merged")
    counts = model.configure_training(stage=2)  # 4-bit weights stay frozen, float ones (LoRA, norms) train
    assert counts["lora"] > 0 and counts["language_model"] == 0


def test_torchao_load_keeps_the_text_path_the_quantized_base(tmp_path):
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from transformers import AutoModelForCausalLM, TorchAoConfig

    from genieblue_hf import GenieBlueForConditionalGeneration

    _saved(tmp_path)
    # transformers 5.0 re-initialises a torchao-quantized SigLIP on load and fails (SigLIP loaded alone too); later
    # releases do not. The vision tower stays unquantized here so the test runs on every release declared.
    config = TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(8)),
                           modules_to_not_convert=["vision_tower"])
    model = GenieBlueForConditionalGeneration.from_pretrained(tmp_path / "genieblue", quantization_config=config)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config).eval()
    model.eval()
    assert is_quantized(model.language_model.model.layers[0].mlp.up_proj.weight)
    text = text_batch()
    row, pixels = image_row(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=text).logits, base(input_ids=text).logits)
        unmerged = model(input_ids=row[None], pixel_values=pixels).logits
        merged = model(input_ids=row[None], pixel_values=pixels, lora_mode="merged").logits
    assert torch.allclose(unmerged, merged, atol=1e-4)
