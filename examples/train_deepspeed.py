"""Stage-2 training with the Trainer's DeepSpeed ZeRO-3 integration (parameters, gradients and optimizer state
partitioned across ranks).

    torchrun --nproc_per_node 2 examples/train_deepspeed.py --out out/zero3          # GPUs
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/train_deepspeed.py --out out/zero3 --cpu
    genieblue convert out/zero3/final out/zero3-hub --base out/zero3/start-base

Install ``deepspeed`` first (``pip install genieblue-hf[deepspeed]``). ZeRO-3 gathers a module's parameters in
hooks around its forward; GenieBlue's multimodal path calls the base's own modules, the replicated blocks and the
LoRA adapters as modules, so every hook fires on both paths. ``stage3_gather_16bit_weights_on_model_save`` makes
``save_model`` write whole tensors, a Trainer folder that ``genieblue convert`` reads (it checks the frozen base
against the original byte for byte).

With ``--report FILE``, rank 0 writes the losses of the training steps and, after training, the multimodal loss of
one probe sample through the ZeRO-3 engine (the tests compare it with the saved, unsharded model on that sample).
"""

import argparse
import json
import logging
import os

import torch
from transformers import Trainer, TrainingArguments

from genieblue_hf.synthetic import compose_tiny, shapes_dataset
from genieblue_hf.training import ConversationCollator

from train_stage1 import finish

PROBE_SEED = 99
ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (with DS_ACCELERATOR=cpu)")
    parser.add_argument("--report", help="write the checks as JSON here (rank 0)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, processor = compose_tiny()  # built before TrainingArguments switches on ZeRO-3's partitioned init
    if int(os.environ.get("RANK", "0")) == 0:
        model.language_model.save_pretrained(f"{args.out}/start-base")  # the base as it must stay
    model.configure_training(stage=2)
    collator = ConversationCollator(processor)
    probe = shapes_dataset(1, seed=PROBE_SEED)  # one sample: every rank evaluates it, whatever the world size

    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        learning_rate=1e-3, deepspeed=ZERO3, use_cpu=args.cpu, report_to=[], remove_unused_columns=False,
        save_strategy="no", logging_steps=1,
    )
    trainer = Trainer(model=model, args=training, train_dataset=shapes_dataset(16, seed=3), eval_dataset=probe,
                      data_collator=collator)
    trainer.train()
    sharded = trainer.evaluate()["eval_loss"]  # the probe through the ZeRO-3 engine (partitioned weights)
    trainer.save_model(f"{args.out}/final")  # whole tensors, gathered from every rank
    if trainer.is_world_process_zero():
        processor.save_pretrained(f"{args.out}/final")
        report = {"multimodal_loss_zero3": sharded, "probe": {"count": 1, "seed": PROBE_SEED},
                  "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
                  "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]}
        logging.getLogger("train_deepspeed").info("%s", report)
        if args.report:
            with open(args.report, "w") as f:
                json.dump(report, f)
    finish(trainer)


if __name__ == "__main__":
    main()
