"""genieblue export-dense: the multimodal path as a plain model, with equal outputs."""

import torch
from transformers import AutoModelForCausalLM

from genieblue_hf import GenieBlueForConditionalGeneration
from genieblue_hf.cli import main

from genieblue_hf.testing import image_row, text_batch, tiny_genieblue


def test_dense_export_equals_the_multimodal_path(tmp_path):
    model = tiny_genieblue("qwen2")
    model.save_pretrained(tmp_path / "model")
    assert main(["export-dense", str(tmp_path / "model"), str(tmp_path / "dense")]) == 0
    dense = GenieBlueForConditionalGeneration.from_pretrained(tmp_path / "dense").eval()
    assert dense.config.is_dense and len(dense.replicated_layers) == 0 and len(dense.lora) == 0
    assert type(dense.language_model) is type(model.language_model)
    row, pixels = image_row(model)
    text = text_batch()
    with torch.no_grad():
        assert torch.allclose(dense(input_ids=row[None], pixel_values=pixels).logits,
                              model(input_ids=row[None], pixel_values=pixels).logits, atol=1e-5)
        # a dense model's text requests run the dense LM too: it is a conventional MLLM, not GenieBlue
        assert torch.allclose(dense(input_ids=text).logits, model(input_ids=text, route="multimodal").logits, atol=1e-5)
    size = lambda m: sum(p.numel() for p in m.parameters())
    assert size(dense) == size(model) - size(model.replicated_layers) - size(model.lora)


def test_language_model_only_export_is_the_base_class(tmp_path):
    model = tiny_genieblue("llama")
    assert main(["export-dense", "--language-model-only", str(_saved(model, tmp_path)), str(tmp_path / "lm")]) == 0
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    assert type(lm).__name__ == "LlamaForCausalLM"
    text = text_batch()
    with torch.no_grad():
        assert torch.allclose(lm(input_ids=text).logits, model(input_ids=text, route="multimodal").logits, atol=1e-5)
    assert main(["export-dense", str(tmp_path / "model"), str(tmp_path / "lm")]) == 1  # exists: refused


def _saved(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"
