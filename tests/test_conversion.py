"""genieblue convert / compose: every training-checkpoint format round-trips; bad input fails cleanly."""

import json
from pathlib import Path
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file

from genieblue_hf import GenieBlueForConditionalGeneration, GenieBlueProcessor
from genieblue_hf.cli import main
from genieblue_hf.conversion import ConversionError, convert
from genieblue_hf.conversion import converter as convert_module
from genieblue_hf.conversion import writer as writer_module

from genieblue_hf.testing import base_twin, bpe_tokenizer, image_row, state_hash, text_batch, tiny_genieblue


@pytest.fixture(scope="module")
def trained():
    """A 'trained' tiny GenieBlue (multimodal parts perturbed) and its state dict as a training run holds it."""
    model = tiny_genieblue("qwen2")
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def save_config(model, folder):
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    return folder


def assert_converted(out, model):
    loaded = GenieBlueForConditionalGeneration.from_pretrained(out).eval()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    row, pixels = image_row(model)
    text = text_batch()
    for kwargs in (dict(input_ids=text), dict(input_ids=row[None], pixel_values=pixels)):
        assert torch.equal(loaded.generate(**kwargs, max_new_tokens=4, do_sample=False),
                           model.generate(**kwargs, max_new_tokens=4, do_sample=False))
    return loaded


def no_leftovers(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith("." + out.name)]


# -- formats ----------------------------------------------------------------------------------------------------


def test_trainer_folder_sharded_with_processor(trained, tmp_path):
    model, _ = trained
    ckpt = tmp_path / "checkpoint-100"
    model.save_pretrained(ckpt, max_shard_size="100KB")
    tokenizer = bpe_tokenizer()
    GenieBlueProcessor.for_model(model.config, tokenizer).save_pretrained(ckpt)
    out = convert(ckpt, tmp_path / "out", max_shard_size="150KB")
    assert_converted(out, model)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    with safe_open(str(out / shards[0]), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt" and metadata["source_format"] == "trainer"
    assert "genieblue_converter" in metadata and json.loads(metadata["source_sha256"])
    assert {"processor_config.json", "tokenizer.json", "chat_template.jinja", "modeling_genieblue.py",
            "generation_config.json"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("prefix, filename", [("module.", "model.safetensors"), ("module._orig_mod.", "model.safetensors"),
                                              ("base_model.model.", "pytorch_model.bin")])
def test_trainer_folder_with_wrapper_prefixes(trained, tmp_path, prefix, filename):
    model, state = trained
    ckpt = save_config(model, tmp_path / "ckpt")
    prefixed = {prefix + k: v for k, v in state.items() if k != "language_model.lm_head.weight" or
                not model.config.text_config.tie_word_embeddings}
    if filename.endswith(".safetensors"):
        save_file(prefixed, str(ckpt / filename))
    else:
        torch.save(prefixed, ckpt / filename)
    assert_converted(convert(ckpt, tmp_path / "out"), model)


def test_plain_state_dict_file_with_config(trained, tmp_path):
    model, state = trained
    path = tmp_path / "genieblue.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ConversionError, match="no config.json"):
        convert(path, tmp_path / "out")
    config_dir = save_config(model, tmp_path / "config")
    assert_converted(convert(path, tmp_path / "out", config=config_dir / "config.json"), model)


def peft_adapter(model, folder):
    """The LoRA weights as PEFT saves an adapter trained on the language model."""
    folder.mkdir()
    tensors = {}
    for name, param in model.lora.named_parameters():
        layer, *path, which = name.split(".")
        tensors[f"base_model.model.model.layers.{layer}.{'.'.join(path)}.{which}.weight"] = param.detach().clone()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = model.config
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": config.lora_rank, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
        "target_modules": config.lora_target_modules, "layers_to_transform": config.lora_layers,
    }))
    return folder


def test_peft_adapter_plus_rest_and_base(trained, tmp_path):
    model, state = trained
    adapter = peft_adapter(model, tmp_path / "adapter")
    rest = save_config(model, tmp_path / "rest")
    torch.save({k: v for k, v in state.items() if not k.startswith(("lora.", "language_model."))}, rest / "rest.pt")
    base = tmp_path / "base"
    model.language_model.save_pretrained(base)
    out = convert(adapter, tmp_path / "out", rest=rest, base=base)
    assert_converted(out, model)
    with pytest.raises(ConversionError, match="lora_alpha"):
        (adapter / "adapter_config.json").write_text(json.dumps({"r": model.config.lora_rank, "lora_alpha": 3}))
        convert(adapter, tmp_path / "out2", rest=rest, base=base)


def test_distributed_checkpoint(trained, tmp_path):
    model, state = trained
    ckpt = tmp_path / "dcp"
    optimizer_state = {"optim": {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}}
    dcp.save({"model": state, **optimizer_state}, checkpoint_id=str(ckpt), no_dist=True)
    config_dir = save_config(model, tmp_path / "config")
    assert_converted(convert(ckpt, tmp_path / "out", config=config_dir), model)


def test_base_is_copied_byte_for_byte_and_dtype_casts_only_trained_parts(trained, tmp_path):
    model, _ = trained
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    base = tmp_path / "base"
    model.language_model.save_pretrained(base)
    out = convert(ckpt, tmp_path / "out", base=base, dtype="bf16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        stored = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    assert {d for k, d in stored.items() if k.startswith("language_model.")} == {"F32"}
    assert {d for k, d in stored.items() if not k.startswith("language_model.")} == {"BF16"}
    loaded = GenieBlueForConditionalGeneration.from_pretrained(out)  # config.dtype stays the base's
    assert state_hash(loaded.language_model) == state_hash(model.language_model)
    assert torch.equal(loaded.lora["0"].self_attn.q_proj.lora_B, model.lora["0"].self_attn.q_proj.lora_B.bfloat16().float())
    twin = base_twin(model)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=text_batch()).logits, twin(input_ids=text_batch()).logits)


def test_base_drift_is_reported(trained, tmp_path):
    model, state = trained
    ckpt = save_config(model, tmp_path / "ckpt")
    drifted = dict(state)
    drifted["language_model.model.layers.0.mlp.up_proj.weight"] = state["language_model.model.layers.0.mlp.up_proj.weight"] + 1e-3
    save_file(drifted, str(ckpt / "model.safetensors"))
    base = tmp_path / "base"
    model.language_model.save_pretrained(base)
    with pytest.raises(ConversionError, match=r"1 base tensors .* differ from --base .*layers.0.mlp.up_proj"):
        convert(ckpt, tmp_path / "out", base=base)
    no_leftovers(tmp_path / "out")
    out = convert(ckpt, tmp_path / "out", base=base, allow_base_drift=True)
    assert state_hash(GenieBlueForConditionalGeneration.from_pretrained(out).language_model) == state_hash(
        model.language_model)


def test_compose_builds_the_training_starting_point(trained, tmp_path):
    model, _ = trained
    base, vision = tmp_path / "base", tmp_path / "vision"
    model.language_model.save_pretrained(base)
    bpe_tokenizer().save_pretrained(base)
    model.vision_tower.save_pretrained(vision)
    assert main(["compose", "--language-model", str(base), "--vision-model", str(vision), str(tmp_path / "out")]) == 0
    composed = GenieBlueForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert state_hash(composed.language_model) == state_hash(model.language_model)
    assert all(torch.count_nonzero(p) == 0 for n, p in composed.lora.named_parameters() if n.endswith("lora_B"))
    assert (tmp_path / "out" / "processor_config.json").is_file()


# -- bad input --------------------------------------------------------------------------------------------------


def broken_checkpoint(model, state, folder, edit):
    save_config(model, folder)
    tensors = {k: v for k, v in state.items()}
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: [t.pop("lora.0.self_attn.q_proj.lora_A"),
                    t.pop(next(k for k in list(t) if k.endswith("post_layernorm.bias")))],
         r"missing tensors \(2\) - lora: lora.0.self_attn.q_proj.lora_A; vision_tower: vision_tower\.\S*post_layernorm"),
        (lambda t: t.update({"foo.bar": torch.zeros(1), "lora.3.self_attn.q_proj.lora_A": torch.zeros(8, 32)}),
         r"unexpected tensors \(2\) - lora: lora.3.self_attn.q_proj.lora_A; unknown: foo.bar"),
        (lambda t: t.update({"multi_modal_projector.linear_2.bias": torch.zeros(7)}),
         r"shape mismatch for multi_modal_projector.linear_2.bias: checkpoint has \[7\], the config needs \[32\]"),
        (lambda t: t["lora.1.mlp.down_proj.lora_B"].fill_(float("nan")),
         r"tensor lora.1.mlp.down_proj.lora_B holds NaN or Inf"),
    ],
)
def test_bad_checkpoints_fail_with_names_and_leave_nothing(trained, tmp_path, edit, message):
    model, state = trained
    ckpt = broken_checkpoint(model, {k: v.clone() for k, v in state.items()}, tmp_path / "ckpt", edit)
    with pytest.raises(ConversionError, match=message):
        convert(ckpt, tmp_path / "out")
    no_leftovers(tmp_path / "out")


def test_nonfinite_can_be_allowed(trained, tmp_path, caplog):
    model, state = trained
    ckpt = broken_checkpoint(model, {k: v.clone() for k, v in state.items()}, tmp_path / "ckpt",
                             lambda t: t["lora.1.mlp.down_proj.lora_B"].fill_(float("inf")))
    convert(ckpt, tmp_path / "out", allow_nonfinite=True, verify=False)
    assert "holds NaN or Inf" in caplog.text


def test_truncated_safetensors_is_named(trained, tmp_path):
    model, _ = trained
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"model.safetensors: truncated"):
        convert(ckpt, tmp_path / "out")
    no_leftovers(tmp_path / "out")


class NotATensor:
    pass


def test_pickle_refused_by_weights_only(trained, tmp_path):
    model, state = trained
    path = tmp_path / "evil.pt"
    torch.save({**state, "payload": NotATensor()}, path)
    config_dir = save_config(model, tmp_path / "config")
    with pytest.raises(ConversionError, match="weights_only=True"):
        convert(path, tmp_path / "out", config=config_dir)
    no_leftovers(tmp_path / "out")


def test_disk_full_mid_write_leaves_nothing(trained, tmp_path, monkeypatch):
    model, _ = trained
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    calls = []
    real_write = writer_module.write_safetensors

    def failing_write(path, *args):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        real_write(path, *args)

    monkeypatch.setattr(writer_module, "write_safetensors", failing_write)
    with pytest.raises(OSError, match="No space left"):
        convert(ckpt, tmp_path / "out", max_shard_size="100KB")
    assert len(calls) == 2
    no_leftovers(tmp_path / "out")


def test_existing_output_is_refused(trained, tmp_path):
    model, _ = trained
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["convert", str(ckpt), str(tmp_path / "out")]) == 1
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert main(["convert", str(ckpt), str(tmp_path / "out"), "--overwrite", "--no-verify"]) == 0
    assert not (tmp_path / "out" / "keep.txt").exists()


# -- memory -----------------------------------------------------------------------------------------------------


# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a big test process would inherit its peak.
PEAK_RSS = textwrap.dedent(
    """
    import sys
    from genieblue_hf.conversion import convert
    from genieblue_hf.conversion.converter import expected_tensors, load_config
    expected_tensors(load_config(sys.argv[1]))  # lazy transformers imports happen before the baseline is taken
    def status_mb(field):
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) for l in status if l.startswith(field)) / 1024
    baseline = status_mb("VmHWM")
    convert(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[3], verify=False)
    print("RESULT", baseline, status_mb("VmHWM"))
    """
)


def test_conversion_memory_is_bounded_by_the_shard_size(tmp_path):
    from genieblue_hf.testing import tiny_base
    from transformers import SiglipVisionModel
    from genieblue_hf.testing import tiny_vision_config

    base = tiny_base("qwen2", hidden_size=512, intermediate_size=1536, num_attention_heads=8, vocab_size=2048)
    model = GenieBlueForConditionalGeneration.from_base(base, SiglipVisionModel(tiny_vision_config()))
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt, max_shard_size="500MB")
    del model, base
    shard_mb = 16
    assert model_mb > 7 * shard_mb
    completed = subprocess.run([sys.executable, "-c", PEAK_RSS, str(ckpt), str(tmp_path / "out"), f"{shard_mb}MB"],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    baseline, peak = map(float, completed.stdout.split("RESULT")[1].split())
    growth = peak - baseline
    # tensors are written one at a time: the largest (4 MB here) and its read buffer, plus allocator slack; the
    # bound is two shards, far below the model itself
    print("conversion peak growth MB", growth)
    assert growth < 2 * shard_mb and growth < model_mb / 4, (growth, model_mb)


# -- data safety ----------------------------------------------------------------------------------------------------


def test_nonfinite_allowed_output_verifies(trained, tmp_path):
    """--allow-nonfinite writes NaN weights and verification compares bits (NaN never equals NaN numerically)."""
    model, state = trained
    ckpt = broken_checkpoint(model, {k: v.clone() for k, v in state.items()}, tmp_path / "ckpt",
                             lambda t: t["lora.1.mlp.down_proj.lora_B"].fill_(float("nan")))
    out = convert(ckpt, tmp_path / "out", allow_nonfinite=True)  # verify=True
    loaded = GenieBlueForConditionalGeneration.from_pretrained(out)
    assert torch.isnan(loaded.lora["1"].mlp.down_proj.lora_B).all()


def test_cast_base_to_bf16_verifies(trained, tmp_path):
    model, _ = trained
    ckpt, base = tmp_path / "ckpt", tmp_path / "base"
    model.save_pretrained(ckpt)
    model.language_model.save_pretrained(base)
    out = convert(ckpt, tmp_path / "out", base=base, dtype="bf16", cast_base=True)  # verify=True
    loaded = GenieBlueForConditionalGeneration.from_pretrained(out, dtype="auto")
    assert loaded.language_model.dtype == torch.bfloat16


def test_provenance_names_each_source_file_by_role(trained, tmp_path):
    model, _ = trained
    ckpt, base = tmp_path / "ckpt", tmp_path / "base"
    model.save_pretrained(ckpt)
    model.language_model.save_pretrained(base)
    out = convert(ckpt, tmp_path / "out", base=base, verify=False)
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        provenance = json.loads(handle.metadata()["source_sha256"])
    from genieblue_hf.conversion.sources import sha256_of

    assert provenance == {f"checkpoint:{ckpt / 'model.safetensors'}": sha256_of(ckpt / "model.safetensors"),
                          f"base:{base / 'model.safetensors'}": sha256_of(base / "model.safetensors")}


def test_a_source_changed_while_converting_is_an_error(trained, tmp_path, monkeypatch):
    model, _ = trained
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    real_write = convert_module.write_shards

    def write_then_touch(*args, **kwargs):
        result = real_write(*args, **kwargs)
        with open(ckpt / "model.safetensors", "ab") as handle:
            handle.write(b"x")  # another process appends to the checkpoint mid-conversion
        return result

    monkeypatch.setattr(convert_module, "write_shards", write_then_touch)
    with pytest.raises(ConversionError, match="changed while it was being converted"):
        convert(ckpt, tmp_path / "out", verify=False)
    no_leftovers(tmp_path / "out")


@pytest.mark.parametrize("failing_step", ["rename-in", "delete-old", "interrupt-between"])
def test_overwrite_keeps_a_complete_output_at_every_step(tmp_path, monkeypatch, failing_step):
    """Fault injection into the swap: the path always holds the complete old or the complete new output."""
    import os
    import shutil

    from genieblue_hf import atomic

    out = tmp_path / "out"
    out.mkdir()
    for i in range(20):
        (out / f"old-{i}.txt").write_text("old")
    real_replace, real_rmtree = os.replace, shutil.rmtree
    calls = []

    def replace(src, dst):
        calls.append(("replace", Path(src).name, Path(dst).name))
        if Path(dst) == out and "staging" in Path(src).name:
            if failing_step == "rename-in":
                raise OSError(28, "No space left on device")
            if failing_step == "interrupt-between":
                raise KeyboardInterrupt
        return real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if failing_step == "delete-old" and ".genieblue-old-" in Path(path).name:
            raise PermissionError(13, "Permission denied")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "replace", replace)
    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    try:
        with atomic.atomic_output_dir(out, overwrite=True) as staging:
            for i in range(5):
                (staging / f"new-{i}.txt").write_text("new")
    except (OSError, KeyboardInterrupt):
        pass
    names = sorted(p.name for p in out.iterdir())
    if failing_step == "delete-old":
        assert names == [f"new-{i}.txt" for i in range(5)]  # the new output is in place
    else:
        assert names == sorted(f"old-{i}.txt" for i in range(20))  # the old output is back, whole
    assert not [p for p in tmp_path.iterdir() if ".genieblue-staging-" in p.name]


class ReducePayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_distributed_checkpoint_metadata_cannot_run_code(trained, tmp_path):
    """A .metadata pickle with a __reduce__ payload is refused before anything runs (convert and detect both)."""
    import pickle

    model, _ = trained
    folder = save_config(model, tmp_path / "ckpt")
    marker = tmp_path / "payload-ran"
    (folder / ".metadata").write_bytes(pickle.dumps(ReducePayload(marker)))
    with pytest.raises(ConversionError, match="refusing to load posix.system"):
        convert(folder, tmp_path / "out")
    assert not marker.exists()
    no_leftovers(tmp_path / "out")
