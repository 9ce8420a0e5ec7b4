"""QLoRA on GenieBlue: the model loaded in 4 bits (bitsandbytes), GenieBlue's own LoRA and PEFT adapters trained.

    python examples/finetune_qlora.py --model out/stage2 --out out/qlora

Every linear layer is stored in 4-bit NF4 (bitsandbytes has a CPU backend; on GPUs the same script runs as is). The
frozen base stays the base, quantized: the text path equals the base loaded alone with the same quantization.
Trained: GenieBlue's LoRA (stage 2 of the paper) and, on top, PEFT LoRA adapters on the 4-bit vision tower,
projector and replicated blocks (``multimodal_lora_config``). The adapter is saved, applied to the unquantized model
and merged, and the merged folder is what ``genieblue convert``/``publish`` take.
"""

import logging

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer

from genieblue_hf import GenieBlueForConditionalGeneration
from genieblue_hf.synthetic import shapes_dataset
from genieblue_hf.training import ConversationCollator, multimodal_lora_config

from train_stage1 import load, parse_args, training_arguments


def four_bit():
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def main():
    parser = parse_args(stage_default_steps=10)
    parser.add_argument("--base", help="the base LLM folder, to check the text path against (default: skip)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("finetune_qlora")
    _, processor = load(args.model)
    model = GenieBlueForConditionalGeneration.from_pretrained(args.model, quantization_config=four_bit())
    model.configure_training(stage=2)  # GenieBlue's LoRA; the 4-bit weights are integers and stay frozen
    model.gradient_checkpointing_enable()
    peft_model = get_peft_model(model, multimodal_lora_config(r=4, lora_alpha=8))
    for param in model.lora.parameters():  # PEFT freezes what it did not add; GenieBlue's LoRA trains too
        param.requires_grad_(True)
    peft_model.print_trainable_parameters()
    trainer = Trainer(model=peft_model, args=training_arguments(args), train_dataset=shapes_dataset(args.samples, seed=7),
                      data_collator=ConversationCollator(processor))
    trainer.train()
    peft_model.save_pretrained(f"{args.out}/adapter")
    torch.save({k: v.detach().cpu() for k, v in model.lora.state_dict().items()}, f"{args.out}/genieblue_lora.pt")

    if args.base:
        prompt = processor(text="the quick brown fox")
        base = AutoModelForCausalLM.from_pretrained(args.base, quantization_config=four_bit()).eval()
        with torch.no_grad():
            same = torch.equal(peft_model.eval()(**prompt).logits, base(**prompt).logits)
        log.info("text path after QLoRA equals the 4-bit base loaded alone: %s", same)
        if not same:
            raise SystemExit("the text path changed")

    full = GenieBlueForConditionalGeneration.from_pretrained(args.model)  # unquantized, to merge into
    full.lora.load_state_dict(torch.load(f"{args.out}/genieblue_lora.pt", weights_only=True))
    merged = PeftModel.from_pretrained(full, f"{args.out}/adapter").merge_and_unload()
    merged.save_pretrained(f"{args.out}/merged")
    processor.save_pretrained(f"{args.out}/merged")
    log.info("merged model written to %s/merged", args.out)


if __name__ == "__main__":
    main()
