"""transformers' model contract: tuple returns, loading info, image features, assisted decoding, compile, hooks."""

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from genieblue_hf import GenieBlueForConditionalGeneration

from genieblue_hf.testing import TOKENS_PER_TILE, base_twin, image_row, text_batch, tiny_genieblue


@pytest.mark.parametrize("path", ["text", "image"])
def test_return_dict_false_gives_transformers_tuples(path):
    model = tiny_genieblue("qwen2")
    row, pixels = image_row(model)
    inputs = dict(input_ids=text_batch(batch=1)) if path == "text" else dict(input_ids=row[None], pixel_values=pixels)
    labels = inputs["input_ids"]
    with torch.no_grad():
        as_dict = model(**inputs, labels=labels)
        as_tuple = model(**inputs, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    assert len(as_tuple) == len(as_dict.to_tuple())


def test_output_loading_info(tmp_path):
    model = tiny_genieblue("qwen2")
    model.save_pretrained(tmp_path)
    loaded, info = GenieBlueForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, GenieBlueForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any(p.requires_grad for p in loaded.language_model.parameters())


def test_get_image_features_follows_transformers_vlms():
    model = tiny_genieblue("qwen2")
    _, pixels = image_row(model, num_images=2)
    with torch.no_grad():
        out = model.get_image_features(pixels, output_hidden_states=True)
        as_tuple = model.get_image_features(pixels, return_dict=False)
    assert isinstance(out, BaseModelOutputWithPooling)
    assert out.pooler_output.shape == (2, TOKENS_PER_TILE, model.config.text_config.hidden_size)
    assert out.last_hidden_state.shape[:2] == (2, 16)  # 4x4 patches per tile
    assert len(out.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], out.pooler_output)


def test_assisted_decoding_with_images_equals_greedy():
    model = tiny_genieblue("qwen2")
    draft = tiny_genieblue("qwen2", seed=3)  # another GenieBlue (same vocabulary and image token) as the draft
    row, pixels = image_row(model, num_images=1)
    greedy = dict(max_new_tokens=8, do_sample=False)
    expected = model.generate(input_ids=row[None], pixel_values=pixels, **greedy)
    assisted = model.generate(input_ids=row[None], pixel_values=pixels, assistant_model=draft, **greedy)
    assert torch.equal(assisted, expected)
    text = text_batch(batch=1)
    twin = base_twin(model)
    assert torch.equal(model.generate(input_ids=text, prompt_lookup_num_tokens=3, **greedy),
                       twin.generate(input_ids=text, **greedy))


def test_prompt_lookup_with_images_and_an_in_vocabulary_placeholder():
    """A prompt whose n-grams precede the image makes prompt lookup draft placeholder ids; the multimodal path never
    selects them, so the result is greedy decoding's."""
    model = tiny_genieblue("qwen2", image_token_id=7)  # a reserved id inside the base vocabulary
    row, pixels = image_row(model, num_images=1, prefix=3, suffix=3, seed=4)
    text = torch.tensor([11, 12, 13]), torch.tensor([21, 22, 23])  # no 7 outside the image
    row = torch.cat([text[0], row[3:-3], text[1]])
    prompt = torch.cat([row, text[0], text[1], text[0]])  # the text before the image comes back at the end
    greedy = dict(max_new_tokens=6, do_sample=False)
    expected = model.generate(input_ids=prompt[None], pixel_values=pixels, **greedy)
    lookup = model.generate(input_ids=prompt[None], pixel_values=pixels, prompt_lookup_num_tokens=4, **greedy)
    assert torch.equal(lookup, expected)


def test_prompt_lookup_over_out_of_vocabulary_placeholders_is_refused_clearly():
    model = tiny_genieblue("qwen2")
    row, pixels = image_row(model)
    with pytest.raises(ValueError, match="prompt-lookup decoding cannot run over image placeholders"):
        model.generate(input_ids=row[None], pixel_values=pixels, prompt_lookup_num_tokens=3, max_new_tokens=3)


def test_the_text_path_compiles_in_full_and_stays_the_base():
    """GenieBlue routes in Python (``_can_compile_fullgraph = False``); its text path is the base, which compiles."""
    model = tiny_genieblue("llama")
    twin = base_twin(model)
    assert GenieBlueForConditionalGeneration._can_compile_fullgraph is False
    row, pixels = image_row(model)
    with torch.no_grad():
        model(input_ids=row[None], pixel_values=pixels)  # the dispatchers are in place
        text = text_batch()
        compiled = torch.compile(model.language_model, fullgraph=True, backend="aot_eager")
        compiled_twin = torch.compile(twin, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(input_ids=text).logits, compiled_twin(input_ids=text).logits)
        assert torch.equal(compiled(input_ids=text).logits, twin(input_ids=text).logits)


def test_a_bypassed_multimodal_path_is_an_error_not_the_base():
    """If the base runs without GenieBlue's substitutions (here: a decoder forward that skips them), say so."""
    from genieblue_hf.modeling import genieblue_dispatch

    model = tiny_genieblue("qwen2")
    row, pixels = image_row(model)
    original = genieblue_dispatch.Dispatch.__call__
    try:
        genieblue_dispatch.Dispatch.__call__ = lambda self, *a, **k: self.run_original(*a, **k)
        with torch.no_grad(), pytest.raises(RuntimeError, match="ran 0 of 2 replicated blocks"):
            model(input_ids=row[None], pixel_values=pixels)
    finally:
        genieblue_dispatch.Dispatch.__call__ = original


def test_a_hook_on_a_base_block_does_not_fire_on_its_copy():
    """Replicated blocks are deep copies of base blocks; hooks the base carried (output capture, offload) stay behind,
    and a hook on the base block still runs on both paths."""
    from transformers import SiglipVisionModel

    from genieblue_hf.testing import tiny_base, tiny_vision_config

    base = tiny_base("qwen2")
    calls = []
    base.model.layers[3].register_forward_hook(lambda module, args, output: calls.append(module))
    model = GenieBlueForConditionalGeneration.from_base(base, SiglipVisionModel(tiny_vision_config())).eval()
    replica = model.replicated_layers["3"]
    row, pixels = image_row(model)
    with torch.no_grad():
        model(input_ids=text_batch(batch=1))
        model(input_ids=row[None], pixel_values=pixels)
    assert calls == [base.model.layers[3], base.model.layers[3]]
    assert replica not in calls


def test_mixed_batch_training_with_gradient_checkpointing():
    """A batch of one image row and one text-only row, checkpointed: the loss and its gradients match no
    checkpointing."""
    from genieblue_hf.testing import left_pad

    def run(checkpointing):
        model = tiny_genieblue("qwen2").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        row, pixels = image_row(model)
        text = text_batch(batch=1, length=9, seed=2)[0]
        input_ids, attention_mask = left_pad([row, text])
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, labels=labels).loss
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = run(False)
    loss, checkpointed = run(True)
    assert torch.allclose(loss, plain_loss, atol=1e-6)
    assert plain.keys() == checkpointed.keys() and any(n.startswith("lora.") for n in plain)
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


def test_reentrant_checkpointing_is_refused_clearly():
    model = tiny_genieblue("qwen2")
    with pytest.raises(ValueError, match="non-reentrant activation checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def test_the_kv_cache_goes_by_the_installed_releases_name_without_deprecation_noise(recwarn, caplog):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (argument, generate keyword, output field). GenieBlue
    returns the cache under the installed release's field name, takes it under either name, and its own calls use
    the name the base takes: generating (text, image and mixed batches) raises no deprecation warning."""
    import dataclasses

    from transformers import DynamicCache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    model = tiny_genieblue()
    field = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
    ids, pixel_values = image_row(model)
    text = text_batch(1, len(ids))
    outputs = model(input_ids=text, use_cache=True)
    assert getattr(outputs, field) is not None and field in outputs.keys()
    follow_up = model(input_ids=text[:, -1:], **{field: getattr(outputs, field)})  # a continuation, either name
    twin = base_twin(model)
    with torch.no_grad():
        reference = twin(input_ids=text, use_cache=True)
        step = twin(input_ids=text[:, -1:], **{field: getattr(reference, field)})
    assert torch.equal(follow_up.logits, step.logits)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=text, cache=DynamicCache(), past_key_values=DynamicCache())
    recwarn.clear()
    caplog.clear()
    settings = dict(max_new_tokens=3, do_sample=False)
    model.generate(input_ids=text, **settings)
    model.generate(input_ids=ids[None], pixel_values=pixel_values, **settings)
    model.generate(input_ids=torch.stack([text[0], ids]), pixel_values=pixel_values, **settings)
    noise = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records]
    assert not [m for m in noise if "past_key_values" in m or "deprecated" in m.lower()], noise
