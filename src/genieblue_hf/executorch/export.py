"""GenieBlue as one ExecuTorch program: both decoders over one copy of the base weights, lowered with XNNPACK.

Methods (``METHODS``):
- ``vision_encoder``: one image tile ``(1, C, S, S)`` -> its projected features ``(1, tokens_per_tile, hidden)``;
- ``token_embedding``: token ids ``(1, T)`` -> base embeddings ``(1, T, hidden)`` (image placeholders read row 0;
  the runner puts the image features there);
- ``text_decoder``: the base LLM, ``(embeddings (1, T, hidden), positions (T,)) -> logits (1, T, vocab)``;
- ``multimodal_decoder``: the same, with the replicated blocks in their slots and LoRA on the other blocks' linears
  (unmerged, ``W x + s·B(A x)``, so that it reads the very same ``W``).

Each decoder holds its own static KV cache (mutable buffers, ``max_cache_len`` positions), built by transformers'
static-cache export recipe. Constant methods carry what a runner needs (``METADATA``).

The base weights are stored once: XNNPACK puts every constant in the program's named data map under the SHA-256 of
its bytes, so a base linear that both decoders read is one entry (the storage benchmark checks it against the base
alone). This holds for quantized programs too, because the base is quantized deterministically.
"""

import copy
import logging

import torch
from torch import nn

from ..modeling.genieblue_compat import one_cache
from ..modeling.modeling_genieblue import GenieBlueForConditionalGeneration, _floating_dtype


logger = logging.getLogger(__name__)

METHODS = ("vision_encoder", "token_embedding", "text_decoder", "multimodal_decoder")
# Constant methods: ExecuTorch's LLM runners read ``get_max_seq_len``, ``get_vocab_size`` and ``use_kv_cache``;
# the rest are GenieBlue's.
METADATA = ("get_max_seq_len", "get_vocab_size", "use_kv_cache", "image_token_id", "image_tokens_per_tile",
            "image_size", "hidden_size")
DEFAULT_MAX_CACHE_LEN = 1024
PROGRAM_FILE = "model.pte"
QUANTIZATION_SCHEMES = ("paper",)


def require_executorch():
    try:
        import executorch.exir  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except ImportError:
        raise ImportError(
            "ExecuTorch export needs executorch: pip install 'genieblue-hf[executorch]' (or pip install executorch)"
        ) from None


class StaticCacheDecoder(nn.Module):
    """transformers' static-cache export recipe around one decoder (``DecoderForExport``), with the cache tensors
    handed to the recipe's cache object from this module's buffers at every call.

    Why: torch.export's non-strict tracing substitutes the tensors it reaches as module attributes; the recipe's
    ``StaticCache`` keeps its own references to the same tensors, which tracing captured as constants aliasing the
    buffers, and lowering then failed ("expected compiled_fn to be GraphModule").
    """

    # StaticCache layer attribute -> the buffer name the recipe registers it under (``cumulative_length`` from 5.24)
    _CACHE_BUFFERS = {"keys": "key_cache_{}", "values": "value_cache_{}", "cumulative_length": "cumulative_length_{}"}

    def __init__(self, decoder, max_cache_len):
        super().__init__()
        from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

        self.recipe = TorchExportableModuleWithStaticCache(decoder, batch_size=1, max_cache_len=max_cache_len)

    def forward(self, inputs_embeds, cache_position):
        recipe = self.recipe
        for index, layer in enumerate(recipe.static_cache.layers):
            for attribute, name in self._CACHE_BUFFERS.items():
                buffer = getattr(recipe, name.format(index), None)
                if buffer is not None:
                    setattr(layer, attribute, buffer)
        return recipe(inputs_embeds=inputs_embeds, cache_position=cache_position)


class DecoderForExport(nn.Module):
    """One decoder as the export recipe takes a model: a causal LM over input embeddings with a text config, a
    static-cache generation config, a dtype and a device.

    ``model`` is a GenieBlue (``multimodal`` picks its path) or any causal LM (the base alone, a dense export)."""

    def __init__(self, model, multimodal=False):
        super().__init__()
        from transformers import GenerationConfig

        self.model = model
        self.multimodal = multimodal
        genieblue = isinstance(model, GenieBlueForConditionalGeneration)
        if multimodal and not genieblue:
            raise ValueError("the multimodal decoder is a GenieBlue model's")
        self.language_model = model.language_model if genieblue else model
        self.config = self.language_model.config
        self.generation_config = GenerationConfig(use_cache=True, cache_implementation="static")

    @property
    def dtype(self):
        return self.language_model.dtype

    @property
    def device(self):
        return self.language_model.device

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        if not self.multimodal:
            return self.language_model(inputs_embeds=inputs_embeds, **kwargs)
        # The multimodal path itself (replicas, LoRA, placeholder logits masked), without the per-row routing, which
        # reads tensor values that export cannot trace.
        cache = one_cache(kwargs.pop("cache", None), kwargs.pop("past_key_values", None))
        return self.model._multimodal_forward(None, None, inputs_embeds, cache, **kwargs)


class TokenEmbedding(nn.Module):
    """The base's input embeddings; an image placeholder reads row 0 (out-of-vocabulary ids would fail)."""

    def __init__(self, embedding, image_token_id=None):
        super().__init__()
        self.embedding = embedding
        self.image_token_id = image_token_id

    def forward(self, input_ids):
        if self.image_token_id is not None:
            input_ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return self.embedding(input_ids)


class VisionEncoder(nn.Module):
    """Vision tower and projector: one tile to its projected image features."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.get_image_features(pixel_values).pooler_output


def _decoder_program(model, max_cache_len, multimodal=False):
    hidden = model.config.get_text_config().hidden_size
    length = torch.export.Dim("tokens", min=1, max=max_cache_len - 1)
    dtype = _floating_dtype(model, torch.float32)
    example = (torch.zeros(1, 2, hidden, dtype=dtype), torch.arange(2))
    decoder = StaticCacheDecoder(DecoderForExport(model, multimodal), max_cache_len)
    return torch.export.export(decoder, example, dynamic_shapes=({1: length}, {0: length}), strict=False)


def _embedding_program(language_model, image_token_id=None):
    length = torch.export.Dim("tokens", min=1, max=1 << 16)
    embedding = TokenEmbedding(language_model.get_input_embeddings(), image_token_id)
    return torch.export.export(embedding, (torch.zeros(1, 2, dtype=torch.long),), dynamic_shapes=({1: length},),
                               strict=False)


def _vision_program(model):
    config = model.config
    channels = getattr(config.vision_config, "num_channels", 3)
    size = config.vision_image_size
    pixels = torch.zeros(1, channels, size, size, dtype=_floating_dtype(model.vision_tower, torch.float32))
    return torch.export.export(VisionEncoder(model), (pixels,), strict=False)


def _metadata(language_model, max_cache_len, genieblue=None):
    text_config = language_model.config
    metadata = {
        "get_max_seq_len": max_cache_len,
        "get_vocab_size": text_config.vocab_size,
        "use_kv_cache": True,
        "hidden_size": text_config.hidden_size,
    }
    if genieblue is not None:
        metadata.update(
            image_token_id=genieblue.config.image_token_id,
            image_tokens_per_tile=genieblue.config.image_tokens_per_tile,
            image_size=genieblue.config.vision_image_size,
        )
    return metadata


def _prepared(model, quantize):
    """A frozen, evaluation-mode copy to export (quantized if asked); the caller's model is left as it was."""
    if quantize is not None and quantize not in QUANTIZATION_SCHEMES:
        raise ValueError(f"quantize must be one of {QUANTIZATION_SCHEMES} or None, got {quantize!r}")
    model = copy.deepcopy(model).eval().requires_grad_(False)
    if quantize == "paper":
        from ..quantization import quantize_language_model, quantize_like_paper

        if isinstance(model, GenieBlueForConditionalGeneration):
            quantize_like_paper(model, activations="int8-dynamic")
        else:
            quantize_language_model(model, activations="int8-dynamic")
    return model


def genieblue_programs(model, max_cache_len=DEFAULT_MAX_CACHE_LEN, quantize=None):
    """``{method: ExportedProgram}`` and the constant methods of a GenieBlue program (``METHODS``)."""
    if not isinstance(model, GenieBlueForConditionalGeneration):
        raise ValueError(f"expected a GenieBlueForConditionalGeneration, got {type(model).__name__}")
    if model.config.is_dense:
        raise ValueError("this is a dense export (one decoder); export it with language_model_programs")
    model = _prepared(model, quantize)
    with torch.no_grad():
        programs = {
            "vision_encoder": _vision_program(model),
            "token_embedding": _embedding_program(model.language_model, model.config.image_token_id),
            "text_decoder": _decoder_program(model.language_model, max_cache_len),
            "multimodal_decoder": _decoder_program(model, max_cache_len, multimodal=True),
        }
    return programs, _metadata(model.language_model, max_cache_len, model)


def language_model_programs(language_model, max_cache_len=DEFAULT_MAX_CACHE_LEN, quantize=None, vision_of=None):
    """The same pipeline for a causal LM alone (``token_embedding`` and ``text_decoder``): the base-only program a
    GenieBlue program's text path is compared with. With ``vision_of`` (a dense GenieBlue export, whose language
    model is then the one exported) its ``vision_encoder`` and ``multimodal_decoder``: the dense multimodal
    program a GenieBlue program's storage is compared with."""
    if vision_of is not None:
        vision_of = _prepared(vision_of, quantize)
        language_model = vision_of.language_model
    else:
        language_model = _prepared(language_model, quantize)
    decoder = "text_decoder" if vision_of is None else "multimodal_decoder"
    with torch.no_grad():
        programs = {
            "token_embedding": _embedding_program(
                language_model, None if vision_of is None else vision_of.config.image_token_id
            ),
            decoder: _decoder_program(language_model, max_cache_len),
        }
        if vision_of is not None:
            programs["vision_encoder"] = _vision_program(vision_of)
    return programs, _metadata(language_model, max_cache_len, vision_of)


def lower(programs, metadata):
    """Lower exported methods with XNNPACK into one ExecuTorch program (``ExecutorchProgramManager``)."""
    require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    logger.info("lowering %s with XNNPACK", ", ".join(programs))
    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()], constant_methods=metadata)
    return edge.to_executorch()


def export_executorch(model, out_dir, max_cache_len=DEFAULT_MAX_CACHE_LEN, quantize=None, overwrite=False):
    """Write ``out_dir/model.pte`` (``METHODS``) and the model's tokenizer/processor files, atomically.

    ``model`` is a GenieBlue instance or a saved folder; ``quantize="paper"``: int4 LLM and replicated blocks
    (group 32), int8 vision tower, projector and LoRA, with int8 dynamic activations (XNNPACK's integer kernels)."""
    from ..atomic import atomic_output_dir, refuse_existing
    from ..conversion.converter import require_genieblue_folder
    from ..conversion.side_files import copy_processor_files

    require_executorch()
    refuse_existing(out_dir, overwrite)
    if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 2:
        raise ValueError(f"max_cache_len must be an integer of at least 2, got {max_cache_len!r}")
    source_dir = None
    if not isinstance(model, GenieBlueForConditionalGeneration):
        from pathlib import Path

        source_dir = Path(model)
        require_genieblue_folder(source_dir)
        model = GenieBlueForConditionalGeneration.from_pretrained(source_dir)
    limit = getattr(model.config.text_config, "max_position_embeddings", None)
    if limit is not None and max_cache_len > limit:
        raise ValueError(f"max_cache_len {max_cache_len} exceeds the base's max_position_embeddings ({limit})")
    programs, metadata = genieblue_programs(model, max_cache_len, quantize)
    program = lower(programs, metadata)
    with atomic_output_dir(out_dir, overwrite) as staging:
        with open(staging / PROGRAM_FILE, "wb") as file:
            program.write_to_file(file)
        copy_processor_files(source_dir, staging)
    logger.info("ExecuTorch program (%s) written to %s", ", ".join(METHODS), out_dir)
    return out_dir


__all__ = [
    "METHODS", "METADATA", "PROGRAM_FILE", "export_executorch", "genieblue_programs", "language_model_programs",
    "lower",
]
