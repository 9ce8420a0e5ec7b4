"""Building GenieBlue Hub folders: composing a fresh model from a base LLM and a SigLIP tower."""

from .compose import compose


__all__ = ["compose"]
