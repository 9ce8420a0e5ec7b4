"""Building GenieBlue Hub folders: ``compose`` a fresh model from a base LLM and a SigLIP tower, ``convert`` training
checkpoints (Trainer/accelerate folders, PyTorch state dicts, PEFT adapters, distributed checkpoints)."""

from .compose import compose
from .converter import FORMATS, convert, detect_format
from .sources import ConversionError


__all__ = ["compose", "convert", "detect_format", "ConversionError", "FORMATS"]
