"""GenieBlue configuration.

GenieBlue (arXiv 2503.06019) keeps a frozen base LLM untouched for text requests and, for image requests,
runs a multimodal path: trained copies of the decoder blocks at a quarter interval of depth replace the
originals, and every other block gets LoRA.

This file is Hub remote code: it imports only the standard library and transformers. The config keeps its
own ``__init__`` on purpose: transformers 5.0 needs one, and the dataclass configs of later 5.x releases
still accept a class that defines it, so one file serves the whole 5.x line.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


REPLICATION_STRATEGIES = ("skip", "pre", "post")
# An exported dense model (``genieblue export-dense``): no replicated blocks and no LoRA; the multimodal path is the
# language model itself, which then is the merged multimodal LM rather than the original base.
DENSE = "dense"
LORA_EXECUTION_MODES = ("unmerged", "merged")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Fields a decoder config must expose for GenieBlue to place replicated blocks and size the projector.
# Every Auto class a GenieBlue Hub folder answers to, pointing at the remote-code files saved beside config.json.
DEFAULT_AUTO_MAP = {
    "AutoConfig": "configuration_genieblue.GenieBlueConfig",
    "AutoModel": "modeling_genieblue.GenieBlueForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_genieblue.GenieBlueForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_genieblue.GenieBlueForConditionalGeneration",
    "AutoProcessor": "processing_genieblue.GenieBlueProcessor",
}

_REQUIRED_TEXT_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size")
_REQUIRED_VISION_FIELDS = ("hidden_size", "image_size", "patch_size")


def resolve_replicated_layers(strategy, interval, num_layers):
    """Indices of the decoder blocks that get a trained copy.

    ``"skip"`` (the paper's best variant) takes the last block of every group of ``interval`` blocks, so a
    36-layer model with interval 4 gets blocks 3, 7, ..., 35. ``"pre"`` and ``"post"`` take the same number of
    blocks from the start or the end of the stack. A list is taken as explicit indices.
    """
    if strategy == DENSE:
        return []
    if isinstance(strategy, (list, tuple)):
        indices = [int(i) for i in strategy]
    elif strategy == "skip":
        indices = list(range(interval - 1, num_layers, interval))
    elif strategy == "pre":
        indices = list(range(num_layers // interval))
    elif strategy == "post":
        indices = list(range(num_layers - num_layers // interval, num_layers))
    else:
        raise ValueError(
            f"replication_strategy must be one of {REPLICATION_STRATEGIES} or a list of layer indices, got {strategy!r}"
        )
    return sorted(set(indices))


def _build_sub_config(value, field, default_model_type):
    """A sub-config from a config, a dict, or None (that model type's defaults, as LLaVA does)."""
    if value is None:
        value = {}
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", default_model_type)
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"`{field}` has unknown model_type {model_type!r}")
        value = CONFIG_MAPPING[model_type](**value)
    if not isinstance(value, PreTrainedConfig):
        raise ValueError(f"{field} must be a PreTrainedConfig or a dict, got {type(value).__name__}")
    return value


class GenieBlueConfig(PreTrainedConfig):
    r"""Configuration of a GenieBlue model.

    Args:
        text_config: config (or dict) of the frozen base decoder, any Hugging Face causal LM with a ``layers`` list.
            Defaults to ``Qwen2Config()`` (transformers needs a config that builds with no arguments).
        vision_config: config (or dict) of the SigLIP vision tower. Defaults to ``SiglipVisionConfig()``.
        replication_strategy: ``"skip"``, ``"pre"``, ``"post"`` or an explicit list of layer indices. An empty list
            replicates nothing and puts LoRA on every block (the paper's LoRA-only baseline).
        replication_interval: one block in every ``replication_interval`` is replicated (default 4: a quarter).
        lora_rank, lora_alpha, lora_dropout, use_rslora: LoRA on every non-replicated block. The scale is
            ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA, as in PEFT.
        lora_target_modules: names (last path component) of the linear layers inside a block that get LoRA, or
            ``"all-linear"`` (every linear of the block, for decoders with other projection names, e.g. Falcon). A
            block where no target matches (a Mamba block of a hybrid model) gets no LoRA; at least one must match.
        lora_execution_mode: ``"unmerged"`` (additive branch, least memory) or ``"merged"`` (``W + s·B·A`` computed
            into separate cached tensors on first multimodal use; the base tensors are never written).
        image_token_id: placeholder id for image features. Defaults to ``text_config.vocab_size``: an id outside the
            base vocabulary, so the base embeddings are never resized and the base can never emit it.
        projector_hidden_act: activation of the 2-layer MLP projector.
        projector_layernorm: a LayerNorm over the merged vision features before the MLP (InternVL's projector, which
            the paper's Table 5 parameter counts imply). Checkpoints written before this field existed have none:
            a saved config without the field loads with ``False``.
        downsample_ratio: side of the token-merging window before the projector (2 merges 2x2 patches into one token;
            1 disables it). A patch grid the ratio does not divide is zero-padded at the bottom and right first
            (DeepSeek-VL2's rule for the same tower: 27x27 patches at 384 px become 28x28, then 14x14 = 196 tokens).
        vision_feature_layer: which vision hidden state feeds the projector (-1: the last).
    """

    model_type = "genieblue"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        replication_strategy="skip",
        replication_interval=4,
        lora_rank=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_modules=DEFAULT_LORA_TARGETS,
        use_rslora=False,
        lora_execution_mode="unmerged",
        image_token_id=None,
        projector_hidden_act="gelu",
        projector_layernorm=True,
        downsample_ratio=2,
        vision_feature_layer=-1,
        **kwargs,
    ):
        self.text_config = _build_sub_config(text_config, "text_config", "qwen2")
        self.vision_config = _build_sub_config(vision_config, "vision_config", "siglip_vision_model")
        _check_fixed_resolution(self.vision_config)
        _check_required_fields(self.text_config, "text_config", _REQUIRED_TEXT_FIELDS)
        _check_required_fields(self.vision_config, "vision_config", _REQUIRED_VISION_FIELDS)
        self.replication_strategy = (
            list(replication_strategy) if isinstance(replication_strategy, (list, tuple)) else replication_strategy
        )
        self.replication_interval = replication_interval
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.lora_target_modules = (
            lora_target_modules if isinstance(lora_target_modules, str) else list(lora_target_modules)
        )
        self.use_rslora = use_rslora
        self.lora_execution_mode = lora_execution_mode
        self.image_token_id = self.text_config.vocab_size if image_token_id is None else image_token_id
        self.projector_hidden_act = projector_hidden_act
        self.projector_layernorm = projector_layernorm
        self.downsample_ratio = downsample_ratio
        self.vision_feature_layer = vision_feature_layer
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
        if not getattr(self, "auto_map", None):
            self.auto_map = dict(DEFAULT_AUTO_MAP)
        self.validate_genieblue()

    # -- derived values -------------------------------------------------------------------------------------------
    @property
    def replicated_layers(self):
        """Sorted indices of the decoder blocks replaced by trained copies on the multimodal path."""
        return resolve_replicated_layers(
            self.replication_strategy, self.replication_interval, self.text_config.num_hidden_layers
        )

    @property
    def lora_layers(self):
        """Indices of the decoder blocks that get LoRA on the multimodal path (all the others)."""
        if self.is_dense:
            return []
        replicated = set(self.replicated_layers)
        return [i for i in range(self.text_config.num_hidden_layers) if i not in replicated]

    @property
    def is_dense(self):
        """An exported dense model: the multimodal path is the language model itself."""
        return self.replication_strategy == DENSE

    @property
    def lora_scaling(self):
        return self.lora_alpha / (self.lora_rank**0.5 if self.use_rslora else self.lora_rank)

    @property
    def vision_image_size(self):
        """Side, in pixels, of one square image tile fed to the vision tower."""
        return _as_int(self.vision_config.image_size)

    @property
    def vision_grid_size(self):
        """Patches per side of one image tile."""
        return self.vision_image_size // _as_int(self.vision_config.patch_size)

    @property
    def merged_grid_size(self):
        """Tokens per side of one tile after token merging (the patch grid zero-padded to a multiple of the ratio)."""
        return -(-self.vision_grid_size // self.downsample_ratio)

    @property
    def image_tokens_per_tile(self):
        """Image placeholder tokens one tile expands to, after the projector's token merging."""
        return self.merged_grid_size**2

    # -- serialisation --------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """A GenieBlue config from a dict. A saved config without ``projector_layernorm`` predates it: its projector
        has no LayerNorm. Another model's config (e.g. the base LLM's folder) is refused, not read as defaults."""
        model_type = config_dict.get("model_type")
        if model_type not in (None, cls.model_type):
            raise ValueError(
                f"this is a {model_type!r} config, not a GenieBlue config; compose a GenieBlue model from it with "
                f"`genieblue compose` or GenieBlueForConditionalGeneration.from_base"
            )
        if "projector_layernorm" not in config_dict:
            config_dict = {**config_dict, "projector_layernorm": False}
        return super().from_dict(config_dict, **kwargs)

    def to_diff_dict(self):
        """Always write ``projector_layernorm``: ``from_dict`` reads its absence as a checkpoint from before it."""
        return {**super().to_diff_dict(), "projector_layernorm": self.projector_layernorm}

    # -- validation -----------------------------------------------------------------------------------------------
    def validate_genieblue(self):
        """Raise a ``ValueError`` naming the first invalid field."""
        _check_required_fields(self.text_config, "text_config", _REQUIRED_TEXT_FIELDS)
        _check_required_fields(self.vision_config, "vision_config", _REQUIRED_VISION_FIELDS)
        if not isinstance(self.replication_interval, int) or self.replication_interval < 1:
            raise ValueError(f"replication_interval must be a positive integer, got {self.replication_interval!r}")
        num_layers = self.text_config.num_hidden_layers
        strategy = self.replication_strategy
        if not isinstance(strategy, list) and strategy not in (*REPLICATION_STRATEGIES, DENSE):
            raise ValueError(
                f"replication_strategy must be one of {REPLICATION_STRATEGIES} or a list of layer indices, got {strategy!r}"
            )
        if isinstance(strategy, list):
            bad = [i for i in strategy if not isinstance(i, int) or not 0 <= i < num_layers]
            if bad:
                raise ValueError(
                    f"replication_strategy has layer indices out of range [0, {num_layers}): {bad}"
                )
            if len(set(strategy)) != len(strategy):
                raise ValueError(f"replication_strategy has duplicate layer indices: {strategy}")
        if not self.replicated_layers and not self.is_dense and not isinstance(strategy, list):
            raise ValueError(
                f"replication_strategy={strategy!r} with replication_interval={self.replication_interval} selects no "
                f"layer of a {num_layers}-layer model"
            )
        if not isinstance(self.lora_rank, int) or self.lora_rank <= 0:
            raise ValueError(f"lora_rank must be a positive integer, got {self.lora_rank!r}")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        targets = self.lora_target_modules
        if targets != "all-linear" and (
            isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets)
        ):
            raise ValueError(f"lora_target_modules must be a non-empty list of names or 'all-linear', got {targets!r}")
        if self.lora_execution_mode not in LORA_EXECUTION_MODES:
            raise ValueError(
                f"lora_execution_mode must be one of {LORA_EXECUTION_MODES}, got {self.lora_execution_mode!r}"
            )
        if not isinstance(self.image_token_id, int) or self.image_token_id < 0:
            raise ValueError(f"image_token_id must be a non-negative integer, got {self.image_token_id!r}")
        if not isinstance(self.downsample_ratio, int) or self.downsample_ratio < 1:
            raise ValueError(f"downsample_ratio must be a positive integer, got {self.downsample_ratio!r}")
        if not isinstance(self.projector_layernorm, bool):
            raise ValueError(f"projector_layernorm must be true or false, got {self.projector_layernorm!r}")
        if self.downsample_ratio > self.vision_grid_size:
            raise ValueError(
                f"downsample_ratio={self.downsample_ratio} is larger than the vision patch grid "
                f"({self.vision_grid_size}x{self.vision_grid_size}: image_size / patch_size)"
            )


def _check_fixed_resolution(vision_config):
    """GenieBlue tiles images at the tower's one native resolution; NaFlex towers take patch sequences instead."""
    if getattr(vision_config, "image_size", None) is None and getattr(vision_config, "num_patches", None) is not None:
        raise ValueError(
            f"vision_config is a NaFlex tower ({vision_config.model_type}: variable-resolution patch sequences, no "
            f"image_size); GenieBlue cuts images into fixed-size tiles. Use a fixed-resolution SigLIP or SigLIP2 "
            f"checkpoint (model_type siglip_vision_model, e.g. siglip2-so400m-patch14-384)"
        )


def _check_required_fields(config, name, fields):
    for field in fields:
        if getattr(config, field, None) is None:
            raise ValueError(f"{name} is missing the field `{field}`")


def _as_int(size):
    """SigLIP sizes may be an int or a square (h, w) pair."""
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"vision_config must use square images and patches, got {size}")
        return int(size[0])
    return int(size)


# Saving copies this file (and the model/processor files, which register themselves likewise) into the folder.
GenieBlueConfig.register_for_auto_class()

__all__ = ["GenieBlueConfig"]
