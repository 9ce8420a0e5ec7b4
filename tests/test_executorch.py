"""The ExecuTorch program, run with ExecuTorch's own runtime on this CPU (XNNPACK).

- Its text decoder is the base: the same logits and tokens, bit for bit, as the base alone exported through the same
  pipeline, in float32 and quantized the same way.
- Its multimodal decoder gives eager GenieBlue's greedy tokens in float32.
- The base weights are stored once although both decoders read them.
The exports are module-scoped (lowering takes tens of seconds); the model has 2 blocks: block 1 replicated, block 0
with LoRA.
"""

import logging

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("executorch.runtime", reason="the executorch extra is not installed")

from genieblue_hf.cli import main  # noqa: E402
from genieblue_hf.executorch import (  # noqa: E402
    PROGRAM_FILE, ExecuTorchRunner, genieblue_programs, language_model_programs, lower,
)

from genieblue_hf.testing import VOCAB, base_twin, image_row, tiny_genieblue  # noqa: E402


MAX_CACHE_LEN = 48
NEW_TOKENS = 10


def small_genieblue():
    model = tiny_genieblue(text_config={"num_hidden_layers": 2}, replication_interval=2)
    assert model.config.replicated_layers == [1] and model.config.lora_layers == [0]
    return model


def write(programs_and_metadata, path):
    lower(*programs_and_metadata).save(str(path))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("executorch")
    model = small_genieblue()
    model.save_pretrained(root / "model")
    # The GenieBlue program through the command line, from the saved folder.
    assert main(["export-executorch", str(root / "model"), str(root / "out"), "--max-cache-len", str(MAX_CACHE_LEN)]) == 0
    base = base_twin(model)
    return {
        "root": root,
        "model": model,
        "genieblue": root / "out" / PROGRAM_FILE,
        "base": write(language_model_programs(base, MAX_CACHE_LEN), root / "base.pte"),
    }


@pytest.fixture(scope="module")
def exported_quantized(exported):
    root, model = exported["root"], exported["model"]
    return {
        "genieblue": write(genieblue_programs(model, MAX_CACHE_LEN, quantize="paper"), root / "genieblue-q.pte"),
        "base": write(language_model_programs(base_twin(model), MAX_CACHE_LEN, quantize="paper"), root / "base-q.pte"),
    }


def text_prompt(seed=0, length=9):
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def test_program_has_both_decoders_and_metadata(exported):
    runner = ExecuTorchRunner(exported["genieblue"])
    assert set(runner.method_names) == {"vision_encoder", "token_embedding", "text_decoder", "multimodal_decoder"}
    config = exported["model"].config
    assert runner.metadata["image_token_id"] == config.image_token_id
    assert runner.metadata["image_tokens_per_tile"] == config.image_tokens_per_tile
    assert runner.metadata["get_max_seq_len"] == MAX_CACHE_LEN
    assert (exported["root"] / "out" / "tokenizer.json").exists() or not (exported["root"] / "model" / "tokenizer.json").exists()


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "paper-quantized"])
def test_text_decoder_is_the_base_program_bit_for_bit(request, quantized):
    programs = request.getfixturevalue("exported_quantized" if quantized else "exported")
    ours, theirs = ExecuTorchRunner(programs["genieblue"]), ExecuTorchRunner(programs["base"])
    for seed in range(3):
        prompt = text_prompt(seed)
        our_logits, route = ours.prefill(prompt)
        assert route == "text"
        assert torch.equal(our_logits, theirs.prefill(prompt)[0])
        assert torch.equal(ours.generate(prompt, max_new_tokens=NEW_TOKENS), theirs.generate(prompt, max_new_tokens=NEW_TOKENS))


def test_text_decoder_matches_eager_base(exported):
    runner, model = ExecuTorchRunner(exported["genieblue"]), exported["model"]
    prompt = text_prompt(5)
    eager = model.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    assert torch.equal(runner.generate(prompt, max_new_tokens=NEW_TOKENS), eager)


def test_multimodal_decoder_gives_eager_genieblue_tokens(exported):
    runner, model = ExecuTorchRunner(exported["genieblue"]), exported["model"]
    for seed in range(3):
        ids, pixel_values = image_row(model, num_images=2, seed=seed)
        prompt = ids[None]
        logits, route = runner.prefill(prompt, pixel_values)
        assert route == "multimodal"
        with torch.no_grad():
            eager_logits = model(input_ids=prompt, pixel_values=pixel_values).logits
        finite = torch.isfinite(eager_logits)
        assert torch.equal(finite, torch.isfinite(logits))  # the placeholder id is masked on both
        torch.testing.assert_close(logits[finite], eager_logits[finite], atol=1e-4, rtol=1e-4)
        eager = model.generate(input_ids=prompt, pixel_values=pixel_values, max_new_tokens=NEW_TOKENS,
                               do_sample=False, min_new_tokens=NEW_TOKENS)
        assert torch.equal(runner.generate(prompt, pixel_values, max_new_tokens=NEW_TOKENS), eager)


def test_text_requests_load_only_the_text_methods(exported):
    runner = ExecuTorchRunner(exported["genieblue"])
    runner.generate(text_prompt(2), max_new_tokens=3)
    assert set(runner.loaded_methods) == {"token_embedding", "text_decoder"}
    ids, pixel_values = image_row(exported["model"])
    runner.generate(ids[None], pixel_values, max_new_tokens=3)
    assert set(runner.loaded_methods) == set(runner.method_names)


def test_decoders_keep_their_own_caches(exported):
    """An image request between two text requests leaves the text decoder's answers unchanged."""
    runner, model = ExecuTorchRunner(exported["genieblue"]), exported["model"]
    prompt = text_prompt(7)
    first = runner.generate(prompt, max_new_tokens=NEW_TOKENS)
    ids, pixel_values = image_row(model, seed=3)
    runner.generate(ids[None], pixel_values, max_new_tokens=NEW_TOKENS)
    assert torch.equal(runner.generate(prompt, max_new_tokens=NEW_TOKENS), first)


def test_base_weights_are_stored_once(exported):
    """Every base linear weight's bytes occur exactly once in the GenieBlue program, as in the base's own program,
    though the text and the multimodal decoder both compute with them (the replicated block's copy is stored too)."""
    model = exported["model"]
    ours, theirs = exported["genieblue"].read_bytes(), exported["base"].read_bytes()
    weights = load_file(exported["root"] / "model" / "model.safetensors")
    checked = 0
    for key, tensor in weights.items():
        if key.startswith("language_model.") and key.endswith("proj.weight"):
            data = tensor.float().contiguous().numpy().tobytes()
            assert theirs.count(data) == 1, key
            assert ours.count(data) == 1, key
            checked += 1
    assert checked == 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down)
    for key, tensor in weights.items():
        if key.startswith("replicated_layers.") and key.endswith("proj.weight"):
            assert ours.count(tensor.float().contiguous().numpy().tobytes()) == 1, key
    assert model.config.replicated_layers == [1]


def test_runner_refuses_bad_requests_in_one_line(exported):
    runner, model = ExecuTorchRunner(exported["genieblue"]), exported["model"]
    ids, pixel_values = image_row(model, num_images=2)
    cases = [
        (lambda: runner.generate(ids[None], max_new_tokens=2), "image placeholders but no pixel_values"),
        (lambda: runner.generate(ids[None], pixel_values[:1], max_new_tokens=2), "give 1 tiles of"),
        (lambda: runner.generate(text_prompt(length=40), max_new_tokens=20), "exceeds the program's max_cache_len"),
        (lambda: runner.generate(torch.zeros(2, 3, dtype=torch.long)), "one non-empty sequence"),
    ]
    for call, fragment in cases:
        with pytest.raises(ValueError, match=fragment) as error:
            call()
        assert "\n" not in str(error.value)


def test_export_refuses_bad_settings_in_one_line(exported, tmp_path, caplog):
    root = exported["root"]
    with caplog.at_level(logging.ERROR):
        assert main(["export-executorch", str(root / "model"), str(root / "out")]) == 1  # exists
        assert main(["export-executorch", str(root / "model"), str(tmp_path / "x"), "--max-cache-len", "1"]) == 1
        assert main(["export-executorch", str(root / "model"), str(tmp_path / "y"), "--max-cache-len", "100000"]) == 1
        assert main(["export-executorch", str(tmp_path), str(tmp_path / "z")]) == 1  # not a model folder
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(messages) == 4 and all("\n" not in m for m in messages)
    assert "already exists" in messages[0] and "max_cache_len" in messages[1] and "max_position_embeddings" in messages[2]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
    assert (root / "out" / PROGRAM_FILE).exists()  # the refused overwrite left the earlier program as it was
