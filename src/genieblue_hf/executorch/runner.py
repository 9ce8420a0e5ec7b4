"""Run a GenieBlue ExecuTorch program from Python (ExecuTorch's runtime bindings), routing as the model does.

A request whose prompt holds image placeholders runs ``multimodal_decoder`` (its image tiles through
``vision_encoder``, the features placed at the placeholders in order); any other runs ``text_decoder``, the base.
The route is fixed at the prompt and kept for every decode step, and each decoder keeps its own KV cache, as the
transformers model does. Decoding is greedy. The same program runs from ExecuTorch's C++ runtime
(``executorch::extension::Module``) the same way: README, "On device".
"""

import logging

import torch

from .export import METADATA, METHODS


logger = logging.getLogger(__name__)


class ExecuTorchRunner:
    """Holds a program and answers requests one at a time (batch 1, greedy).

    A method is loaded on its first use and kept: a text-only application never loads the vision encoder or the
    multimodal decoder. Loading a method makes XNNPACK pack its weights for its own use, so once both decoders are
    loaded the base is resident twice although it is stored once (ExecuTorch's Python bindings do not share packed
    weights between methods); ``preload=True`` loads every method up front."""

    def __init__(self, program_path, preload=False):
        try:
            from executorch.runtime import Runtime
        except ImportError:
            raise ImportError(
                "running ExecuTorch programs needs executorch: pip install 'genieblue-hf[executorch]'"
            ) from None
        self.program = Runtime.get().load_program(str(program_path))
        names = set(self.program.method_names)
        self.metadata = {name: self.program.load_method(name).execute([])[0] for name in METADATA if name in names}
        self.method_names = tuple(name for name in METHODS if name in names)
        if "token_embedding" not in names or not names & {"text_decoder", "multimodal_decoder"}:
            raise ValueError(f"{program_path} is not a GenieBlue program: its methods are {sorted(names)}")
        self.max_seq_len = int(self.metadata["get_max_seq_len"])
        self.image_token_id = self.metadata.get("image_token_id")
        self._loaded = {}
        if preload:
            for name in self.method_names:
                self.method(name)

    @property
    def loaded_methods(self):
        return tuple(self._loaded)

    def method(self, name):
        """The loaded method ``name`` (loaded now if this is its first use)."""
        if name not in self._loaded:
            if name not in self.method_names:
                raise ValueError(f"this program has no {name} (it has {', '.join(self.method_names)})")
            self._loaded[name] = self.program.load_method(name)
        return self._loaded[name]

    def route(self, input_ids):
        """``"multimodal"`` exactly when the prompt holds image placeholders (the model's ``route="auto"``)."""
        if self.image_token_id is not None and bool((input_ids == int(self.image_token_id)).any()):
            return "multimodal"
        return "text"

    def embed(self, input_ids, pixel_values=None):
        """The prompt's input embeddings, image features at the placeholders."""
        embeds = self.method("token_embedding").execute([input_ids])[0]
        placeholders = (input_ids == int(self.image_token_id)) if self.image_token_id is not None else None
        count = int(placeholders.sum()) if placeholders is not None else 0
        if pixel_values is None:
            if count:
                raise ValueError(f"the prompt has {count} image placeholders but no pixel_values were given")
            return embeds
        per_tile = int(self.metadata["image_tokens_per_tile"])
        if pixel_values.ndim != 4 or count != pixel_values.shape[0] * per_tile:
            raise ValueError(
                f"the prompt has {count} image placeholders but pixel_values of shape {tuple(pixel_values.shape)} "
                f"give {pixel_values.shape[0] if pixel_values.ndim == 4 else '?'} tiles of {per_tile} tokens"
            )
        vision = self.method("vision_encoder")
        features = torch.cat([vision.execute([tile[None].contiguous()])[0] for tile in pixel_values], dim=1)
        embeds = embeds.clone()
        embeds[placeholders] = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds

    def prefill(self, input_ids, pixel_values=None):
        """The prompt's logits ``(1, T, vocab)`` and the route it took (the decoder's cache then holds the prompt)."""
        input_ids = self._check_ids(input_ids)
        route = self.route(input_ids)
        embeds = self.embed(input_ids, pixel_values if route == "multimodal" else None)
        logits = self.method(f"{route}_decoder").execute([embeds, torch.arange(input_ids.shape[1])])[0]
        return logits, route

    def generate(self, input_ids, pixel_values=None, max_new_tokens=32, eos_token_id=None):
        """Greedy decoding: the prompt followed by up to ``max_new_tokens`` tokens, as a ``(1, T + n)`` tensor."""
        input_ids = self._check_ids(input_ids)
        length = input_ids.shape[1]
        if length + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) exceeds the program's "
                f"max_cache_len ({self.max_seq_len}); export with a larger --max-cache-len"
            )
        logits, route = self.prefill(input_ids, pixel_values)
        decoder, embedding = self.method(f"{route}_decoder"), self.method("token_embedding")
        tokens = [int(logits[0, -1].argmax())]
        while len(tokens) < max_new_tokens and (eos_token_id is None or tokens[-1] != eos_token_id):
            step = torch.tensor([[tokens[-1]]])
            logits = decoder.execute([embedding.execute([step])[0], torch.tensor([length + len(tokens) - 1])])[0]
            tokens.append(int(logits[0, -1].argmax()))
        return torch.cat([input_ids, torch.tensor([tokens[:max_new_tokens]])], dim=1)

    def _check_ids(self, input_ids):
        input_ids = torch.as_tensor(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be one non-empty sequence (1, T), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] >= self.max_seq_len:
            raise ValueError(f"the prompt ({input_ids.shape[1]} tokens) does not fit the program's max_cache_len "
                             f"({self.max_seq_len})")
        return input_ids.long()


__all__ = ["ExecuTorchRunner"]
