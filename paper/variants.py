"""The training variants the paper compares (Tables 3-6), each built from the same GenieBlue model class.

==================  =========================================================================================
Full-Finetune       ``replication_strategy="dense"`` and ``configure_training(shared_base=True)``: the whole LLM
                    trains, so text requests run the fine-tuned LLM (there is no untouched base to fall back on).
LoRA                ``replication_strategy=[]``: LoRA on every block, nothing replicated.
CogVLM-Skip         GenieBlue-Skip whose replicated blocks become CogVLM visual experts (below).
GenieBlue-Post/Pre  the last / first quarter of the blocks replicated, LoRA on the rest.
GenieBlue-Skip      one block in every four replicated (the package default), LoRA on the rest.
==================  =========================================================================================

CogVLM's visual expert (Wang et al., 2023) gives a block trainable copies of its attention and MLP weights used
for *image* tokens only; text tokens in the same sequence keep the original weights, and the layer norms are the
original ones. The paper's CogVLM-Skip puts experts on the same blocks as GenieBlue-Skip and LoRA on the others (its
parameter count equals GenieBlue-Skip's minus the norms). It is built here, not shipped as a config: it needs the
image-token mask inside every expert linear, which the miniature passes through a context variable.
"""

import contextlib
import contextvars
import copy
from dataclasses import dataclass

import torch
from torch import nn

from genieblue_hf.modeling.genieblue_dispatch import find_decoder_layers
from genieblue_hf.modeling.modeling_genieblue import GenieBlueForConditionalGeneration


_IMAGE_TOKEN_MASK = contextvars.ContextVar("genieblue_miniature_image_token_mask", default=None)


@contextlib.contextmanager
def image_token_mask(mask):
    """Tell the visual experts which positions of the running batch are image tokens (``(batch, seq)`` bools)."""
    token = _IMAGE_TOKEN_MASK.set(mask)
    try:
        yield
    finally:
        _IMAGE_TOKEN_MASK.reset(token)


class _Borrowed(nn.Module):
    """Calls a module of the frozen base without registering it (its parameters are neither saved nor trained here)."""

    def __init__(self, module):
        super().__init__()
        self.__dict__["borrowed"] = module

    def forward(self, *args, **kwargs):
        return self.borrowed(*args, **kwargs)


class VisualExpertLinear(nn.Module):
    """``expert`` (trainable) on image-token positions, the base's ``original`` linear on every other position."""

    def __init__(self, original, expert):
        super().__init__()
        self.expert = expert
        self.__dict__["original"] = original

    def forward(self, x):
        mask = _IMAGE_TOKEN_MASK.get()
        if mask is None or mask.shape != x.shape[:-1]:
            raise RuntimeError(
                "a CogVLM visual expert ran without the image-token mask of its batch; call the model inside "
                "genieblue_paper.variants.image_token_mask(input_ids == image_token_id)"
            )
        return torch.where(mask.unsqueeze(-1), self.expert(x), self.original(x))


def make_visual_experts(model):
    """Turn ``model``'s replicated blocks into CogVLM visual experts (in place); returns ``model``."""
    _, base_layers = find_decoder_layers(model.language_model, model.config.text_config.num_hidden_layers)
    targets = set(model.config.lora_target_modules)
    for index, replica in model.replicated_layers.items():
        base_layer = base_layers[int(index)]
        for path, module in list(replica.named_modules()):
            parent_path, _, name = path.rpartition(".")
            parent = replica.get_submodule(parent_path) if parent_path else replica
            original = base_layer.get_submodule(path) if path else None
            if isinstance(module, nn.Linear) and name in targets:
                setattr(parent, name, VisualExpertLinear(original, module))
            elif name.endswith("norm") and not list(module.children()):
                setattr(parent, name, _Borrowed(original))
    return model


def forward_with_expert_mask(model, inputs, kwargs):
    """A forward call for a model with visual experts: the mask is the batch's image placeholders."""
    with image_token_mask(inputs["input_ids"] == model.config.image_token_id):
        return model(**inputs, **kwargs)


@dataclass(frozen=True)
class Variant:
    """One row of the paper's tables: how the LLM side is adapted to images."""

    name: str
    replication_strategy: object
    full_finetune: bool = False
    visual_expert: bool = False

    def build(self, base, vision_tower, projector_state, lora_rank, **config_overrides):
        """A model for this variant: copies of ``base`` and ``vision_tower``, the stage-1 projector, stage-2 grads."""
        model = GenieBlueForConditionalGeneration.from_base(
            copy.deepcopy(base), copy.deepcopy(vision_tower), replication_strategy=self.replication_strategy,
            lora_rank=lora_rank, lora_alpha=2 * lora_rank, **config_overrides,
        )
        model.multi_modal_projector.load_state_dict(projector_state)
        if self.visual_expert:
            make_visual_experts(model)
        model.configure_training(stage=2, shared_base=self.full_finetune)
        return model

    @property
    def forward(self):
        """How to call the model (visual experts need their mask), or ``None`` for a plain call."""
        return forward_with_expert_mask if self.visual_expert else None

    @property
    def has_base(self):
        """Whether text requests can still run the untouched base (the non-shared deployment)."""
        return not self.full_finetune


VARIANTS = (
    Variant("Full-Finetune", "dense", full_finetune=True),
    Variant("LoRA", []),
    Variant("CogVLM-Skip", "skip", visual_expert=True),
    Variant("GenieBlue-Post", "post"),
    Variant("GenieBlue-Pre", "pre"),
    Variant("GenieBlue-Skip", "skip"),
)
VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}
