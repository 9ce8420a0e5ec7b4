"""``export_dense``: the multimodal path as a plain model, for runtimes without LoRA or block swapping.

The language model becomes the base's own class with the replicated blocks in their slots and every LoRA merged
(``W + s·B·A``, computed in float32 and cast to the weight's dtype). The result is saved as a GenieBlue folder with
``replication_strategy="dense"`` (vision tower and projector included; both routes then run the dense LM), or, with
``language_model_only``, as a plain causal-LM folder that vLLM, llama.cpp converters or ExecuTorch take as is.
"""

import copy
import logging
from pathlib import Path

import torch

from ..atomic import atomic_output_dir, refuse_existing
from .converter import require_genieblue_folder
from .side_files import copy_processor_files, copy_remote_code
from ..modeling.configuration_genieblue import DENSE, GenieBlueConfig
from ..modeling.modeling_genieblue import GenieBlueForConditionalGeneration
from ..modeling.genieblue_dispatch import find_decoder_layers, strip_dispatch
from ..modeling.genieblue_lora import merge_into


logger = logging.getLogger(__name__)


@torch.no_grad()
def dense_language_model(model):
    """A copy of ``model.language_model`` that computes the multimodal path's language part on its own."""
    dense = copy.deepcopy(model.language_model)
    strip_dispatch(dense)  # a plain model: the copy must not route like GenieBlue's base
    _, layers = find_decoder_layers(dense, model.config.text_config.num_hidden_layers)
    for index, replica in model.replicated_layers.items():
        layers[int(index)].load_state_dict(replica.state_dict())
    scaling = model.config.lora_scaling
    for index, tree in model.lora.items():
        for path, adapter in tree.adapters().items():
            linear = layers[int(index)].get_submodule(path)
            linear.weight.copy_(merge_into(linear.weight, adapter, scaling))
    return dense


def dense_model(model):
    """A GenieBlue of ``replication_strategy="dense"`` whose language model is ``dense_language_model(model)``."""
    config = GenieBlueConfig.from_dict({**model.config.to_dict(), "replication_strategy": DENSE})
    with torch.device("meta"):
        dense = GenieBlueForConditionalGeneration(config)
    dense.language_model = dense_language_model(model)
    dense.vision_tower = copy.deepcopy(model.vision_tower)
    dense.multi_modal_projector = copy.deepcopy(model.multi_modal_projector)
    dense.config.text_config = dense.language_model.config
    dense.config.vision_config = dense.vision_tower.config
    return dense.train(model.training)


def export_dense(model, out_dir, language_model_only=False, overwrite=False, max_shard_size="2GB"):
    """Write the dense export of ``model`` (an instance or a saved folder) to ``out_dir`` atomically."""
    refuse_existing(out_dir, overwrite)
    source_dir = None
    if not isinstance(model, GenieBlueForConditionalGeneration):
        source_dir = Path(model)
        require_genieblue_folder(source_dir)
        model = GenieBlueForConditionalGeneration.from_pretrained(source_dir)
    if model.config.is_dense:
        raise ValueError("the model is already a dense export")
    target = dense_language_model(model) if language_model_only else dense_model(model)
    with atomic_output_dir(out_dir, overwrite) as staging:
        target.save_pretrained(staging, max_shard_size=max_shard_size)
        if not language_model_only:  # config.auto_map names the processor's remote code too
            copy_remote_code(staging)
        copy_processor_files(source_dir, staging)  # keep the tokenizer/processor next to the weights
    logger.info("dense export (%s) written to %s", type(target).__name__, out_dir)
    return out_dir
