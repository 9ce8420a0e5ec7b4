"""GenieBlue on device through ExecuTorch: one program with a vision encoder, the token embedding and two decoders
(the base, and the multimodal path) that share the base weights, lowered with XNNPACK (``genieblue
export-executorch``), and a Python runner that routes requests as the model does. Needs the ``executorch`` extra."""

from .export import METHODS, PROGRAM_FILE, export_executorch, genieblue_programs, language_model_programs, lower
from .runner import ExecuTorchRunner


__all__ = [
    "METHODS", "PROGRAM_FILE", "ExecuTorchRunner", "export_executorch", "genieblue_programs",
    "language_model_programs", "lower",
]
