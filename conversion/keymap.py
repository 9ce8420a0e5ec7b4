"""Key schema of a GenieBlue checkpoint, and the regex rules that map training-run layouts onto it.

The schema (what ``save_pretrained`` writes and ``convert`` produces)::

    vision_tower.<SigLIP vision model keys>               trained (stage 2)
    multi_modal_projector.linear_{1,2}.{weight,bias}      trained
    language_model.<base causal LM keys>                  the frozen base, identical to the base checkpoint
    replicated_layers.<i>.<decoder block keys>            trained copies of blocks i in config.replicated_layers
    lora.<i>.<path to linear>.lora_{A,B}                  LoRA of block i (A: rank x in, B: out x rank)

Rules applied to every source key, in order, until nothing changes:

=========================================  ==========  ===============================================
pattern                                    replacement  what produces it
=========================================  ==========  ===============================================
``^module\\.``                              (none)      DistributedDataParallel, accelerate ``save_state``
``^_orig_mod\\.`` / ``\\._orig_mod\\.``       (none)/.    ``torch.compile``
``^base_model\\.model\\.``                   (none)      a PEFT-wrapped GenieBlue
``_fsdp_wrapped_module\\.``                 (none)      FSDP1 wrappers
``_checkpoint_wrapped_module\\.``           (none)      activation-checkpoint wrappers
``^model\\.(?=<part>\\.)``                   (none)      state dicts nested under ``model`` (DCP)
=========================================  ==========  ===============================================

PEFT adapters (``adapter_model.safetensors``) trained on the language model use
``base_model.model.[language_model.]model.layers.<i>.<path>.lora_{A,B}[.default].weight`` and map to
``lora.<i>.<path>.lora_{A,B}`` (``PEFT_RULES``). Base checkpoints (``--base``) hold the causal LM's own keys and map
to ``language_model.<key>`` (``base_key``). ``--key-map 'REGEX=REPLACEMENT'`` adds rules for other layouts.
"""

import re


PARTS = ("vision_tower", "multi_modal_projector", "language_model", "replicated_layers", "lora")
TRAINED_PARTS = ("vision_tower", "multi_modal_projector", "replicated_layers", "lora")

DEFAULT_RULES = [
    (r"^module\.", ""),
    (r"^_orig_mod\.", ""),
    (r"\._orig_mod\.", "."),
    (r"^base_model\.model\.", ""),
    (r"(^|\.)_fsdp_wrapped_module\.", r"\1"),
    (r"(^|\.)_checkpoint_wrapped_module\.", r"\1"),
    (r"^model\.(?=(?:" + "|".join(PARTS) + r")\.)", ""),
]

PEFT_RULES = [
    (r"^base_model\.model\.", ""),
    (r"^language_model\.", ""),
    (r"^model\.layers\.(\d+)\.(.+)\.lora_([AB])(?:\.default)?\.weight$", r"lora.\1.\2.lora_\3"),
]

# Training-state entries a distributed checkpoint may hold next to the model.
IGNORED_TRAINING_STATE = [r"^(optim|optimizer|scheduler|lr_scheduler|rng_state|step|epoch)(\.|$)"]


def portable_rules(config):
    """The last rule of every conversion: keys in the layout GenieBlue checkpoints store (``portable_key``)."""
    from ..modeling.modeling_genieblue import _WRAPPED_VISION_TYPES

    if getattr(config.vision_config, "model_type", None) in _WRAPPED_VISION_TYPES:
        return [(r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.")]
    return []


def parse_key_map(items):
    """``["REGEX=REPLACEMENT", ...]`` from the command line into rules."""
    rules = []
    for item in items or ():
        pattern, sep, replacement = item.partition("=")
        if not sep or not pattern:
            raise ValueError(f"--key-map takes REGEX=REPLACEMENT, got {item!r}")
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"--key-map {item!r}: {pattern!r} is not a valid regular expression ({error})") from None
        rules.append((pattern, replacement))
    return rules


def part_of(key):
    head = key.split(".", 1)[0]
    return head if head in PARTS else "unknown"


def tied_keys(config):
    """Keys a GenieBlue checkpoint leaves out because they are tied (the base's output embeddings)."""
    return {"language_model.lm_head.weight"} if getattr(config.text_config, "tie_word_embeddings", False) else set()


def base_key(key):
    """A key of the base causal LM as it sits in a GenieBlue checkpoint."""
    return "language_model." + key
