"""The miniature's starting point: a tokenizer, a base LLM that has learnt the text task, and a vision tower that
has learnt to see the scenes (the stand-ins for Qwen2.5/BlueLM and a pretrained SigLIP)."""

import logging
import random

import torch
from huggingface_hub.utils import tqdm
from torch import nn

from genieblue_hf.synthetic import build_bpe_tokenizer, tiny_base, tiny_vision_tower
from genieblue_hf.training import IGNORE_INDEX
from . import tasks
from .loop import batches_of, train


logger = logging.getLogger(__name__)


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the miniature's corpus (deterministic)."""
    return build_bpe_tokenizer(tasks.corpus(), vocab_size=512)


def new_base(tokenizer, hidden_size=64, num_layers=8, seed=0):
    """A randomly initialised Qwen2-style decoder; 8 blocks, so Pre, Post and Skip place their 2 copies apart."""
    return tiny_base(
        "qwen2", seed, hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        bos_token_id=None, tie_word_embeddings=True,
    )


def new_vision_tower(seed=0, hidden_size=64):
    """A 2-layer SigLIP tower over 32x32 images in 4x4 patches (an 8x8 grid; the projector merges 4x4 of them into
    one image token per quadrant)."""
    return tiny_vision_tower(
        seed, hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=2, num_attention_heads=2,
        image_size=tasks.IMAGE_SIZE, patch_size=4,
    )


COPYING_TOKEN_IDS = (200, 400)  # ordinary BPE merges of the miniature's 480-token vocabulary, none special or added
COPYING_SEPARATOR = "#"  # between a string and its repeat


def copying_batches(steps, batch_size, separator_id, length=8, seed=0):
    """Random strings of ``length`` tokens, a separator, then the same string again, the loss on the repeat."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        string = torch.randint(*COPYING_TOKEN_IDS, (batch_size, length), generator=generator)
        input_ids = torch.cat([string, torch.full((batch_size, 1), separator_id), string], dim=1)
        labels = input_ids.clone()
        labels[:, : length + 1] = IGNORE_INDEX
        batches.append({"input_ids": input_ids, "labels": labels})
    return batches


def learn_copying(base, steps, batch_size, learning_rate, separator_id, seed=0):
    """Teach the fresh base to copy (``copying_batches``); returns the mean loss of the last tenth of the steps.

    The generic pretraining every real LLM has had: copying from the context ("induction heads") is what the scene
    questions build on, and without it the miniature's base answered them at the level of naming any object of the
    scene. A constant learning rate with its own optimizer, because under the text task's warm-up and cosine
    schedule the copying was not learnt (docs/paper_in_miniature.md)."""
    batches = copying_batches(steps, batch_size, separator_id, seed=seed)

    def forward(model, inputs, _kwargs):  # every row is full: no attention mask
        return model(input_ids=inputs["input_ids"], labels=inputs["labels"])

    base.requires_grad_(True)
    return train(base, [(batch, {}) for batch in batches], learning_rate, desc="base LLM copying", forward=forward,
                 constant_lr=True)


def pretrain_base(base, collator, steps, batch_size, learning_rate, reading_share, copying_steps=0, seed=0):
    """Teach the base LLM to copy (``copying_steps``), then the text task (chat-formatted, answers only in the
    loss), then freeze it."""
    samples = tasks.text_train_samples(steps * batch_size, seed=seed, reading_share=reading_share)
    batches = batches_of(collator, samples, batch_size)
    base.requires_grad_(True)

    def forward(model, inputs, _kwargs):
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"])

    if copying_steps:
        learn_copying(base, copying_steps, batch_size, learning_rate,
                      separator_id=collator.processor.tokenizer.convert_tokens_to_ids(COPYING_SEPARATOR), seed=seed)
    schedule = [(batch, {}) for batch in batches]
    train(base, schedule, learning_rate, desc="base LLM on the text task", forward=forward)
    return base.requires_grad_(False).eval()


class _QuadrantProbe(nn.Module):
    """Reads each quadrant's colour and shape off the mean of its patch features (the vision pretraining task)."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower
        grid = tower.config.image_size // tower.config.patch_size
        quadrant = torch.zeros(4, grid, grid)
        half = grid // 2
        for index, (row, column) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            quadrant[index, row * half : (row + 1) * half, column * half : (column + 1) * half] = 1 / half**2
        self.register_buffer("pool", quadrant.flatten(1), persistent=False)
        self.colour = nn.Linear(tower.config.hidden_size, len(tasks.COLOURS) + 1)
        self.shape = nn.Linear(tower.config.hidden_size, len(tasks.SHAPES) + 1)

    def forward(self, pixel_values):
        features = self.tower(pixel_values=pixel_values).last_hidden_state  # (batch, patches, hidden)
        pooled = torch.einsum("qp,bph->bqh", self.pool, features)
        return self.colour(pooled), self.shape(pooled)


def pretrain_vision(tower, image_processor, steps, batch_size, learning_rate, seed=0):
    """Train the tower to tell each quadrant's colour and shape (or emptiness), as SigLIP arrives pretrained."""
    rng = random.Random(seed)
    colours, shapes = ["none", *sorted(tasks.COLOURS)], ["none", *tasks.SHAPES]
    probe = _QuadrantProbe(tower)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    probe.train()
    for _ in tqdm(range(steps), desc="vision tower on the scenes", leave=False):
        scenes = [tasks.random_scene(rng) for _ in range(batch_size)]
        images = [tasks.render_scene(scene, seed=rng.randrange(2**31)) for scene in scenes]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        colour_target = torch.zeros(batch_size, 4, dtype=torch.long)
        shape_target = torch.zeros(batch_size, 4, dtype=torch.long)
        for row, scene in enumerate(scenes):
            for colour, shape, quadrant in scene:
                colour_target[row, tasks.QUADRANTS.index(quadrant)] = colours.index(colour)
                shape_target[row, tasks.QUADRANTS.index(quadrant)] = shapes.index(shape)
        colour_logits, shape_logits = probe(pixel_values)
        loss = loss_fn(colour_logits.flatten(0, 1), colour_target.flatten()) + loss_fn(
            shape_logits.flatten(0, 1), shape_target.flatten()
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    accuracy = ((colour_logits.argmax(-1) == colour_target) & (shape_logits.argmax(-1) == shape_target)).float().mean()
    logger.info("vision pretraining: final loss %.3f, quadrant accuracy on the last batch %.2f", loss.item(), accuracy)
    return tower.eval()
