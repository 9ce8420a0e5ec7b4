"""genieblue-hf: GenieBlue (arXiv 2503.06019) as a Hugging Face transformers model.

The model classes live in ``genieblue_hf.modeling`` (the same files that go to the Hub as remote code). Importing
this package registers them with the transformers Auto classes, so ``AutoModelForImageTextToText.from_pretrained``
on a GenieBlue folder works without ``trust_remote_code`` when the package is installed.
"""

import logging


class _OptionalKernelNoise(logging.Filter):
    """Drop two import-time warnings torchao emits on every CPU-only machine (transformers imports torchao whenever
    it is installed): one per GPU kernel library it cannot load, and torch's deprecation note on its pytree enums.
    Nothing else from these loggers is touched."""

    def filter(self, record):
        message = record.getMessage()
        return not (message.startswith("Failed to load") or "register_constant()" in message)


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_OptionalKernelNoise())

from transformers import (  # noqa: E402
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .modeling.configuration_genieblue import GenieBlueConfig  # noqa: E402
from .modeling.image_processing_genieblue import GenieBlueImageProcessor  # noqa: E402
from .modeling.modeling_genieblue import GenieBlueForConditionalGeneration  # noqa: E402
from .modeling.processing_genieblue import GenieBlueProcessor  # noqa: E402


AutoConfig.register(GenieBlueConfig.model_type, GenieBlueConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto.register(GenieBlueConfig, GenieBlueForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(GenieBlueConfig, slow_image_processor_class=GenieBlueImageProcessor, exist_ok=True)
AutoProcessor.register(GenieBlueConfig, GenieBlueProcessor, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "GenieBlueConfig",
    "GenieBlueForConditionalGeneration",
    "GenieBlueImageProcessor",
    "GenieBlueProcessor",
]
