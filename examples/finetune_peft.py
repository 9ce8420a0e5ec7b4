"""Downstream fine-tuning with PEFT on top of a trained GenieBlue, without touching the text path.

    python examples/finetune_peft.py --model out/stage2 --out out/peft

``multimodal_lora_config`` resolves "all-linear" to the vision tower, projector and replicated blocks; the base LLM
is excluded (its text path stays the base bit for bit) and GenieBlue's own LoRA is left as it is. The adapter is
saved on its own, loaded back, and merged into the multimodal weights.
"""

import logging

import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer

from genieblue_hf.synthetic import shapes_dataset
from genieblue_hf.training import ConversationCollator, multimodal_lora_config

from train_stage1 import load, parse_args, training_arguments


def main():
    args = parse_args(stage_default_steps=20).parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("finetune_peft")
    model, processor = load(args.model)
    prompt = processor(text="the quick brown fox")
    with torch.no_grad():
        text_logits = model.eval()(**prompt).logits

    peft_model = get_peft_model(model, multimodal_lora_config(r=4, lora_alpha=8))
    peft_model.print_trainable_parameters()
    trainer = Trainer(model=peft_model, args=training_arguments(args), train_dataset=shapes_dataset(args.samples, seed=7),
                      data_collator=ConversationCollator(processor))
    trainer.train()
    peft_model.save_pretrained(f"{args.out}/adapter")

    base, _ = load(args.model)  # a fresh copy of the starting model
    reloaded = PeftModel.from_pretrained(base, f"{args.out}/adapter").eval()
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        same = torch.equal(merged(**prompt).logits, text_logits)
    log.info("text path after PEFT fine-tuning and merging equals the base: %s", same)
    if not same:
        raise SystemExit("the text path changed")
    merged.save_pretrained(f"{args.out}/merged")
    processor.save_pretrained(f"{args.out}/merged")


if __name__ == "__main__":
    main()
