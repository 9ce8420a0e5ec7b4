"""Training: the paper's stages, Trainer compatibility, resume, DDP, PEFT on top; the base is never touched."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from genieblue_hf import GenieBlueForConditionalGeneration, GenieBlueProcessor
from genieblue_hf.conversion import convert
from genieblue_hf.synthetic import compose_tiny, shape_image, shapes_dataset
from genieblue_hf.training import ConversationCollator, ConversationDataset, multimodal_lora_config

from genieblue_hf.testing import base_twin, state_hash

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture
def tiny():
    model, processor = compose_tiny()
    return model.train(), processor


def args_for(tmp_path, steps, **overrides):
    values = dict(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=8,
                  learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[],
                  remove_unused_columns=False, use_cpu=True, seed=0, dataloader_num_workers=0)
    values.update(overrides)
    return TrainingArguments(**values)


def text_path_is_base(model, processor):
    twin = base_twin(model)
    inputs = processor(text="the quick brown fox jumps")
    model.eval()
    with torch.no_grad():
        return torch.equal(model(**inputs).logits, twin(**inputs).logits)


def test_stage_trainable_sets(tiny):
    model, _ = tiny
    stage1 = model.configure_training(stage=1)
    assert stage1["multi_modal_projector"] > 0
    assert stage1["vision_tower"] == stage1["replicated_layers"] == stage1["lora"] == stage1["language_model"] == 0
    stage2 = model.configure_training(stage=2)
    assert all(stage2[p] == sum(x.numel() for x in getattr(model, p).parameters())
               for p in ("vision_tower", "multi_modal_projector", "replicated_layers", "lora"))
    assert stage2["language_model"] == 0
    assert model.configure_training(stage=2, train_vision=False)["vision_tower"] == 0
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        model.configure_training(stage=3)


def test_unfreezing_the_base_is_refused_unless_asked(tiny):
    model, processor = tiny
    model.configure_training(stage=2)
    batch = ConversationCollator(processor)(shapes_dataset(2))
    model.language_model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="GenieBlue never trains the base"):
        model(**batch)
    counts = model.configure_training(stage=2, shared_base=True)  # the paper's shared-base ablation
    assert counts["language_model"] > 0
    model(**batch).loss.backward()
    assert model.language_model.model.layers[0].mlp.up_proj.weight.grad is not None


def test_collator_masks_everything_but_the_answers(tiny):
    model, processor = tiny
    samples = shapes_dataset(3)
    batch = ConversationCollator(processor)(samples)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "labels"}
    for row, sample in enumerate(samples):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        assert processor.tokenizer.decode(labelled) == sample["answer"] + "<|im_end|>\n"
    assert (batch["labels"][batch["input_ids"] == model.config.image_token_id] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_jsonl_dataset_with_relative_image_paths(tiny, tmp_path):
    _, processor = tiny
    shape_image("red", "circle").save(tmp_path / "red.png")
    lines = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
              "images": ["red.png"]},
             {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    dataset = ConversationDataset(tmp_path / "data.jsonl")
    assert len(dataset) == 2 and dataset[0]["images"][0].size == (32, 32)
    batch = ConversationCollator(processor)([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape[0] == 1
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": lines[0]["messages"], "images": []}))
    with pytest.raises(ValueError, match="1 image items but 0 images"):
        ConversationDataset(tmp_path / "bad.jsonl")


def test_trainer_reduces_the_loss_and_keeps_the_base(tiny, tmp_path):
    model, processor = tiny
    base_hash = state_hash(model.language_model)
    model.configure_training(stage=2)
    trainer = Trainer(model=model, args=args_for(tmp_path, steps=30), train_dataset=shapes_dataset(64),
                      data_collator=ConversationCollator(processor))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses  # 5.3 -> 4.6 when measured
    assert state_hash(model.language_model) == base_hash
    assert text_path_is_base(model, processor)


def test_resume_and_convert_a_trainer_checkpoint(tiny, tmp_path):
    model, processor = tiny
    base_hash = state_hash(model.language_model)
    model.language_model.save_pretrained(tmp_path / "base")
    model.configure_training(stage=2)
    data, collator = shapes_dataset(32), ConversationCollator(processor)
    Trainer(model=model, args=args_for(tmp_path, steps=4, save_strategy="steps", save_steps=2),
            train_dataset=data, data_collator=collator).train()
    resumed_model, _ = compose_tiny()
    resumed_model.configure_training(stage=2)
    trainer = Trainer(model=resumed_model, args=args_for(tmp_path, steps=6, save_strategy="steps", save_steps=2),
                      train_dataset=data, data_collator=collator)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert trainer.state.global_step == 6
    assert state_hash(resumed_model.language_model) == base_hash
    out = convert(tmp_path / "run" / "checkpoint-6", tmp_path / "hub", base=tmp_path / "base")
    converted = GenieBlueForConditionalGeneration.from_pretrained(out)
    assert state_hash(converted.language_model) == base_hash
    assert state_hash(converted.lora) == state_hash(resumed_model.lora)


def test_peft_on_top_keeps_the_text_path(tiny, tmp_path):
    model, processor = tiny
    model.configure_training(stage=2)
    peft_model = get_peft_model(model, multimodal_lora_config(r=4, lora_alpha=8))
    wrapped = {name for name, module in model.named_modules() if hasattr(module, "adapter_layer_names")}
    assert wrapped and not any(name.startswith(("language_model.", "lora.")) for name in wrapped)
    assert {name.split(".")[0] for name in wrapped} == {"vision_tower", "multi_modal_projector", "replicated_layers"}
    trainer = Trainer(model=peft_model, args=args_for(tmp_path, steps=5), train_dataset=shapes_dataset(32),
                      data_collator=ConversationCollator(processor))
    trainer.train()
    assert text_path_is_base(model, processor)
    batch = ConversationCollator(processor)(shapes_dataset(2, seed=5))
    with torch.no_grad():
        peft_model.eval()
        tuned = peft_model(**batch).logits
        with peft_model.disable_adapter():
            untuned = peft_model(**batch).logits
    assert not torch.allclose(tuned, untuned, atol=1e-4)  # the adapter acts on the multimodal path
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh, _ = compose_tiny()
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, tuned, atol=1e-5)
        merged = reloaded.merge_and_unload()
        assert torch.allclose(merged(**batch).logits, tuned, atol=1e-4)
    assert text_path_is_base(merged, processor)


def test_peft_on_the_base_is_refused(tiny):
    model, processor = tiny
    peft_model = get_peft_model(model, LoraConfig(target_modules="all-linear", r=4))
    with pytest.raises(RuntimeError, match=r"PEFT wrapped the base LLM's language_model\.model\.layers"):
        peft_model(**processor(text="the quick brown fox"))


def run_example(*args, env_extra=None, launcher=()):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    completed = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=600,
                               cwd=EXAMPLES)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def test_examples_chain_stage1_stage2_peft(tmp_path):
    run_example(sys.executable, "train_stage1.py", "--out", str(tmp_path / "s1"), "--steps", "10")
    run_example(sys.executable, "train_stage2.py", "--model", str(tmp_path / "s1"), "--out", str(tmp_path / "s2"),
                "--steps", "10")
    peft = run_example(sys.executable, "finetune_peft.py", "--model", str(tmp_path / "s2"), "--out",
                       str(tmp_path / "peft"), "--steps", "5")
    assert "text path after PEFT fine-tuning and merging equals the base: True" in peft.stderr
    merged = GenieBlueForConditionalGeneration.from_pretrained(tmp_path / "peft" / "merged")
    start = GenieBlueForConditionalGeneration.from_pretrained(tmp_path / "s1")
    assert state_hash(merged.language_model) == state_hash(start.language_model)


def test_two_process_ddp_training_converts_with_the_base_intact(tmp_path):
    start, processor = compose_tiny()
    start.save_pretrained(tmp_path / "start")
    processor.save_pretrained(tmp_path / "start")
    start.language_model.save_pretrained(tmp_path / "base")
    run_example(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                "train_stage2.py", "--model", str(tmp_path / "start"), "--out", str(tmp_path / "ddp"),
                "--steps", "4", "--save-steps", "4", "--batch-size", "4")
    out = convert(tmp_path / "ddp" / "checkpoint-4", tmp_path / "hub", base=tmp_path / "base")
    converted = GenieBlueForConditionalGeneration.from_pretrained(out)
    assert state_hash(converted.language_model) == state_hash(start.language_model)
    assert state_hash(converted.lora) != state_hash(start.lora)  # it did train


@pytest.mark.parametrize("engine, port", [("fsdp", "29534"), ("ddp", "29536")])
def test_two_process_torch_engines_convert_with_the_base_intact(tmp_path, engine, port):
    """FSDP2 with the Trainer's wrap policy: every decoder block, the frozen base's included, is its own FSDP unit;
    both paths equal the unsharded model, training leaves the base as it was, and the DCP checkpoint converts."""
    report_path = tmp_path / "report.json"
    run_example(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                "train_distributed.py", "--engine", engine, "--out", str(tmp_path / engine), "--steps", "3",
                "--report", str(report_path))
    report = json.loads(report_path.read_text())
    assert report["world_size"] == 2 and report["text_logits_equal_unsharded"] is True
    assert report["multimodal_loss_sharded"] == pytest.approx(report["multimodal_loss_unsharded"], abs=1e-6)
    if engine == "fsdp":
        assert report["base_blocks_are_fsdp_units"] is True
        assert {"FSDPQwen2DecoderLayer", "FSDPSiglipEncoderLayer"} <= set(report["fsdp_unit_classes"])
        assert report["base_unchanged_by_training"] is True
    out = convert(tmp_path / engine / "dcp", tmp_path / "hub", config=tmp_path / engine / "start",
                  base=tmp_path / engine / "start-base")
    converted = GenieBlueForConditionalGeneration.from_pretrained(out)
    start = GenieBlueForConditionalGeneration.from_pretrained(tmp_path / engine / "start")
    assert state_hash(converted.language_model) == state_hash(start.language_model)
    assert state_hash(converted.replicated_layers) != state_hash(start.replicated_layers)  # it did train


def test_trainer_with_gradient_checkpointing_and_bf16(tiny, tmp_path):
    model, processor = tiny
    base_hash = state_hash(model.language_model)
    model.configure_training(stage=2)
    trainer = Trainer(model=model, args=args_for(tmp_path, steps=3, gradient_checkpointing=True, bf16=True),
                      train_dataset=shapes_dataset(24), data_collator=ConversationCollator(processor))
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.replicated_layers.modules())
    assert state_hash(model.language_model) == base_hash


TRAINER_FSDP = """
import json, os, sys
from transformers import Trainer, TrainingArguments
from genieblue_hf.synthetic import compose_tiny, shapes_dataset
from genieblue_hf.training import ConversationCollator
model, processor = compose_tiny()
model.configure_training(stage=2)
layer = type(model.language_model.model.layers[0]).__name__
args = TrainingArguments(output_dir=sys.argv[1], max_steps=3, per_device_train_batch_size=2, report_to=[],
                         remove_unused_columns=False, save_strategy="no", fsdp=True,
                         fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": [layer, "SiglipEncoderLayer"]})
trainer = Trainer(model=model, args=args, train_dataset=shapes_dataset(16), data_collator=ConversationCollator(processor))
trainer.train()
if trainer.is_world_process_zero():
    print("RESULT" + json.dumps({"fsdp": trainer.is_fsdp_enabled,
                                 "base_block": type(trainer.model.language_model.model.layers[0]).__name__}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the Trainer's FSDP integration (accelerate) needs accelerators; on CPU accelerate runs "
                           "plain multi-process data parallelism (the fully_shard test above covers the wrap policy)")
def test_trainer_fsdp_on_accelerators(tmp_path):
    script = tmp_path / "trainer_fsdp.py"
    script.write_text(TRAINER_FSDP)
    ranks = str(min(2, torch.cuda.device_count()))
    completed = run_example(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", ranks, "--master_port",
                            "29538", str(script), str(tmp_path / "run"))
    result = json.loads(completed.stdout.split("RESULT")[-1].splitlines()[0])
    assert result["fsdp"] is True and result["base_block"].startswith("FSDP")


def test_deepspeed_zero3_trainer_trains_keeps_the_base_and_converts(tmp_path):
    """examples/train_deepspeed.py on 2 CPU ranks (DeepSpeed's CPU accelerator): the ZeRO-3 engine computes the
    unsharded model's multimodal loss, training runs, and the saved folder converts with the base byte for byte."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    run_example(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                "train_deepspeed.py", "--out", str(out), "--cpu", "--report", str(tmp_path / "report.json"),
                env_extra={"DS_ACCELERATOR": "cpu"})
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["zero_stage"] == 3
    assert len(report["losses"]) == 3 and all(torch.isfinite(torch.tensor(report["losses"])))
    hub = convert(out / "final", tmp_path / "hub", base=out / "start-base")  # refuses a base that changed
    converted = GenieBlueForConditionalGeneration.from_pretrained(hub).eval()
    probe = shapes_dataset(report["probe"]["count"], seed=report["probe"]["seed"])
    collator = ConversationCollator(GenieBlueProcessor.from_pretrained(out / "final"))
    with torch.no_grad():  # the trained weights, unsharded: the loss the ZeRO-3 engine computed
        unsharded = converted(**collator([probe[0]])).loss.item()
    assert report["multimodal_loss_zero3"] == pytest.approx(unsharded, abs=1e-5)
    start, _ = compose_tiny()
    assert state_hash(converted.language_model) == state_hash(start.language_model)
    assert state_hash(converted.lora) != state_hash(start.lora)  # it did train


def test_readme_demo_runs():
    completed = run_example(sys.executable, "quickstart.py")
    assert "text path equals the base LLM, bit for bit: True" in completed.stderr
    # the packaged demo model (genieblue_hf.demo): a tally for each path, every question printed whole and answered
    assert "image questions (multimodal path) answered correctly: 5 of 5" in completed.stderr
    assert "text questions (base LLM path) answered correctly: 4 of 4" in completed.stderr
    assert "[text]  scene: red circle, red northwest, blue triangle, blue southeast" in completed.stderr


def test_trainer_with_gradient_checkpointing_on_batches_mixing_image_and_text_rows(tiny, tmp_path):
    """A JSONL with an image conversation and a text-only one, batched together, trains with checkpointing."""
    model, processor = tiny
    base_hash = state_hash(model.language_model)
    shape_image("red", "circle").save(tmp_path / "red.png")
    lines = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
              "images": ["red.png"]},
             {"messages": [{"role": "user", "content": "the quick brown fox"},
                           {"role": "assistant", "content": "jumps over the lazy dog"}]}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    model.configure_training(stage=2)
    trainer = Trainer(model=model, args=args_for(tmp_path, steps=2, per_device_train_batch_size=2,
                                                 gradient_checkpointing=True),
                      train_dataset=ConversationDataset(tmp_path / "data.jsonl"),
                      data_collator=ConversationCollator(processor))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert state_hash(model.language_model) == base_hash


def test_qlora_example_trains_keeps_the_text_path_and_converts(tmp_path):
    """examples/finetune_qlora.py: 4-bit GenieBlue, its LoRA and PEFT adapters trained, merged, converted."""
    pytest.importorskip("bitsandbytes")
    start, processor = compose_tiny()
    start.save_pretrained(tmp_path / "start")
    processor.save_pretrained(tmp_path / "start")
    start.language_model.save_pretrained(tmp_path / "base")
    completed = run_example(sys.executable, "finetune_qlora.py", "--model", str(tmp_path / "start"), "--out",
                            str(tmp_path / "qlora"), "--steps", "2", "--batch-size", "2", "--base",
                            str(tmp_path / "base"))
    assert "text path after QLoRA equals the 4-bit base loaded alone: True" in completed.stderr
    out = convert(tmp_path / "qlora" / "merged", tmp_path / "hub", base=tmp_path / "base")
    converted = GenieBlueForConditionalGeneration.from_pretrained(out)
    assert state_hash(converted.language_model) == state_hash(start.language_model)
    assert state_hash(converted.lora) != state_hash(start.lora)  # GenieBlue's LoRA trained
    assert state_hash(converted.replicated_layers) != state_hash(start.replicated_layers)  # PEFT merged into them
