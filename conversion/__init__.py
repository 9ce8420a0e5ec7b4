"""Building GenieBlue Hub folders: ``compose`` a fresh model from a base LLM and a SigLIP tower, ``convert`` training
checkpoints (Trainer/accelerate folders, PyTorch state dicts, PEFT adapters, distributed checkpoints)."""

from .compose import compose
from .converter import FORMATS, convert, detect_format
from .dense import dense_language_model, dense_model, export_dense
from .sources import ConversionError


__all__ = [
    "compose", "convert", "detect_format", "ConversionError", "FORMATS", "export_dense", "dense_model",
    "dense_language_model",
]
