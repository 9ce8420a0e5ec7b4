"""Quick start: compose a tiny GenieBlue, ask it about an image and about text, and check the text path.

Everything is built locally (no download): a byte-level BPE tokenizer trained on a few sentences, a small Qwen2-style
base LLM and a small SigLIP tower, composed with ``GenieBlueForConditionalGeneration.from_base``. The multimodal
path is then given weights of its own (a stand-in for training), so the two paths really differ. The weights are
random, so the words are too: what the demo shows is the routing and the text path's bit-identity with the base.
"""

import logging

import torch

from genieblue_hf.synthetic import compose_tiny, shape_image


logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("quickstart")


def main():
    model, processor = compose_tiny(seed=0)
    model.eval()
    with torch.no_grad():  # stand-in for stage-2 training: LoRA and the replicated blocks get weights of their own
        for name, param in model.named_parameters():
            if name.startswith("replicated_layers.") or name.endswith("lora_B"):
                param.add_(torch.randn_like(param) * 0.05)
    config = model.config
    log.info("replicated blocks %s; LoRA rank %d on blocks %s", config.replicated_layers, config.lora_rank,
             config.lora_layers)

    def ask(content, images=None):
        messages = [{"role": "user", "content": content}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=prompt, images=images)
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        return inputs, output[:, inputs["input_ids"].shape[1]:]

    image = shape_image("red", "circle", size=32)
    _, answer = ask([{"type": "image"}, {"type": "text", "text": "what colour is the circle?"}], images=[image])
    log.info("image request     -> %r (multimodal path)", processor.batch_decode(answer, skip_special_tokens=True)[0])

    inputs, answer = ask([{"type": "text", "text": "describe the image"}])
    log.info("text-only request -> %r (base LLM)", processor.batch_decode(answer, skip_special_tokens=True)[0])

    # the base LLM as its own, separate instance of its class, holding the same weights
    base = type(model.language_model)(model.language_model.config)
    base.load_state_dict(model.language_model.state_dict())
    base_output = base.eval().generate(**inputs, max_new_tokens=8, do_sample=False)
    identical = torch.equal(answer, base_output[:, inputs["input_ids"].shape[1]:])
    log.info("text path equals the base LLM, bit for bit: %s", identical)
    if not identical:
        raise SystemExit("text path differs from the base LLM")


if __name__ == "__main__":
    main()
