"""Stage 1 of GenieBlue training: only the projector learns (vision tower and base LLM frozen).

    python examples/train_stage1.py --out out/stage1            # composes a tiny model, trains on generated images
    python examples/train_stage1.py --model path/to/composed --out out/stage1 --steps 1000

The data is a generated "what colour is the shape?" set (``genieblue_hf.synthetic``); swap in
``ConversationDataset("data.jsonl")`` for real conversations.
"""

import argparse
import logging
import os

import torch
from transformers import Trainer, TrainingArguments

from genieblue_hf import GenieBlueForConditionalGeneration, GenieBlueProcessor
from genieblue_hf.synthetic import compose_tiny, shapes_dataset
from genieblue_hf.training import ConversationCollator


def parse_args(stage_default_steps):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved GenieBlue folder (default: compose a tiny one)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=stage_default_steps)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=96)
    return parser


def load(model_path):
    if model_path:
        return (GenieBlueForConditionalGeneration.from_pretrained(model_path),
                GenieBlueProcessor.from_pretrained(model_path))
    return compose_tiny()


def training_arguments(args, **overrides):
    cuda = torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    values = dict(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, logging_steps=max(1, args.steps // 5), save_strategy="no", report_to=[],
        remove_unused_columns=False, use_cpu=not cuda, bf16=cuda, ddp_backend="gloo" if distributed and not cuda else None,
        dataloader_num_workers=0, seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def finish(trainer):
    """End a Trainer run cleanly on every rank: wait for the others, then tear the process group down.

    Left to interpreter exit, a gloo process group can be destroyed while its threads still run, and that rank
    aborts ("terminate called without an active exception") after its work is saved."""
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def main():
    args = parse_args(stage_default_steps=30).parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, processor = load(args.model)
    model.configure_training(stage=1)
    trainer = Trainer(model=model, args=training_arguments(args), train_dataset=shapes_dataset(args.samples),
                      data_collator=ConversationCollator(processor))
    trainer.train()
    trainer.save_model(args.out)
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.out)
    finish(trainer)


if __name__ == "__main__":
    main()
