"""Training helpers: conversation datasets, a label-masking collator, and PEFT configs that leave the base alone.

The two-stage recipe itself is ``model.configure_training(stage)`` (in the model class, so remote-code users have it
too); everything here works with ``transformers.Trainer`` unchanged (``remove_unused_columns=False``).
"""

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .modeling.image_processing_genieblue import load_image


IGNORE_INDEX = -100


class ConversationDataset(Dataset):
    """Samples ``{"messages": [...], "images": [...]}`` from a JSONL file (or a list of such dicts).

    ``messages`` use the transformers chat format; each ``{"type": "image"}`` content item takes the next entry of
    ``images`` (a path, relative paths resolved against the JSONL's folder, or an image object). Images are opened
    when a sample is read, not when the file is loaded.
    """

    def __init__(self, source, image_root=None):
        if isinstance(source, (str, Path)):
            path = Path(source)
            self.image_root = Path(image_root) if image_root else path.parent
            self.samples = []
            with path.open() as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            self.samples.append(json.loads(line))
                        except json.JSONDecodeError as error:
                            raise ValueError(f"{path}:{number} is not valid JSON ({error})") from None
        else:
            self.image_root = Path(image_root) if image_root else None
            self.samples = list(source)
        for index, sample in enumerate(self.samples):
            if not isinstance(sample.get("messages"), list) or not sample["messages"]:
                raise ValueError(f"sample {index} has no 'messages' list")
            markers = sum(
                1 for m in sample["messages"] if isinstance(m.get("content"), list)
                for item in m["content"] if item.get("type") == "image"
            )
            if markers != len(sample.get("images", [])):
                raise ValueError(f"sample {index} has {markers} image items but {len(sample.get('images', []))} images")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        images = []
        for image in sample.get("images", []):
            if isinstance(image, str) and self.image_root is not None and not Path(image).is_absolute():
                image = self.image_root / image
            images.append(load_image(image))
        return {"messages": sample["messages"], "images": images}


class ConversationCollator:
    """Batches conversations for ``GenieBlueForConditionalGeneration``: tokens, pixels and masked labels.

    Labels keep only the assistant turns (``train_on="assistant"``) or every non-padding token (``"all"``); prompts,
    padding and image placeholders are ``-100``. Assistant spans are found by rendering the conversation up to each
    assistant turn with the processor's own chat template, so any template works.
    """

    def __init__(self, processor, train_on="assistant", max_length=None, padding_side="right"):
        if train_on not in ("assistant", "all"):
            raise ValueError(f"train_on must be 'assistant' or 'all', got {train_on!r}")
        self.processor = processor
        self.train_on = train_on
        self.max_length = max_length
        self.padding_side = padding_side

    def _length(self, messages, images, add_generation_prompt):
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        used = images[: text.count(self.processor.image_token)]
        return self.processor(text=text, images=used or None, padding=False)["input_ids"].shape[-1]

    def _assistant_spans(self, messages, images):
        spans = []
        for turn, message in enumerate(messages):
            if message["role"] == "assistant":
                start = self._length(messages[:turn], images, add_generation_prompt=True) if turn else 0
                spans.append((start, self._length(messages[: turn + 1], images, add_generation_prompt=False)))
        return spans

    def __call__(self, features):
        texts = [self.processor.apply_chat_template(f["messages"], tokenize=False) for f in features]
        images = [list(f.get("images") or []) for f in features]
        batch = self.processor(
            text=texts, images=images if any(images) else None, padding=True, padding_side=self.padding_side,
            truncation=self.max_length is not None, max_length=self.max_length,
        )
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, feature in enumerate(features):
            positions = attention_mask[row].nonzero().flatten()
            if self.train_on == "all":
                labels[row, positions] = input_ids[row, positions]
            else:
                for start, end in self._assistant_spans(feature["messages"], images[row]):
                    span = positions[start:end]
                    labels[row, span] = input_ids[row, span]
        labels[input_ids == self.processor.image_token_id] = IGNORE_INDEX
        batch["labels"] = labels
        return batch


def multimodal_lora_config(target_modules="all-linear", **kwargs):
    """A ``peft.LoraConfig`` for fine-tuning GenieBlue's multimodal path on top of its own LoRA.

    For GenieBlue, "all-linear" means the linear layers of the vision tower, the projector and the replicated
    blocks: the base LLM (``language_model``) is excluded, so the text path stays the base bit for bit, and
    GenieBlue's own LoRA (plain parameters, not ``nn.Linear``) is never wrapped. Other ``LoraConfig`` arguments
    pass through.
    """
    from peft import LoraConfig

    exclude = kwargs.pop("exclude_modules", None)
    pattern = r"language_model\..*"
    if exclude:
        pattern = f"(?:{pattern})|(?:{exclude if isinstance(exclude, str) else '|'.join(map(str, exclude))})"
    return LoraConfig(target_modules=target_modules, exclude_modules=pattern, **kwargs)


__all__ = ["ConversationDataset", "ConversationCollator", "multimodal_lora_config", "IGNORE_INDEX"]
