"""Stage 2 of GenieBlue training: vision tower, projector, replicated blocks and LoRA learn; the base stays frozen.

    python examples/train_stage2.py --model out/stage1 --out out/stage2
    torchrun --nproc_per_node 2 examples/train_stage2.py --out out/stage2          # DDP (gloo on CPU)
    python examples/train_stage2.py --model out/stage2 --out out/stage2b           # continue stage 2 on new data

Checkpoints (``--save-steps``) are Trainer folders that ``genieblue convert`` turns into Hub folders;
``--resume`` continues from the last one.
"""

import logging

from transformers import Trainer

from genieblue_hf.synthetic import shapes_dataset
from genieblue_hf.training import ConversationCollator

from train_stage1 import finish, load, parse_args, training_arguments


def main():
    parser = parse_args(stage_default_steps=40)
    parser.add_argument("--save-steps", type=int, default=0, help="save a checkpoint every N steps (0: only at the end)")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=1, help="data seed (use another one to continue on new data)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, processor = load(args.model)
    model.configure_training(stage=2)
    extra = dict(gradient_checkpointing=True) if args.gradient_checkpointing else {}
    if args.save_steps:
        extra.update(save_strategy="steps", save_steps=args.save_steps)
    trainer = Trainer(model=model, args=training_arguments(args, **extra),
                      train_dataset=shapes_dataset(args.samples, seed=args.seed),
                      data_collator=ConversationCollator(processor))
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(args.out)
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.out)
    finish(trainer)


if __name__ == "__main__":
    main()
