import pytest
from transformers import AutoConfig, PreTrainedConfig

from genieblue_hf import GenieBlueConfig

from genieblue_hf.testing import tiny_text_config, tiny_vision_config


def make(**overrides):
    return GenieBlueConfig(text_config=tiny_text_config(), vision_config=tiny_vision_config(), **overrides)


def test_defaults_follow_the_paper():
    config = GenieBlueConfig(
        text_config=tiny_text_config(num_hidden_layers=36), vision_config=tiny_vision_config()
    )
    assert config.replication_strategy == "skip" and config.replication_interval == 4
    assert config.replicated_layers == [3, 7, 11, 15, 19, 23, 27, 31, 35]  # 9 blocks for 36 layers
    assert config.lora_layers == [i for i in range(36) if i % 4 != 3]
    assert config.lora_rank == 8
    assert set(config.lora_target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert config.image_token_id == config.text_config.vocab_size  # outside the base vocabulary
    assert config.image_tokens_per_tile == 4


@pytest.mark.parametrize(
    "strategy, expected",
    [("skip", [3, 7]), ("pre", [0, 1]), ("post", [6, 7]), ([0, 5], [0, 5])],
)
def test_replication_strategies(strategy, expected):
    assert make(replication_strategy=strategy).replicated_layers == expected


def test_lora_scaling_plain_and_rslora():
    assert make(lora_rank=8, lora_alpha=16).lora_scaling == 2.0
    assert make(lora_rank=16, lora_alpha=8, use_rslora=True).lora_scaling == 2.0


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(replication_strategy=[0, 8]), "replication_strategy"),
        (dict(replication_strategy=[1, 1]), "replication_strategy"),
        (dict(replication_strategy="middle"), "replication_strategy"),
        (dict(replication_interval=0), "replication_interval"),
        (dict(replication_interval=9), "selects no layer"),
        (dict(lora_rank=0), "lora_rank"),
        (dict(lora_rank=-2), "lora_rank"),
        (dict(lora_alpha=0), "lora_alpha"),
        (dict(lora_dropout=1.5), "lora_dropout"),
        (dict(lora_target_modules=[]), "lora_target_modules"),
        (dict(lora_execution_mode="fused"), "lora_execution_mode"),
        (dict(image_token_id=-1), "image_token_id"),
        (dict(downsample_ratio=5), "downsample_ratio=5 is larger than the vision patch grid"),
        (dict(downsample_ratio=0), "downsample_ratio"),
        (dict(projector_layernorm="yes"), "projector_layernorm"),
        (dict(lora_target_modules="q_proj"), "lora_target_modules"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        make(**overrides)


def test_sub_configs_missing_fields_are_named():
    with pytest.raises(ValueError, match="text_config is missing the field `hidden_size`"):
        GenieBlueConfig(text_config=PreTrainedConfig(), vision_config=tiny_vision_config())
    with pytest.raises(ValueError, match="vision_config is missing the field `image_size`"):
        GenieBlueConfig(text_config=tiny_text_config(), vision_config=PreTrainedConfig(hidden_size=8))
    with pytest.raises(ValueError, match="text_config must be"):
        GenieBlueConfig(text_config=42, vision_config=tiny_vision_config())
    with pytest.raises(ValueError, match="model_type"):
        GenieBlueConfig(text_config={"model_type": "no-such-model"}, vision_config=tiny_vision_config())


GENIEBLUE_FIELDS = (
    "replication_strategy", "replication_interval", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules",
    "use_rslora", "lora_execution_mode", "image_token_id", "projector_hidden_act", "projector_layernorm",
    "downsample_ratio", "vision_feature_layer",
)


def assert_same_config(a, b):
    for field in GENIEBLUE_FIELDS:
        assert getattr(a, field) == getattr(b, field), field
    assert a.text_config.to_diff_dict() == b.text_config.to_diff_dict()
    assert a.vision_config.to_diff_dict() == b.vision_config.to_diff_dict()
    assert type(a.text_config) is type(b.text_config)


def test_round_trips(tmp_path):
    config = make(replication_strategy=[2, 5], lora_rank=4, use_rslora=True, lora_execution_mode="merged")
    assert_same_config(config, GenieBlueConfig.from_dict(config.to_dict()))
    config.save_pretrained(tmp_path)
    assert_same_config(config, GenieBlueConfig.from_pretrained(tmp_path))
    assert_same_config(config, AutoConfig.from_pretrained(tmp_path))


def test_dense_strategy_has_no_replicated_blocks_and_no_lora():
    config = make(replication_strategy="dense")
    assert config.is_dense and config.replicated_layers == [] and config.lora_layers == []
    assert not make().is_dense


def test_empty_strategy_is_lora_on_every_block():
    config = make(replication_strategy=[])
    assert config.replicated_layers == [] and not config.is_dense
    assert config.lora_layers == list(range(config.text_config.num_hidden_layers))


def test_odd_patch_grid_is_padded_to_the_merge_window():
    """so400m-patch14-384 in miniature: a 27x27 patch grid pads to 28x28 and merges 2x2 into 14x14 = 196 tokens."""
    vision = tiny_vision_config()
    vision.image_size, vision.patch_size = 108, 4
    config = GenieBlueConfig(text_config=tiny_text_config(), vision_config=vision)
    assert config.vision_grid_size == 27 and config.merged_grid_size == 14 and config.image_tokens_per_tile == 196


def test_saved_configs_keep_projector_layernorm_and_old_ones_read_false(tmp_path):
    import json

    assert make().projector_layernorm is True  # the paper's (InternVL) projector is the default
    make().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["projector_layernorm"] is True  # written even though it is the default
    del saved["projector_layernorm"]  # a config from before the field existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert GenieBlueConfig.from_pretrained(tmp_path).projector_layernorm is False


def test_another_models_config_is_refused(tmp_path):
    tiny_text_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="this is a 'qwen2' config, not a GenieBlue config"):
        GenieBlueConfig.from_pretrained(tmp_path)


def test_naflex_vision_tower_is_refused_clearly():
    from transformers import Siglip2VisionConfig

    with pytest.raises(ValueError, match="NaFlex tower"):
        GenieBlueConfig(text_config=tiny_text_config(), vision_config=Siglip2VisionConfig(hidden_size=24))


def test_siglip2_fixed_resolution_tower_is_a_siglip_config():
    """Fixed-resolution SigLIP2 checkpoints (siglip2-so400m-patch14-384 and kin) use SigLIP's classes."""
    vision = tiny_vision_config()
    vision.image_size, vision.patch_size = 64, 16
    config = GenieBlueConfig(text_config=tiny_text_config(), vision_config=vision)
    assert config.image_tokens_per_tile == 4


QWEN25_3B = dict(
    hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
    vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
)
SO400M_384 = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
    patch_size=14,
)


def test_defaults_reproduce_the_papers_table5_parameter_counts():
    """Table 5 (Qwen2.5-3B + SigLIP-so400m-patch14-384): GenieBlue-Skip trains 1146.79M, full fine-tuning 3527.81M."""
    import torch
    from transformers import Qwen2Config, SiglipVisionConfig

    from genieblue_hf import GenieBlueForConditionalGeneration

    config = GenieBlueConfig(text_config=Qwen2Config(**QWEN25_3B), vision_config=SiglipVisionConfig(**SO400M_384))
    assert config.image_tokens_per_tile == 196
    with torch.device("meta"):
        model = GenieBlueForConditionalGeneration(config)
    stage2 = model.configure_training(stage=2)
    genieblue_skip = sum(v for k, v in stage2.items() if k != "language_model")
    # the output embeddings are tied to the input ones (some releases tie them only once weights are materialised)
    language_model = sum(p.numel() for name, p in model.language_model.named_parameters() if name != "lm_head.weight")
    full_finetune = language_model + sum(
        p.numel() for p in (*model.vision_tower.parameters(), *model.multi_modal_projector.parameters())
    )
    assert abs(genieblue_skip / 1e6 - 1146.79) < 0.01, genieblue_skip
    assert abs(full_finetune / 1e6 - 3527.81) < 0.01, full_finetune
