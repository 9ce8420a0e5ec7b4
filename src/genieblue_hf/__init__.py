"""genieblue-hf: GenieBlue (arXiv 2503.06019) as a Hugging Face transformers model.

The model classes live in ``genieblue_hf.modeling`` (the same files that go to the Hub as remote code). Importing
this package registers them with the transformers Auto classes, so ``AutoModelForImageTextToText.from_pretrained``
on a GenieBlue folder works without ``trust_remote_code`` when the package is installed.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .modeling.configuration_genieblue import GenieBlueConfig
from .modeling.genieblue_lora import lora_execution_mode
from .modeling.image_processing_genieblue import GenieBlueImageProcessor
from .modeling.modeling_genieblue import GenieBlueForConditionalGeneration
from .modeling.processing_genieblue import GenieBlueProcessor


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
    "lora_execution_mode",
]
