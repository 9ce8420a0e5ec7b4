"""GenieBlue processor: image processor + tokenizer + chat template.

Text marks each image with ``image_token`` (``"<image>"``). The processor expands every marker to exactly the number
of placeholder tokens its image needs (tiles x tokens per tile), tokenizes, and writes the model's
``image_token_id`` at those positions. The marker is a special token of the tokenizer (added if missing) so it is
always one id; the model's placeholder id may lie outside the tokenizer's vocabulary (GenieBlue's default), which is
why the processor maps it explicitly, and maps it back before decoding.

This file is Hub remote code: it imports only torch, transformers and the standard library.
"""

import re

import torch
from transformers import AddedToken
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin


# ChatML (as Qwen2-VL) with each image item rendered as the processor's marker on a line of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class GenieBlueProcessor(ProcessorMixin):
    r"""Prepares text and images for ``GenieBlueForConditionalGeneration``.

    Args:
        image_processor: a ``GenieBlueImageProcessor``.
        tokenizer: any Hugging Face tokenizer (sentencepiece or BPE). A missing pad token is set to the EOS token.
        chat_template: Jinja template; image items render as ``image_token``. Defaults to a ChatML template.
        image_token: the marker for one image in text.
        image_token_id: the model's placeholder id (``model.config.image_token_id``). Defaults to the marker's id.

    Batches are left-padded by default, as generation needs.
    """

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token="<image>",
                 image_token_id=None, **kwargs):
        if tokenizer is None or image_processor is None:
            raise ValueError("GenieBlueProcessor needs both an image_processor and a tokenizer")
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token) if image_token_id is None else image_token_id
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)

    @property
    def marker_id(self):
        """The tokenizer's id for the image marker (may differ from the model's ``image_token_id``)."""
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def for_model(cls, model_config, tokenizer, max_tiles=6, **kwargs):
        """A processor matching a ``GenieBlueConfig``: tile size, tokens per tile and placeholder id."""
        from .image_processing_genieblue import GenieBlueImageProcessor

        image_processor = GenieBlueImageProcessor.from_model_config(model_config, max_tiles=max_tiles)
        return cls(image_processor, tokenizer, image_token_id=model_config.image_token_id, **kwargs)

    # -- inputs ---------------------------------------------------------------------------------------------------
    def _images_per_text(self, images, texts, counts):
        """Group ``images`` by text row; a flat list is consumed in marker order."""
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        nested = bool(images) and all(isinstance(item, (list, tuple)) for item in images)
        if nested:
            if len(images) != len(texts):
                raise ValueError(f"images has {len(images)} per-sample lists but text has {len(texts)} samples")
            for row, (row_images, count) in enumerate(zip(images, counts)):
                if len(row_images) != count:
                    raise ValueError(
                        f"sample {row} has {count} image markers ({self.image_token!r}) but {len(row_images)} images"
                    )
            return [list(row) for row in images]
        if sum(counts) != len(images):
            raise ValueError(
                f"text holds {sum(counts)} image markers ({self.image_token!r}; per sample: {counts}) but "
                f"{len(images)} images were given"
            )
        grouped, start = [], 0
        for count in counts:
            grouped.append(list(images[start : start + count]))
            start += count
        return grouped

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True, padding_side="left", **kwargs):
        """Tokenize ``text`` with each image marker expanded to its placeholder tokens; process ``images``.

        Returns ``input_ids``, ``attention_mask`` and (when there are images) ``pixel_values``: every key is one the
        model's ``forward`` and ``generate`` take.
        """
        if text is None:
            raise ValueError(
                "text is required; images given without text need a prompt with one "
                f"{self.image_token!r} per image (or use apply_chat_template)"
                if images is not None
                else "text is required"
            )
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or any(not isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a non-empty list of strings")
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise ValueError(f"text is empty for samples {empty}")
        counts = [t.count(self.image_token) for t in texts]
        grouped = self._images_per_text(images, texts, counts)
        flat_images = [image for row in grouped for image in row]
        image_inputs = self.image_processor(flat_images) if flat_images else None

        expanded = texts
        if image_inputs is not None:
            tiles = iter(image_inputs["num_tiles"])
            per_tile = self.image_processor.image_tokens_per_tile
            marker = re.escape(self.image_token)
            expanded = [re.sub(marker, lambda _: self.image_token * (next(tiles) * per_tile), t) for t in texts]
        encoding = self.tokenizer(
            expanded, padding=padding, padding_side=padding_side, return_tensors=return_tensors, **kwargs
        )
        input_ids = encoding["input_ids"]
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError("GenieBlueProcessor returns torch tensors only (return_tensors='pt')")
        expected = [
            sum(n for n in image_inputs["num_tiles"][sum(counts[:row]) : sum(counts[: row + 1])])
            * self.image_processor.image_tokens_per_tile
            if image_inputs is not None
            else 0
            for row in range(len(texts))
        ]
        found = (input_ids == self.marker_id).sum(-1).tolist()
        if found != expected:
            raise ValueError(
                f"image placeholders per sample after tokenization are {found}, expected {expected}: truncation "
                f"(max_length) cut into an image, or the tokenizer splits {self.image_token!r}"
            )
        encoding["input_ids"] = input_ids.masked_fill(input_ids == self.marker_id, self.image_token_id)
        data = dict(encoding)
        if image_inputs is not None:
            data["pixel_values"] = image_inputs["pixel_values"]
        return BatchFeature(data=data, tensor_type=None)

    # -- outputs --------------------------------------------------------------------------------------------------
    def _to_tokenizer_ids(self, ids):
        ids = torch.as_tensor(ids)
        return ids.masked_fill(ids == self.image_token_id, self.marker_id)

    def batch_decode(self, sequences, **kwargs):
        """``tokenizer.batch_decode`` after mapping the model's placeholder id back to the marker."""
        return self.tokenizer.batch_decode(self._to_tokenizer_ids(sequences).tolist(), **kwargs)

    def decode(self, sequence, **kwargs):
        return self.tokenizer.decode(self._to_tokenizer_ids(sequence).tolist(), **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


GenieBlueProcessor.register_for_auto_class()

__all__ = ["GenieBlueProcessor"]
