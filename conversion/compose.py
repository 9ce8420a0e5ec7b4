"""``compose``: a fresh GenieBlue Hub folder from a base causal LM and a SigLIP vision tower.

This is the starting point of training: replicated blocks are copies of the base blocks and every LoRA ``B`` is
zero. The folder is written next to ``output_dir`` under a temporary name and renamed at the end, so a failure
leaves no partial output behind.
"""

import logging
import os
from pathlib import Path

from transformers import AutoTokenizer

from ..atomic import atomic_output_dir, refuse_existing
from .sources import ConversionError
from ..modeling.modeling_genieblue import GenieBlueForConditionalGeneration
from ..modeling.processing_genieblue import GenieBlueProcessor


logger = logging.getLogger(__name__)


def compose(language_model, vision_model, output_dir, overwrite=False, max_shard_size="2GB", max_tiles=6,
            **config_overrides):
    """Compose a GenieBlue model with ``from_base`` and save it to ``output_dir`` atomically; returns the model.

    When ``language_model`` is a folder with a tokenizer, a matching ``GenieBlueProcessor`` is saved too.
    """
    refuse_existing(output_dir, overwrite)
    for what, path in (("--language-model", language_model), ("--vision-model", vision_model)):
        if isinstance(path, (str, os.PathLike)) and not (Path(path) / "config.json").is_file():
            raise ConversionError(
                f"{what} {path} is not a local model folder with a config.json (download Hub models first, e.g. "
                f"`hf download org/name --local-dir DIR`)"
            )
    model = GenieBlueForConditionalGeneration.from_base(language_model, vision_model, **config_overrides)
    processor = None
    if isinstance(language_model, (str, os.PathLike)) and any(
        (Path(language_model) / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        tokenizer = AutoTokenizer.from_pretrained(language_model)
        processor = GenieBlueProcessor.for_model(model.config, tokenizer, max_tiles=max_tiles)
    with atomic_output_dir(output_dir, overwrite) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(staging)
    logger.info("composed GenieBlue (%s replicated blocks) into %s", len(model.replicated_layers), output_dir)
    return model
