"""One small training loop and one exact-match evaluator, shared by every stage and variant of the miniature.

A plain loop rather than ``transformers.Trainer``: the miniature trains dozens of sub-minute runs and interleaves
text and image batches with a route per batch; the Trainer path itself is covered by the package's training tests
and examples.
"""

import logging

import torch
from huggingface_hub.utils import tqdm
from transformers import get_constant_schedule, get_cosine_schedule_with_warmup

from genieblue_hf.training import IGNORE_INDEX


logger = logging.getLogger(__name__)


def batches_of(collator, samples, batch_size):
    """The samples collated into fixed batches once (every variant then sees the same batches in the same order)."""
    return [collator(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


def _call(model, inputs, kwargs):
    """The default ``forward`` of ``train`` and ``exact_match``: the model called as it is."""
    return model(**inputs, **kwargs)


def _model_inputs(batch):
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values", "labels")}


def train(model, schedule, learning_rate, desc, forward=None, warmup_fraction=0.05, constant_lr=False):
    """AdamW over the parameters that require grad, cosine schedule with warm-up (or a constant learning rate);
    ``schedule`` is a list of ``(batch, kwargs)``.

    ``forward(model, inputs, kwargs)`` runs one batch (default: ``model(**inputs, **kwargs)``), so a variant can wrap
    the call (the visual-expert mask). Returns the mean loss of the last tenth of the steps.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{desc}: nothing to train (no parameter requires grad)")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    steps = len(schedule)
    if constant_lr:
        scheduler = get_constant_schedule(optimizer)
    else:
        scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, int(steps * warmup_fraction)), steps)
    forward = forward or _call
    model.train()
    tail = []
    for step, (batch, kwargs) in enumerate(tqdm(schedule, desc=desc, leave=False)):
        loss = forward(model, _model_inputs(batch), kwargs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
    model.eval()
    final = sum(tail) / len(tail)
    logger.info("%s: %d steps, final loss %.3f", desc, steps, final)
    return final


@torch.no_grad()
def exact_match(model, batches, stop_token_id, forward=None, **kwargs):
    """Per-sample exact match of greedy decoding, computed in one teacher-forced forward per batch.

    Greedy decoding reproduces the reference answer up to its end-of-turn token ``stop_token_id`` exactly when
    every one of those tokens is the argmax given the reference prefix, so the two are the same test; this one
    needs no ``generate`` loop. Returns a bool tensor, one entry per sample.
    """
    forward = forward or _call
    model.eval()
    results = []
    for batch in batches:
        inputs = {k: v for k, v in _model_inputs(batch).items() if k != "labels"}
        logits = forward(model, inputs, kwargs).logits
        labels = batch["labels"]
        predicted = logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        stops = target == stop_token_id
        after_stop = (stops.cumsum(-1) - stops.long()) > 0
        scored = (target != IGNORE_INDEX) & ~after_stop
        results.append(((predicted == target) | ~scored).all(-1))
    return torch.cat(results)


def accuracy_by_kind(correct, kinds):
    """``{kind: accuracy}`` from per-sample ``correct`` and each sample's kind, kinds in first-seen order."""
    return {kind: correct[[k == kind for k in kinds]].float().mean().item() for kind in dict.fromkeys(kinds)}
