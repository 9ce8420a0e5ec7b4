"""Quick start: ask the packaged demo GenieBlue about an image it has never seen, and about text.

The demo model (``genieblue_hf.demo``, ~2 MB) is the GenieBlue-Skip model trained by ``genieblue bench paper``: a
tiny base LLM that knows made-up facts, single-digit sums and questions about scenes described in words, plus a
multimodal path trained to answer those questions about images of coloured shapes. Nothing is downloaded.

The image request runs the multimodal path (replicated blocks + LoRA); the text requests run the base LLM, and the
demo checks, bit for bit, that they answer exactly as a separate instance of the base does.
"""

import logging
import random

import torch

from genieblue_hf.demo import load_demo_model
from genieblue_paper import tasks


logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("quickstart")
MAX_NEW_TOKENS = 12  # the longest answer ("the yellow one is a triangle") and its end-of-turn token


def ask(model, processor, question, image=None):
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image"})
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    inputs = processor(text=prompt, images=None if image is None else [image])
    output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return inputs, new_tokens, processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()


def main():
    model, processor = load_demo_model()
    config = model.config
    log.info("demo GenieBlue: replicated blocks %s, LoRA rank %d on blocks %s", config.replicated_layers,
             config.lora_rank, config.lora_layers)

    rng = random.Random(7)
    scene = [("red", "circle", "northwest"), ("blue", "triangle", "southeast"), ("yellow", "square", "northeast")]
    image = tasks.render_scene(scene, seed=7)
    log.info("a generated 32x32 image showing: %s", tasks.describe_scene(scene)[len("scene: "):])
    right = 0
    questions = [tasks.scene_question(scene, kind, rng) for kind in tasks.QUESTION_KINDS]
    for question, expected in questions:
        answer = ask(model, processor, question, image)[2]
        right += answer == expected
        log.info("[image] %s\n        -> %r (expected %r)", question, answer, expected)
    log.info("image questions (multimodal path) answered correctly: %d of %d", right, len(questions))

    # the base LLM as its own, separate instance of its class, holding the same weights
    base = type(model.language_model)(model.language_model.config)
    base.load_state_dict(model.language_model.state_dict())
    base.eval()
    identical, right = True, 0
    text_questions = [("what is 3 plus 4?", "7"), ("where does zubo live?", tasks.facts()["zubo"]),
                      (tasks.describe_scene(scene) + " where is the blue shape?", "the blue shape is southeast"),
                      (tasks.describe_scene(scene) + " what colour is the circle?", "the circle is red")]
    for question, expected in text_questions:
        inputs, new_tokens, answer = ask(model, processor, question)
        base_output = base.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        base_tokens = base_output[:, inputs["input_ids"].shape[1]:]
        same = torch.equal(new_tokens, base_tokens)
        identical &= same
        right += answer == expected
        log.info("[text]  %s\n        -> %r (expected %r; same tokens as the separate base: %s)",
                 question, answer, expected, same)
    log.info("text questions (base LLM path) answered correctly: %d of %d", right, len(text_questions))
    log.info("text path equals the base LLM, bit for bit: %s", identical)
    if not identical:
        raise SystemExit("text path differs from the base LLM")


if __name__ == "__main__":
    main()
