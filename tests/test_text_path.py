"""Invariant 1: a text-only request runs the base LLM, bit for bit, whatever happened to the model before."""

import threading

import pytest
import torch

from genieblue_hf import GenieBlueForConditionalGeneration

from genieblue_hf.testing import base_twin, image_row, state_hash, text_batch, tiny_genieblue


def assert_text_path_is_base(model, twin, dtype_note=""):
    input_ids = text_batch(batch=2, length=10)
    with torch.no_grad():
        ours = model(input_ids=input_ids)
        theirs = twin(input_ids=input_ids)
    assert torch.equal(ours.logits, theirs.logits), dtype_note
    assert not ours.multimodal_rows.any()
    generated = model.generate(input_ids=input_ids, max_new_tokens=6, do_sample=False)
    expected = twin.generate(input_ids=input_ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, expected), dtype_note


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_text_path_equals_base_class(kind, dtype):
    model = tiny_genieblue(kind, dtype=dtype)
    twin = base_twin(model)
    assert type(model.language_model) is type(twin) and type(twin).__name__ in {"Qwen2ForCausalLM", "LlamaForCausalLM"}
    assert_text_path_is_base(model, twin, str(dtype))


def test_language_model_state_dict_is_the_base(kind):
    model = tiny_genieblue(kind)
    from genieblue_hf.testing import tiny_base

    original = tiny_base(kind).state_dict()
    ours = model.language_model.state_dict()
    assert ours.keys() == original.keys()
    assert all(torch.equal(ours[k], original[k]) for k in original)


def test_text_path_unchanged_after_multimodal_use_training_modes_and_reload(kind, tmp_path):
    model = tiny_genieblue(kind)
    twin = base_twin(model)
    base_hash = state_hash(model.language_model)

    row, pixels = image_row(model, num_images=1)
    with torch.no_grad():
        for _ in range(20):
            model(input_ids=row[None], pixel_values=pixels)
    assert_text_path_is_base(model, twin, "after 20 multimodal forwards")

    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(input_ids=row[None], pixel_values=pixels, labels=row[None]).loss
    loss.backward()
    optimizer.step()
    model.eval()
    assert state_hash(model.language_model) == base_hash
    assert_text_path_is_base(model, twin, "after a training step")

    for mode in ("merged", "unmerged", "merged"):
        model.set_lora_execution_mode(mode)
        with torch.no_grad():
            model(input_ids=row[None], pixel_values=pixels)
        assert_text_path_is_base(model, twin, f"after switching to {mode}")
    assert state_hash(model.language_model) == base_hash

    model.save_pretrained(tmp_path)
    reloaded = GenieBlueForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert state_hash(reloaded.language_model) == base_hash
    assert_text_path_is_base(reloaded, twin, "after save/load")


def test_text_path_loss_hidden_states_and_padding_equal_base(kind):
    model = tiny_genieblue(kind)
    twin = base_twin(model)
    input_ids = text_batch(batch=2, length=9)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding
    with torch.no_grad():
        ours = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, output_hidden_states=True)
        theirs = twin(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, output_hidden_states=True)
    assert torch.equal(ours.loss, theirs.loss)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert all(torch.equal(a, b) for a, b in zip(ours.hidden_states, theirs.hidden_states))
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False)
    expected = twin.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_text_path_equals_base_for_each_attention_backend(attn):
    model = tiny_genieblue("qwen2")
    model.set_attn_implementation(attn)
    twin = base_twin(model)
    twin.set_attn_implementation(attn)
    assert model.language_model.config._attn_implementation == attn
    # the replicated blocks share the base config object, so the backend switch reaches the multimodal path too
    assert all(layer.self_attn.config is model.language_model.config for layer in model.replicated_layers.values())
    assert_text_path_is_base(model, twin, attn)


def test_text_path_concurrent_with_multimodal_requests():
    model = tiny_genieblue("qwen2")
    model.set_lora_execution_mode("merged")
    twin = base_twin(model)
    text_ids = text_batch(batch=1, length=8)
    row, pixels = image_row(model)
    with torch.no_grad():
        expected_text = twin(input_ids=text_ids).logits
        expected_image = model(input_ids=row[None], pixel_values=pixels).logits
    model.drop_multimodal_cache()  # threads race to build the plan and the merged weights
    failures = []

    def text_worker():
        with torch.no_grad():
            for _ in range(10):
                if not torch.equal(model(input_ids=text_ids).logits, expected_text):
                    failures.append("text")

    def image_worker():
        with torch.no_grad():
            for _ in range(10):
                if not torch.equal(model(input_ids=row[None], pixel_values=pixels).logits, expected_image):
                    failures.append("image")

    threads = [threading.Thread(target=w) for w in (text_worker, image_worker, text_worker, image_worker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_deepcopy_and_pickle_give_independent_models(tmp_path):
    import copy

    model = tiny_genieblue("qwen2")
    row, pixels = image_row(model)
    with torch.no_grad():
        expected = model(input_ids=row[None], pixel_values=pixels).logits
        for clone in (copy.deepcopy(model), _pickled(model)):
            assert torch.equal(clone(input_ids=row[None], pixel_values=pixels).logits, expected)
            clone.lora["0"].self_attn.q_proj.lora_B.add_(1.0)  # the copy's view reads the copy's tensors
            assert not torch.equal(clone(input_ids=row[None], pixel_values=pixels).logits, expected)
        assert torch.equal(model(input_ids=row[None], pixel_values=pixels).logits, expected)


def _pickled(model):
    import pickle

    return pickle.loads(pickle.dumps(model))
