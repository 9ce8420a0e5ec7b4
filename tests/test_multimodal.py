"""The multimodal path: features, sticky routing through generate, mixed batches, LoRA modes, training."""

import pytest
import torch

from genieblue_hf import GenieBlueForConditionalGeneration

from genieblue_hf.testing import (
    TOKENS_PER_TILE, base_twin, image_row, left_pad, state_hash, text_batch, tiny_base, tiny_genieblue,
)


def greedy_without_cache(model, input_ids, pixel_values, steps):
    """Reference decoding: recompute the whole sequence (images included) at every step."""
    sequence = input_ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=sequence, pixel_values=pixel_values, use_cache=False).logits
            sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=-1)
    return sequence


class RouteSpy:
    """Counts which path each forward of a model runs."""

    def __init__(self, model, monkeypatch):
        self.calls = []
        for name in ("_text_forward", "_multimodal_forward"):
            original = getattr(model, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(model, name, spy)


def test_from_base_multimodal_path_starts_equal_to_base_on_text(kind):
    model = tiny_genieblue(kind, perturb=False)
    twin = base_twin(model)
    input_ids = text_batch()
    with torch.no_grad():
        multimodal = model(input_ids=input_ids, route="multimodal").logits
    assert torch.equal(multimodal, twin(input_ids=input_ids).logits)
    for tree in model.lora.values():
        assert all(torch.count_nonzero(a.lora_B) == 0 for a in tree.adapters().values())
    for index, replica in model.replicated_layers.items():
        base_layer = model.language_model.model.layers[int(index)]
        assert replica is not base_layer
        assert all(torch.equal(a, b) for a, b in zip(replica.state_dict().values(), base_layer.state_dict().values()))


def test_from_base_accepts_local_paths(tmp_path):
    base = tiny_base("llama")
    vision = tiny_genieblue("llama").vision_tower
    base.save_pretrained(tmp_path / "llm")
    vision.save_pretrained(tmp_path / "vit")
    model = GenieBlueForConditionalGeneration.from_base(tmp_path / "llm", str(tmp_path / "vit"), lora_rank=4)
    assert type(model.language_model).__name__ == "LlamaForCausalLM"
    assert model.config.lora_rank == 4
    assert state_hash(model.language_model) == state_hash(base)


def test_multimodal_generate_with_cache_equals_recompute_and_stays_on_its_path(kind, monkeypatch):
    model = tiny_genieblue(kind)
    row, pixels = image_row(model, num_images=2)
    expected = greedy_without_cache(model, row[None], pixels, steps=6)
    spy = RouteSpy(model, monkeypatch)
    generated = model.generate(input_ids=row[None], pixel_values=pixels, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, expected)
    assert spy.calls == ["_multimodal_forward"] * 6  # prefill + 5 decode steps, none on the text path
    # the same prompt through the base gives other tokens, so a wrong route could not hide
    text_only = row[None].masked_fill(row[None] == model.config.image_token_id, 5)
    assert not torch.equal(
        model.generate(input_ids=text_only, max_new_tokens=6, do_sample=False)[:, -6:], generated[:, -6:]
    )


def test_generate_never_emits_the_image_token():
    model = tiny_genieblue("qwen2", image_token_id=7)  # a reserved id inside the base vocabulary
    row, pixels = image_row(model)
    with torch.no_grad():
        logits = model(input_ids=row[None], pixel_values=pixels).logits
    assert torch.isneginf(logits[..., 7]).all()
    generated = model.generate(input_ids=row[None], pixel_values=pixels, max_new_tokens=8, do_sample=False)
    assert (generated[0, len(row):] != 7).all()


def mixed_batch(model):
    text = text_batch(batch=1, length=9, seed=3)[0]
    one, one_px = image_row(model, num_images=1, seed=4)
    two, two_px = image_row(model, num_images=2, seed=5)
    input_ids, attention_mask = left_pad([one, text, two])
    return [one, text, two], [one_px, None, two_px], input_ids, attention_mask, torch.cat([one_px, two_px])


def test_mixed_batch_rows_equal_their_single_runs(kind):
    model = tiny_genieblue(kind)
    twin = base_twin(model)
    rows, row_pixels, input_ids, attention_mask, pixels = mixed_batch(model)
    with torch.no_grad():
        mixed = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)
        assert mixed.multimodal_rows.tolist() == [True, False, True]
        # text row: the base itself on that row, bit for bit
        text_alone = twin(input_ids=input_ids[1:2], attention_mask=attention_mask[1:2]).logits
        assert torch.equal(mixed.logits[1:2], text_alone)
        for i in (0, 2):
            alone = model(input_ids=input_ids[i : i + 1], attention_mask=attention_mask[i : i + 1],
                          pixel_values=row_pixels[i]).logits
            assert torch.allclose(mixed.logits[i : i + 1], alone, atol=1e-5)


def test_mixed_batch_with_as_many_positions_as_rows():
    """Per-position arguments (cache_position, logits_to_keep) are never split by row, even when a mixed batch has as
    many rows as positions."""
    model = tiny_genieblue("qwen2")
    image, pixels = image_row(model, num_images=1, prefix=1, suffix=1)
    length = image.shape[0]
    text = text_batch(batch=length - 1, length=length, seed=6)
    input_ids = torch.cat([image[None], text])  # `length` rows of `length` positions, row 0 on the multimodal path
    positions = torch.arange(length)
    with torch.no_grad():
        full = model(input_ids=input_ids, pixel_values=pixels).logits
        kept = model(input_ids=input_ids, pixel_values=pixels, cache_position=positions, logits_to_keep=length).logits
        last = model(input_ids=input_ids, pixel_values=pixels, cache_position=positions, logits_to_keep=1).logits
    assert torch.equal(kept, full)
    assert torch.allclose(last, full[:, -1:], atol=1e-6)  # one position: another matmul shape, same rows


def test_mixed_batch_generate_equals_rows_alone(kind):
    model = tiny_genieblue(kind)
    twin = base_twin(model)
    rows, row_pixels, input_ids, attention_mask, pixels = mixed_batch(model)
    generated = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, max_new_tokens=6, do_sample=False
    )
    text_alone = twin.generate(
        input_ids=input_ids[1:2], attention_mask=attention_mask[1:2], max_new_tokens=6, do_sample=False
    )
    assert torch.equal(generated[1:2], text_alone)
    for i in (0, 2):
        alone = model.generate(
            input_ids=input_ids[i : i + 1], attention_mask=attention_mask[i : i + 1], pixel_values=row_pixels[i],
            max_new_tokens=6, do_sample=False,
        )
        assert torch.equal(generated[i : i + 1], alone)


def test_mixed_batch_loss_covers_both_paths():
    model = tiny_genieblue("qwen2")
    rows, _, input_ids, attention_mask, pixels = mixed_batch(model)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, labels=labels)
        manual = model.language_model.loss_function(
            logits=out.logits, labels=labels.masked_fill(input_ids == model.config.image_token_id, -100),
            vocab_size=model.config.text_config.vocab_size,
        )
    assert torch.isfinite(out.loss) and torch.equal(out.loss, manual)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_lora_modes_agree_and_never_write_the_base(dtype, atol):
    model = tiny_genieblue("qwen2", dtype=dtype)
    base_hash = state_hash(model.language_model)
    row, pixels = image_row(model)
    with torch.no_grad():
        unmerged = model(input_ids=row[None], pixel_values=pixels, lora_mode="unmerged").logits
        merged = model(input_ids=row[None], pixel_values=pixels, lora_mode="merged").logits
        model.set_lora_execution_mode("merged")  # the setting; lora_mode= is its per-call override
        merged_setting = model(input_ids=row[None], pixel_values=pixels).logits
        assert torch.equal(model(input_ids=row[None], pixel_values=pixels, lora_mode="unmerged").logits, unmerged)
    assert unmerged.dtype == merged.dtype == dtype
    assert not torch.equal(unmerged, model(input_ids=row[None].masked_fill(row[None] == 96, 5)).logits)
    assert torch.allclose(unmerged.float(), merged.float(), atol=atol)
    assert torch.equal(merged, merged_setting)
    assert state_hash(model.language_model) == base_hash


def test_merged_weights_follow_lora_updates():
    model = tiny_genieblue("qwen2", lora_execution_mode="merged")
    row, pixels = image_row(model)
    with torch.no_grad():
        before = model(input_ids=row[None], pixel_values=pixels).logits
        adapter = model.lora["0"].self_attn.q_proj
        adapter.lora_B.add_(0.5)  # in place, as an optimizer step does
        after_merged = model(input_ids=row[None], pixel_values=pixels).logits
        after_unmerged = model(input_ids=row[None], pixel_values=pixels, lora_mode="unmerged").logits
    assert not torch.allclose(before, after_merged, atol=1e-4)
    assert torch.allclose(after_merged, after_unmerged, atol=1e-5)


def test_gradients_reach_only_the_multimodal_parts():
    model = tiny_genieblue("qwen2").train()
    rows, _, input_ids, attention_mask, pixels = mixed_batch(model)
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, labels=input_ids)
    out.loss.backward()
    for name, param in model.named_parameters():
        if name.startswith("language_model."):
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.requires_grad, name
    for part in ("vision_tower", "multi_modal_projector", "replicated_layers", "lora"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part + ".")]
        assert grads and all(g is not None for g in grads), part
        assert any(torch.count_nonzero(g) for g in grads), part


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        model = tiny_genieblue("qwen2").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        row, pixels = image_row(model)
        model(input_ids=row[None], pixel_values=pixels, labels=row[None]).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


def test_multimodal_hidden_states_and_eager_attention():
    model = tiny_genieblue("llama")
    model.set_attn_implementation("eager")
    row, pixels = image_row(model)
    with torch.no_grad():
        eager = model(input_ids=row[None], pixel_values=pixels, output_hidden_states=True)
        model.set_attn_implementation("sdpa")
        sdpa = model(input_ids=row[None], pixel_values=pixels, output_hidden_states=True)
    assert len(eager.hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert torch.allclose(eager.logits, sdpa.logits, atol=1e-5)
    assert eager.image_hidden_states.shape == (1, TOKENS_PER_TILE, model.config.text_config.hidden_size)


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_keeps_both_paths(tmp_path, tied):
    base = tiny_base("qwen2", tie_word_embeddings=tied)
    from transformers import SiglipVisionModel
    from genieblue_hf.testing import perturb_multimodal, tiny_vision_config

    model = GenieBlueForConditionalGeneration.from_base(base, SiglipVisionModel(tiny_vision_config())).eval()
    perturb_multimodal(model)
    row, pixels = image_row(model)
    text = text_batch()
    model.save_pretrained(tmp_path)
    reloaded = GenieBlueForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert state_hash(reloaded) == state_hash(model)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=row[None], pixel_values=pixels).logits,
                           model(input_ids=row[None], pixel_values=pixels).logits)
        assert torch.equal(reloaded(input_ids=text).logits, model(input_ids=text).logits)
    assert not any(p.requires_grad for p in reloaded.language_model.parameters())


def test_bfloat16_load_and_device_map(tmp_path):
    model = tiny_genieblue("qwen2")
    model.save_pretrained(tmp_path)
    loaded = GenieBlueForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="auto")
    assert loaded.language_model.dtype == torch.bfloat16
    twin = base_twin(loaded)
    row, pixels = image_row(loaded)
    text = text_batch()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=text).logits, twin(input_ids=text).logits)
        assert loaded(input_ids=row[None], pixel_values=pixels).logits.dtype == torch.bfloat16


# -- bad input --------------------------------------------------------------------------------------------------


def test_image_token_count_mismatch_is_named():
    model = tiny_genieblue("qwen2")
    row, pixels = image_row(model, num_images=2)
    with pytest.raises(ValueError, match=r"8 placeholder tokens.*3 tiles x 4 tokens = 12"):
        model(input_ids=row[None], pixel_values=torch.cat([pixels, pixels[:1]]))


@pytest.mark.parametrize(
    "shape, message",
    [((1, 3, 8, 8), r"shape \(num_tiles, 3, 16, 16\)"), ((3, 16, 16), "shape"), ((1, 1, 16, 16), "shape")],
)
def test_wrong_pixel_values_shape_is_named(shape, message):
    model = tiny_genieblue("qwen2")
    row, _ = image_row(model)
    with pytest.raises(ValueError, match=message):
        model(input_ids=row[None], pixel_values=torch.randn(shape))


def test_routing_errors_are_named():
    model = tiny_genieblue("qwen2")
    row, pixels = image_row(model)
    text = text_batch(batch=1)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=row[None])
    with pytest.raises(ValueError, match="no image placeholder"):
        model(input_ids=text, pixel_values=pixels)
    with pytest.raises(ValueError, match="route='text'"):
        model(input_ids=row[None], pixel_values=pixels, route="text")
    with pytest.raises(ValueError, match="route must be one of"):
        model(input_ids=text, route="vision")
    with pytest.raises(ValueError, match="lora_mode must be one of"):
        model(input_ids=row[None], pixel_values=pixels, lora_mode="fused")
    with pytest.raises(ValueError, match="pixel_values must be a floating-point"):
        model(input_ids=row[None], pixel_values=torch.zeros(1, 3, 16, 16, dtype=torch.long))
    with torch.no_grad():
        cache = model(input_ids=text, use_cache=True).past_key_values
    follow_up = torch.cat([row[None], text[:, :1]], dim=-1)
    with pytest.raises(ValueError, match="image cannot join a text-path KV cache"):
        model(input_ids=follow_up, pixel_values=pixels, past_key_values=cache)
    with pytest.raises(NotImplementedError, match="never resizes"):
        model.resize_token_embeddings(200)


def test_lora_targets_that_match_nothing_are_named():
    with pytest.raises(ValueError, match=r"match no nn.Linear in any decoder block; the linears of block 0 are \['down_proj'"):
        tiny_genieblue("qwen2", lora_target_modules=["query_key_value"])


def test_device_map_with_offloaded_blocks_keeps_both_paths(tmp_path):
    """accelerate's dispatch hooks (here: disk offload of a LoRA block and a replicated slot) reach the view too."""
    model = tiny_genieblue("qwen2")
    model.save_pretrained(tmp_path / "model")
    device_map = {name: "cpu" for name in ("vision_tower", "multi_modal_projector", "replicated_layers", "lora",
                                           "language_model.lm_head", "language_model.model.embed_tokens",
                                           "language_model.model.norm", "language_model.model.rotary_emb")}
    for i in range(model.config.text_config.num_hidden_layers):
        device_map[f"language_model.model.layers.{i}"] = "disk" if i in (1, 3) else "cpu"
    dispatched = GenieBlueForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    assert all(hasattr(layer, "_hf_hook") for layer in dispatched.language_model.model.layers)
    row, pixels = image_row(model)
    text = text_batch()
    with torch.no_grad():
        assert torch.equal(dispatched(input_ids=text).logits, model(input_ids=text).logits)
        assert torch.allclose(dispatched(input_ids=row[None], pixel_values=pixels).logits,
                              model(input_ids=row[None], pixel_values=pixels).logits, atol=1e-6)


def test_forced_multimodal_route_is_sticky_through_generate(monkeypatch):
    """route="multimodal" on a text prompt (the paper's shared-base ablation) holds for every decode step."""
    model = tiny_genieblue("llama")
    twin = base_twin(model)
    prompt = text_batch(batch=2, length=7)
    spy = RouteSpy(model, monkeypatch)
    generated = model.generate(input_ids=prompt, route="multimodal", max_new_tokens=5, do_sample=False)
    assert spy.calls == ["_multimodal_forward"] * 5
    assert torch.equal(generated, greedy_forced(model, prompt, steps=5))
    assert not torch.equal(generated, twin.generate(input_ids=prompt, max_new_tokens=5, do_sample=False))


def greedy_forced(model, input_ids, steps):
    sequence = input_ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=sequence, route="multimodal", use_cache=False).logits
            sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=-1)
    return sequence


def test_cache_continuation_keeps_the_multimodal_route(monkeypatch):
    """A second turn over the first turn's KV cache stays on the path the conversation started on."""
    model = tiny_genieblue("qwen2")
    row, pixels = image_row(model)
    first = model.generate(input_ids=row[None], pixel_values=pixels, max_new_tokens=3, do_sample=False,
                           return_dict_in_generate=True)
    follow_up = torch.cat([first.sequences, text_batch(batch=1, length=3, seed=9)], dim=-1)
    spy = RouteSpy(model, monkeypatch)
    continued = model.generate(input_ids=follow_up, past_key_values=first.past_key_values, max_new_tokens=3,
                               do_sample=False)
    assert set(spy.calls) == {"_multimodal_forward"}
    assert torch.equal(continued, greedy_without_cache(model, follow_up, pixels, steps=3))


def test_full_siglip_model_is_refused_with_a_hint():
    from transformers import SiglipConfig, SiglipModel

    full = SiglipModel(SiglipConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, vocab_size=50),
                                    vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, image_size=16, patch_size=4)))
    with pytest.raises(ValueError, match="pass its vision tower"):
        GenieBlueForConditionalGeneration.from_base(tiny_base("qwen2"), full)


def test_bfloat16_base_with_float32_vision_tower():
    """from_base keeps each part's dtype; features are cast at the projector and again at the LLM embeddings."""
    from transformers import SiglipVisionModel
    from genieblue_hf.testing import tiny_vision_config

    base = tiny_base("qwen2").to(torch.bfloat16)
    model = GenieBlueForConditionalGeneration.from_base(base, SiglipVisionModel(tiny_vision_config())).eval()
    assert model.vision_tower.dtype == torch.float32 and model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16
    row, pixels = image_row(model)
    generated = model.generate(input_ids=row[None], pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, len(row) + 3)


def test_reserved_placeholder_generated_by_the_base_is_just_a_token_on_the_text_path():
    """With an in-vocabulary placeholder id, a text sequence whose base emits that id keeps decoding as the base."""
    model = tiny_genieblue("qwen2", image_token_id=7)
    twin = base_twin(model)
    prompt = text_batch(batch=1, length=6)
    with torch.no_grad():
        ours = model(input_ids=prompt, use_cache=True)
        theirs = twin(input_ids=prompt, use_cache=True)
        step = torch.tensor([[7]])
        ours = model(input_ids=step, past_key_values=ours.past_key_values)
        theirs = twin(input_ids=step, past_key_values=theirs.past_key_values)
    assert not ours.multimodal_rows.any()
    assert torch.equal(ours.logits, theirs.logits)


def test_beam_search_on_a_mixed_batch_equals_rows_alone():
    model = tiny_genieblue("qwen2")
    rows, row_pixels, input_ids, attention_mask, pixels = mixed_batch(model)
    beams = dict(num_beams=2, num_return_sequences=2, max_new_tokens=4, do_sample=False, early_stopping=True)
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, **beams)
    for i in range(3):
        alone = model.generate(input_ids=input_ids[i : i + 1], attention_mask=attention_mask[i : i + 1],
                               pixel_values=row_pixels[i], **beams)
        assert torch.equal(generated[2 * i : 2 * i + 2], alone), i


def test_static_cache_on_both_paths():
    model = tiny_genieblue("llama")
    twin = base_twin(model)
    text = text_batch(batch=1)
    static = dict(max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(model.generate(input_ids=text, **static), twin.generate(input_ids=text, **static))
    row, pixels = image_row(model)
    assert torch.equal(model.generate(input_ids=row[None], pixel_values=pixels, **static),
                       model.generate(input_ids=row[None], pixel_values=pixels, max_new_tokens=5, do_sample=False))


def test_lora_mode_selectable_at_load(tmp_path):
    model = tiny_genieblue("qwen2")
    model.save_pretrained(tmp_path)
    loaded = GenieBlueForConditionalGeneration.from_pretrained(tmp_path, lora_execution_mode="merged").eval()
    assert loaded.config.lora_execution_mode == "merged"
    row, pixels = image_row(model)
    with torch.no_grad():
        merged = loaded(input_ids=row[None], pixel_values=pixels).logits
        assert len(loaded._merged_weights._cache) > 0  # the merged tensors were built and used
        assert torch.allclose(merged, model(input_ids=row[None], pixel_values=pixels).logits, atol=1e-5)
