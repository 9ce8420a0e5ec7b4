"""Every decoder family GenieBlue claims: composed, saved and reloaded, both paths bit for bit.

For each family a tiny random base is composed with a SigLIP tower and given multimodal weights of its own; then:
the text path equals the base's own class (before and after reload, and the base saved and loaded on its own), and
the multimodal path after reload equals the one before, with every non-persistent buffer restored.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, SiglipVisionModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from genieblue_hf import GenieBlueForConditionalGeneration

from genieblue_hf.testing import VOCAB, image_row, perturb_multimodal, text_batch, tiny_vision_config


COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MAMBA = dict(mamba_d_state=8, mamba_n_heads=4, mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=16)
# model_type: (config overrides, lora_target_modules or None for the default)
FAMILIES = {
    "qwen2": ({}, None),
    "qwen3": (dict(head_dim=8), None),
    "qwen3_moe": (dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16), None),
    "llama": ({}, None),
    "mistral": ({}, None),
    "gemma2": (dict(head_dim=8), None),
    "gemma3_text": (dict(head_dim=8), None),
    "gemma3n_text": (dict(head_dim=8, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, laurel_rank=4,
                          altup_num_inputs=2, num_kv_shared_layers=0, activation_sparsity_pattern=[0.0] * 8), None),
    "phi3": ({}, None),
    "olmo2": ({}, None),
    "granite": ({}, None),
    "smollm3": ({}, None),
    "cohere": ({}, None),
    "glm4": (dict(head_dim=8), None),
    "gpt_neox": (dict(num_key_value_heads=None), "all-linear"),
    "falcon": (dict(num_key_value_heads=None, num_kv_heads=2, new_decoder_architecture=True), "all-linear"),
    "falcon_h1": (dict(head_dim=8, mamba_d_ssm=32, mamba_d_head=8, **MAMBA), None),
    "bamba": (dict(mamba_d_head=16, attn_layer_indices=[1, 5], **MAMBA), None),  # hybrid: Mamba and attention
    "lfm2": ({}, None),  # hybrid: short convolutions and attention
}


def tiny_family_base(model_type, overrides):
    kwargs = {**COMMON, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_round_trip_keeps_both_paths(model_type, tmp_path):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers release has no {model_type}")
    overrides, targets = FAMILIES[model_type]
    base = tiny_family_base(model_type, overrides)
    extra = {"lora_target_modules": targets} if targets else {}
    model = GenieBlueForConditionalGeneration.from_base(base, SiglipVisionModel(tiny_vision_config()).eval(), **extra)
    model.eval()
    perturb_multimodal(model)
    assert sum(bool(tree.adapters()) for tree in model.lora.values()) > 0
    text = text_batch(batch=1, length=10)
    row, pixels = image_row(model)
    with torch.no_grad():
        text_before = model(input_ids=text).logits
        image_before = model(input_ids=row[None], pixel_values=pixels).logits
        assert torch.equal(text_before, base(input_ids=text).logits)
    model.save_pretrained(tmp_path / "genieblue")
    base.save_pretrained(tmp_path / "base")
    reloaded = GenieBlueForConditionalGeneration.from_pretrained(tmp_path / "genieblue").eval()
    base_alone = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    before, after = dict(model.named_buffers()), dict(reloaded.named_buffers())
    assert [name for name in before if not torch.equal(before[name], after[name])] == []
    with torch.no_grad():
        text_after = reloaded(input_ids=text).logits
        image_after = reloaded(input_ids=row[None], pixel_values=pixels).logits
        assert torch.isfinite(text_after).all()
        assert torch.equal(text_after, text_before)
        assert torch.equal(text_after, base_alone(input_ids=text).logits)
        assert torch.equal(image_after, image_before)
        assert not torch.equal(image_after[:, :3], reloaded(input_ids=row[None, :3]).logits)  # the paths differ
    greedy = dict(max_new_tokens=3, do_sample=False)
    assert torch.equal(reloaded.generate(input_ids=text, **greedy), base_alone.generate(input_ids=text, **greedy))
    generated = reloaded.generate(input_ids=row[None], pixel_values=pixels, **greedy)
    assert generated.shape == (1, len(row) + 3)


def test_default_targets_on_a_decoder_with_other_projection_names_say_what_to_pass():
    base = tiny_family_base("falcon", FAMILIES["falcon"][0])
    with pytest.raises(ValueError, match=r"linears of block 0 are \['dense'.*'query_key_value'\].*'all-linear'"):
        GenieBlueForConditionalGeneration.from_base(base, SiglipVisionModel(tiny_vision_config()))
