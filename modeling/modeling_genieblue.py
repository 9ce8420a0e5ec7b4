"""GenieBlue: a multimodal LLM whose text path is its base LLM, bit for bit (arXiv 2503.06019).

Parts: a SigLIP vision tower, an MLP projector with token merging, the frozen base causal LM
(``.language_model``, the base's own class), trained copies of the blocks at a quarter interval of depth
(``.replicated_layers``) and LoRA adapters for every other block (``.lora``).

Routing (non-shared base deployment): a sequence without images runs ``.language_model`` itself; a sequence with
images runs the same ``.language_model`` with the replicated blocks standing in their slots and LoRA on the other
blocks' linears, for that call only (``genieblue_dispatch``). The route is chosen per sequence at its first forward
and stays with its KV cache (``genieblue_routing``).

This file is Hub remote code: it imports only torch, transformers and its sibling files.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_genieblue import LORA_EXECUTION_MODES, GenieBlueConfig
from .genieblue_compat import CACHE_NAME, CACHE_NAMES, cache_argument, one_cache, output_cache
from .genieblue_dispatch import (
    MultimodalCall, PlanCache, checkpoint_context, copy_decoder_layer, copy_non_persistent_buffers, find_decoder_layers,
    running,
)
from .genieblue_lora import LoraAdapter, LoraAdapterTree, MergedWeights, build_lora_adapters
from .genieblue_routing import ROUTES, RouteRegistry, RoutedCache, select_rows, stitch_rows, stitch_tuples


logger = logging.get_logger(__name__)

# Vision towers whose transformers class dropped a ``vision_model`` wrapper within 5.x. Checkpoints keep the wrapped
# key layout, which every 5.x release reads (the newest maps it on load; 5.0 reads nothing else).
_WRAPPED_VISION_TYPES = ("siglip_vision_model", "clip_vision_model")


@dataclass
class GenieBlueCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Causal-LM outputs (the KV cache under the installed release's name, ``cache`` or ``past_key_values``) plus the
    projected image features of this call (if any) and each row's route."""

    image_hidden_states: torch.Tensor | None = None
    multimodal_rows: torch.Tensor | None = None


def _outputs(cache, **fields):
    return GenieBlueCausalLMOutputWithPast(**{CACHE_NAME: cache}, **fields)


def merge_patch_tokens(features, r):
    """``(tiles, g*g, C)`` patch features to ``(tiles, ceil(g/r)^2, r*r*C)`` (pixel unshuffle; a grid ``r`` does not
    divide is zero-padded at the bottom and right). The vLLM model merges with this same function."""
    if r == 1:
        return features
    tiles, patches, channels = features.shape
    grid = int(round(patches**0.5))
    if grid * grid != patches:
        raise ValueError(f"vision features have {patches} patches; token merging needs a square patch grid")
    features = features.reshape(tiles, grid, grid, channels)
    pad = -grid % r
    if pad:
        features = F.pad(features, (0, 0, 0, pad, 0, pad))
        grid += pad
    features = features.reshape(tiles, grid // r, r, grid // r, r, channels)
    return features.permute(0, 1, 3, 2, 4, 5).reshape(tiles, (grid // r) ** 2, r * r * channels)


class GenieBlueMultiModalProjector(nn.Module):
    """Merges each ``r x r`` window of vision patches into one token (a patch grid ``r`` does not divide is
    zero-padded at the bottom and right first), then LayerNorm (``projector_layernorm``) and a 2-layer MLP into the
    LLM width: InternVL's projector, the one the paper's parameter counts imply."""

    def __init__(self, config):
        super().__init__()
        self.downsample_ratio = config.downsample_ratio
        in_features = config.vision_config.hidden_size * config.downsample_ratio**2
        hidden = config.text_config.hidden_size
        self.layer_norm = nn.LayerNorm(in_features) if config.projector_layernorm else None
        self.linear_1 = nn.Linear(in_features, hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, features):
        merged = merge_patch_tokens(features, self.downsample_ratio)
        if self.layer_norm is not None:
            merged = self.layer_norm(merged)
        return self.linear_2(self.act(self.linear_1(merged)))


class GenieBluePreTrainedModel(PreTrainedModel):
    config_class = GenieBlueConfig
    config: GenieBlueConfig
    base_model_prefix = "genieblue"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["GenieBlueMultiModalProjector"]
    _skip_keys_device_placement = list(CACHE_NAMES)
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The multimodal path reads which call it is in from a ContextVar and the route from Python state kept with the
    # KV cache, neither of which torch.compile traces in one graph. The text path is the base LLM: compile
    # ``model.language_model`` (it compiles in full; tested) for text-only serving.
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module):
        # transformers.initialization skips tensors that were loaded from a checkpoint.
        if isinstance(module, LoraAdapter):
            init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
            init.zeros_(module.lora_B)
            return
        if self._is_replica_module(module):
            # A replicated block is a block of the base class: its own init (non-persistent buffers included).
            self.language_model._init_weights(module)
            return
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def _is_replica_module(self, module):
        replicated = getattr(self, "replicated_layers", None)
        if replicated is None:
            return False
        replica_modules = getattr(self, "_replica_module_ids", None)
        if replica_modules is None:
            replica_modules = {id(m) for m in replicated.modules()}
        return id(module) in replica_modules

    @torch.no_grad()
    def initialize_weights(self):
        """``PreTrainedModel.initialize_weights``, with the base LLM and the vision tower initialising exactly as they
        do when loaded on their own. transformers would otherwise hand GenieBlue's custom-code flag down to them,
        which skips parent modules whose parameters were all loaded, and with them the non-persistent buffers they
        own (FalconH1's ``mup_vector``). Replicated blocks then take their non-persistent buffers from the base
        blocks they copy."""
        for tower in (self.language_model, self.vision_tower):
            tower.initialize_weights()
        _, base_layers = find_decoder_layers(self.language_model, self.config.text_config.num_hidden_layers)
        for index, replica in self.replicated_layers.items():
            copy_non_persistent_buffers(base_layers[int(index)], replica)
        self._replica_module_ids = {id(m) for m in self.replicated_layers.modules()}
        try:
            with init.guard_torch_init_functions():
                for part in (self.multi_modal_projector, self.replicated_layers, self.lora):
                    for module in _post_order(part):
                        if not getattr(module, "_is_hf_initialized", False):
                            self._init_weights(module)
                            module._is_hf_initialized = True
        finally:
            del self._replica_module_ids


def _post_order(module):
    """``module``'s submodules, children before parents (the order ``initialize_weights`` visits them)."""
    for child in module.children():
        yield from _post_order(child)
    yield module


class GenieBlueForConditionalGeneration(GenieBluePreTrainedModel, GenerationMixin):
    """GenieBlue with a language-modelling head: ``forward`` and ``generate`` route each sequence.

    Routing of one call (``route`` argument):
      - ``"auto"`` (default): a sequence with image placeholder tokens runs the multimodal path, any other runs the
        base LLM untouched. A sequence keeps the route recorded with its KV cache on every later step.
      - ``"text"``: every sequence runs the base LLM; image placeholders are an error.
      - ``"multimodal"``: every sequence runs the multimodal path, images or not (training on text data through the
        multimodal path, or the paper's "shared base" ablation).

    LoRA execution (one setting, one override): ``config.lora_execution_mode`` (``"unmerged"`` or ``"merged"``;
    ``set_lora_execution_mode`` validates and sets it), overridden for one call by ``lora_mode=``.

    The base LLM is frozen (``requires_grad=False``) from construction on: GenieBlue never trains it.
    """

    _tied_weights_keys = None

    def __init__(self, config: GenieBlueConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = GenieBlueMultiModalProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self._build_multimodal_blocks()
        self._route_registry = RouteRegistry()
        self._plans = PlanCache()
        self._merged_weights = MergedWeights()
        self._shared_base = False
        self._peft_checked = None
        self.post_init()
        if self.language_model.device.type != "meta":
            self.reset_multimodal_from_base()
        self.language_model.requires_grad_(False)

    def _build_multimodal_blocks(self):
        """(Re)create ``.replicated_layers`` (copies of the base blocks) and ``.lora``."""
        config = self.config
        _, base_layers = find_decoder_layers(self.language_model, config.text_config.num_hidden_layers)
        lm_config = self.language_model.config
        self.replicated_layers = nn.ModuleDict(
            {str(i): copy_decoder_layer(base_layers[i], lm_config) for i in config.replicated_layers}
        )
        self.replicated_layers.requires_grad_(True)
        targets = config.lora_target_modules
        targets = targets if targets == "all-linear" else set(targets)
        adapters = {i: build_lora_adapters(base_layers[i], targets, config.lora_rank) for i in config.lora_layers}
        if config.lora_layers and not any(adapters.values()):
            layer = base_layers[config.lora_layers[0]]
            linears = sorted({p.rsplit(".", 1)[-1] for p, m in layer.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"lora_target_modules {config.lora_target_modules} match no nn.Linear in any decoder block; the "
                f"linears of block {config.lora_layers[0]} are {linears} (or pass lora_target_modules='all-linear')"
            )
        skipped = [i for i, found in adapters.items() if not found]
        if skipped:
            logger.info("blocks %s have no linear named in lora_target_modules and get no LoRA", skipped)
        self.lora = nn.ModuleDict({str(i): LoraAdapterTree(found) for i, found in adapters.items()})

    # -- composition ----------------------------------------------------------------------------------------------
    @classmethod
    def from_base(cls, language_model, vision_model, **config_overrides):
        """Compose a fresh GenieBlue from a base causal LM and a SigLIP vision model (instances or local paths).

        The base LM instance becomes ``.language_model`` as it is (not copied); the replicated blocks are copies of
        the base blocks and every LoRA ``B`` is zero, so the multimodal path starts equal to the base on text tokens.
        """
        if isinstance(language_model, (str, bytes)) or hasattr(language_model, "__fspath__"):
            language_model = AutoModelForCausalLM.from_pretrained(language_model)
        if isinstance(vision_model, (str, bytes)) or hasattr(vision_model, "__fspath__"):
            vision_model = AutoModel.from_pretrained(vision_model)
        if hasattr(vision_model, "vision_model") and hasattr(vision_model.config, "vision_config"):
            raise ValueError(
                f"vision_model is a full {type(vision_model).__name__} (text and vision towers); pass its vision "
                f"tower, e.g. SiglipVisionModel.from_pretrained(path)"
            )
        config = GenieBlueConfig(
            text_config=language_model.config, vision_config=vision_model.config, **config_overrides
        )
        with torch.device("meta"):
            model = cls(config)
        model.language_model = language_model
        model.vision_tower = vision_model
        model.config.text_config = language_model.config
        model.config.vision_config = vision_model.config
        device, dtype = language_model.device, language_model.dtype
        model._build_multimodal_blocks()
        model.multi_modal_projector = GenieBlueMultiModalProjector(config).to(device=device, dtype=dtype)
        for module in model.multi_modal_projector.modules():
            model._init_weights(module)
        model.config.dtype = dtype
        model.language_model.requires_grad_(False)
        return model.train(language_model.training)

    # -- training -------------------------------------------------------------------------------------------------
    TRAINABLE_PARTS = ("vision_tower", "multi_modal_projector", "replicated_layers", "lora")

    def configure_training(self, stage, train_vision=True, train_projector=True, shared_base=False):
        """Set ``requires_grad`` for a stage of the paper's recipe; returns trainable parameters per part.

        Stage 1 trains the projector only (vision tower and LLM frozen). Stage 2 trains the vision tower (unless
        ``train_vision=False``), the projector (unless ``train_projector=False``), the replicated blocks and LoRA.
        The base LLM stays frozen in every stage; ``shared_base=True`` unfreezes it for the paper's shared-base
        ablation only, after which the text path is no longer the original base.
        """
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        trainable = {
            "vision_tower": stage == 2 and train_vision,
            "multi_modal_projector": train_projector,
            "replicated_layers": stage == 2,
            "lora": stage == 2,
        }
        for part, flag in {**trainable, "language_model": bool(shared_base)}.items():
            for param in getattr(self, part).parameters():
                # quantized weights (a 4-bit QLoRA load) are integers and stay frozen; train adapters on them
                param.requires_grad_(flag and (param.is_floating_point() or param.is_complex()))
        self._shared_base = bool(shared_base)
        counts = self.trainable_parameters()
        logger.info("GenieBlue stage %d trainable parameters: %s", stage, counts)
        return counts

    def trainable_parameters(self):
        """``{part: number of parameters with requires_grad}``, the base LLM included."""
        parts = (*self.TRAINABLE_PARTS, "language_model")
        return {part: sum(p.numel() for p in getattr(self, part).parameters() if p.requires_grad) for part in parts}

    def _check_base_frozen(self):
        """In training: the base LLM must not be trainable (outside the shared-base ablation)."""
        if self._shared_base:
            return
        if any(p.requires_grad for p in self.language_model.parameters()):
            raise RuntimeError(
                "parameters of the base LLM (language_model) require grad: GenieBlue never trains the base. Call "
                "model.configure_training(stage) to set the trainable parts (shared_base=True only for the paper's "
                "shared-base ablation)."
            )

    def _check_no_adapter_on_base(self):
        """PEFT must not have wrapped the base LLM: its adapter would change the text path.

        PEFT marks the model it injects into with ``peft_config``; only then are the base modules scanned (once per
        adapter set), so the text path pays nothing without PEFT.
        """
        peft_config = getattr(self, "peft_config", None)
        if peft_config is None:
            return
        key = (id(peft_config), tuple(peft_config))
        if self._peft_checked == key:
            return
        for name, module in self.language_model.named_modules():
            if hasattr(module, "adapter_layer_names"):  # a PEFT tuner layer
                raise RuntimeError(
                    f"PEFT wrapped the base LLM's language_model.{name}: its adapter would change the text path. "
                    f"Target only the multimodal parts: genieblue_hf.training.multimodal_lora_config(...), or "
                    f"exclude_modules=r'language_model\\..*' in the LoraConfig."
                )
        self._peft_checked = key

    def _checkpointing_kwargs(self, kwargs):
        """Checkpointing as the multimodal path needs it: non-reentrant, with the recompute re-entering the call."""
        kwargs = dict(kwargs or {})
        if kwargs.get("use_reentrant"):
            raise ValueError(
                "GenieBlue needs non-reentrant activation checkpointing (use_reentrant=False, transformers' default): "
                "a block recomputed in the backward pass must see the multimodal path it ran on, which only "
                "non-reentrant checkpointing can restore (through its context_fn)"
            )
        if "context_fn" in kwargs:
            raise ValueError("GenieBlue sets the checkpoint context_fn itself; pass other checkpoint arguments only")
        return {**kwargs, "use_reentrant": False, "context_fn": checkpoint_context}

    if hasattr(PreTrainedModel, "activation_checkpointing_enable"):  # later 5.x; gradient_checkpointing_enable calls it

        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, *args, **kwargs):
            return super().activation_checkpointing_enable(
                self._checkpointing_kwargs(activation_checkpointing_kwargs), *args, **kwargs
            )

    else:

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, *args, **kwargs):
            return super().gradient_checkpointing_enable(
                self._checkpointing_kwargs(gradient_checkpointing_kwargs), *args, **kwargs
            )

    # -- loading and saving ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, then the base LLM frozen again (loading materialises new tensors)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        model.language_model.requires_grad_(False)
        return loaded

    def portable_key(self, key):
        """A state-dict key as GenieBlue checkpoints store it (``portable_key``)."""
        return portable_key(key, getattr(self.config.vision_config, "model_type", None))

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """``PreTrainedModel.save_pretrained`` writing the portable key layout (``portable_key``)."""
        if state_dict is None:
            own = self.state_dict()
            state_dict = own if any(self.portable_key(key) != key for key in own) else None
        if state_dict is not None:
            state_dict = {self.portable_key(key): value for key, value in state_dict.items()}
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    @torch.no_grad()
    def reset_multimodal_from_base(self):
        """Restart the multimodal path from the base: replicated blocks := base blocks, every LoRA ``B`` := 0."""
        _, base_layers = find_decoder_layers(self.language_model, self.config.text_config.num_hidden_layers)
        for index, replica in self.replicated_layers.items():
            replica.load_state_dict(base_layers[int(index)].state_dict())
        for tree in self.lora.values():
            for adapter in tree.adapters().values():
                adapter.reset_parameters()

    # -- standard accessors ---------------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        raise NotImplementedError("GenieBlue never replaces the base embeddings: the text path must stay the base")

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def get_decoder(self):
        return self.language_model.get_decoder()

    def resize_token_embeddings(self, *args, **kwargs):
        raise NotImplementedError(
            "GenieBlue never resizes the base vocabulary: that would change the text path. The image placeholder "
            f"(id {self.config.image_token_id}) is handled by the multimodal path without an embedding row."
        )

    # -- the multimodal path --------------------------------------------------------------------------------------
    def set_lora_execution_mode(self, mode):
        """Set ``config.lora_execution_mode`` (``"unmerged"`` or ``"merged"``); base weights are untouched."""
        _check_lora_mode(mode)
        self.config.lora_execution_mode = mode

    def drop_multimodal_cache(self):
        """Forget the multimodal plan and the merged LoRA weights (frees merged mode's memory); both are rebuilt on
        the next image request."""
        self._plans.clear()
        self._merged_weights.clear()

    def multimodal_plan(self):
        """Which base module the multimodal path substitutes by what (``genieblue_dispatch.MultimodalPlan``)."""
        _, layers = find_decoder_layers(self.language_model, self.config.text_config.num_hidden_layers)
        replicas = {int(i): layer for i, layer in self.replicated_layers.items()}
        trees = {int(i): tree for i, tree in self.lora.items()}
        return self._plans.get(layers, replicas, trees)

    def _multimodal_call(self, lora_mode=None):
        mode = lora_mode or self.config.lora_execution_mode
        return MultimodalCall(
            self.multimodal_plan(), mode, self.config.lora_scaling, self.config.lora_dropout, self.training,
            self._merged_weights,
        )

    # -- images ---------------------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values, vision_feature_layer=None, output_hidden_states=None, return_dict=None,
                           **kwargs):
        """The vision tower's outputs with the projected image features in ``pooler_output``
        (``(num_tiles, image_tokens_per_tile, text_hidden_size)``), as transformers' VLMs return them."""
        size = self.config.vision_image_size
        channels = getattr(self.config.vision_config, "num_channels", 3)
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels or tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(
                f"pixel_values must have shape (num_tiles, {channels}, {size}, {size}), got {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}")
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        outputs = self.vision_tower(
            pixel_values=pixel_values.to(self.vision_tower.dtype),
            output_hidden_states=bool(output_hidden_states) or layer != -1,
            return_dict=True,
        )
        features = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
        projected = self.multi_modal_projector(features.to(_floating_dtype(self.multi_modal_projector, features.dtype)))
        result = BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=projected,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=getattr(outputs, "attentions", None),
        )
        return result if return_dict is not False else result.to_tuple()

    def get_placeholder_mask(self, input_ids):
        return input_ids == self.config.image_token_id

    def _embed_multimodal(self, input_ids, pixel_values, inputs_embeds, continuing):
        """Token embeddings with image features scattered onto the placeholder positions.

        On a continuation (the KV cache already holds the sequence's images), placeholder ids without new
        ``pixel_values`` are draft tokens a candidate generator proposed (prompt-lookup decoding copies prompt
        n-grams): they get the embedding of id 0, and the multimodal path's logits never select them.
        """
        if input_ids is None:
            if pixel_values is not None:
                raise ValueError("pixel_values need input_ids with image placeholder tokens, not inputs_embeds")
            return inputs_embeds, None
        image_mask = self.get_placeholder_mask(input_ids)
        embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        if pixel_values is None:
            n_tokens = 0 if continuing else int(image_mask.sum())
            if n_tokens:
                raise ValueError(
                    f"input_ids hold {n_tokens} image placeholder tokens (id {self.config.image_token_id}) but no "
                    f"pixel_values were given"
                )
            return embeds, None
        n_tokens = int(image_mask.sum())
        features = self.get_image_features(pixel_values).pooler_output
        n_features = features.shape[0] * features.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"Image features and image placeholder tokens do not match: input_ids hold {n_tokens} placeholder "
                f"tokens (id {self.config.image_token_id}), pixel_values give {features.shape[0]} tiles x "
                f"{features.shape[1]} tokens = {n_features} features"
            )
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.device, embeds.dtype))
        return embeds, features

    # -- routing --------------------------------------------------------------------------------------------------
    def _resolve_routes(self, input_ids, inputs_embeds, pixel_values, past_key_values, route):
        """A bool per row (on the CPU, so deciding costs no device sync): True runs the multimodal path.

        A sequence that has a KV cache keeps the route it started on; a new one takes the route asked for, or under
        ``"auto"`` the multimodal path exactly when it holds image placeholders.
        """
        route = route or "auto"
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        batch = reference.shape[0]
        has_image = (
            self.get_placeholder_mask(input_ids).any(-1).cpu() if input_ids is not None
            else torch.zeros(batch, dtype=torch.bool)
        )
        recorded = self._route_registry.get(past_key_values)
        if recorded is not None:
            self._check_continuation(recorded, route, has_image, pixel_values, batch)
            return recorded
        self._check_new_sequences(route, has_image, pixel_values)
        return {"auto": has_image, "text": torch.zeros(batch, dtype=torch.bool),
                "multimodal": torch.ones(batch, dtype=torch.bool)}[route]

    def _check_continuation(self, recorded, route, has_image, pixel_values, batch):
        if recorded.shape[0] != batch:
            raise ValueError(f"the KV cache holds {recorded.shape[0]} sequences but this call has {batch} rows")
        if (route == "text" and recorded.any()) or (route == "multimodal" and not recorded.all()):
            raise ValueError(
                f"route={route!r} conflicts with the route these sequences started on (multimodal rows: "
                f"{recorded.nonzero().flatten().tolist()}); a sequence keeps one path for its whole KV cache"
            )
        text_rows_with_images = (has_image & ~recorded).nonzero().flatten().tolist()
        if pixel_values is not None and text_rows_with_images:
            raise ValueError(
                f"rows {text_rows_with_images} started on the text path and now contain image placeholders; an image "
                f"cannot join a text-path KV cache. Run the whole conversation again without its KV cache."
            )

    def _check_new_sequences(self, route, has_image, pixel_values):
        if route == "text" and (has_image.any() or pixel_values is not None):
            raise ValueError(
                f"route='text' runs the base LLM, which has no image placeholder (id {self.config.image_token_id}) and "
                f"takes no pixel_values"
            )
        if route == "auto" and pixel_values is not None and not has_image.any():
            raise ValueError(
                f"pixel_values were given but input_ids hold no image placeholder token (id "
                f"{self.config.image_token_id}); the processor inserts them"
            )

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        route=None,
        lora_mode=None,
        return_dict=None,
        cache=None,
        **kwargs,
    ):
        r"""
        cache / past_key_values (`Cache`, *optional*): the KV cache, under either name (transformers 5.24 renamed
            ``past_key_values`` to ``cache``; outputs carry it under the installed release's name).
        route (`str`, *optional*): ``"auto"`` (default), ``"text"`` or ``"multimodal"``; see the class docstring.
        lora_mode (`str`, *optional*): ``"unmerged"`` or ``"merged"`` for this call's multimodal rows.
        return_dict (`bool`, *optional*): ``False`` returns ``outputs.to_tuple()`` (defaults to ``config.return_dict``).
        """
        if lora_mode is not None:
            _check_lora_mode(lora_mode)
        past_key_values = one_cache(cache, past_key_values)
        routes = self._resolve_routes(input_ids, inputs_embeds, pixel_values, past_key_values, route)
        self._check_no_adapter_on_base()
        if self.training and torch.is_grad_enabled():
            self._check_base_frozen()
        common = dict(
            attention_mask=attention_mask, position_ids=position_ids, labels=labels, use_cache=use_cache,
            logits_to_keep=_kept_positions(logits_to_keep, input_ids if input_ids is not None else inputs_embeds),
            **kwargs,
        )
        if not routes.any():
            outputs = self._text_forward(input_ids, inputs_embeds, past_key_values, **common)
        elif routes.all():
            outputs = self._multimodal_forward(
                input_ids, pixel_values, inputs_embeds, past_key_values, lora_mode=lora_mode, **common
            )
        else:
            outputs = self._mixed_forward(
                routes, input_ids, pixel_values, inputs_embeds, past_key_values, lora_mode=lora_mode, **common
            )
        outputs.multimodal_rows = routes
        cache = output_cache(outputs)
        if cache is not None:
            self._route_registry.record(cache, routes)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return outputs if return_dict else outputs.to_tuple()

    def _text_forward(self, input_ids, inputs_embeds, past_key_values, **kwargs):
        """The base LLM, called as itself."""
        lm = self.language_model
        out = lm(
            input_ids=input_ids, inputs_embeds=inputs_embeds, return_dict=True, **{cache_argument(lm): past_key_values},
            **kwargs,
        )
        return _outputs(
            output_cache(out), loss=out.loss, logits=out.logits, hidden_states=out.hidden_states, attentions=out.attentions
        )

    def _multimodal_forward(self, input_ids, pixel_values, inputs_embeds, past_key_values, labels=None,
                            lora_mode=None, **kwargs):
        """Vision tower and projector, then the base LM with the replicated blocks and LoRA substituted."""
        continuing = past_key_values is not None and past_key_values.get_seq_length() > 0
        inputs_embeds, image_features = self._embed_multimodal(input_ids, pixel_values, inputs_embeds, continuing)
        if labels is not None and input_ids is not None:
            labels = labels.masked_fill(self.get_placeholder_mask(input_ids), -100)
        if self.training and torch.is_grad_enabled() and not inputs_embeds.requires_grad:
            # text rows on the multimodal path: activation checkpointing needs an input that requires grad
            inputs_embeds = inputs_embeds.detach().requires_grad_(True)
        lm = self.language_model
        kwargs[cache_argument(lm)] = past_key_values
        if self.config.is_dense:  # a dense export: the language model is the multimodal LM
            out = lm(inputs_embeds=inputs_embeds, labels=labels, return_dict=True, **kwargs)
        else:
            with running(self._multimodal_call(lora_mode)) as call:
                out = lm(inputs_embeds=inputs_embeds, labels=labels, return_dict=True, **kwargs)
            call.check_complete()
        logits = out.logits
        if self.config.image_token_id < logits.shape[-1]:
            # A placeholder id inside the base vocabulary must never be generated by the multimodal path.
            logits = logits.index_fill(-1, torch.tensor([self.config.image_token_id], device=logits.device), float("-inf"))
        return _outputs(
            output_cache(out), loss=out.loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
            image_hidden_states=image_features,
        )

    def _mixed_forward(self, routes, input_ids, pixel_values, inputs_embeds, past_key_values, labels=None,
                       lora_mode=None, **kwargs):
        """Each path on its own rows, with its own part of a ``RoutedCache``; outputs stitched back in batch order."""
        batch = routes.shape[0]
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.language_model.config, "use_cache", True)
        cache = _routed_cache(past_key_values, routes)
        groups = cache.row_groups
        parts = {}
        for path, rows in groups.items():
            sub = {k: v if k in PER_POSITION_ARGUMENTS else select_rows(v, rows, batch) for k, v in kwargs.items()}
            ids, embeds = select_rows(input_ids, rows, batch), select_rows(inputs_embeds, rows, batch)
            if path == "text":
                parts[path] = self._text_forward(ids, embeds, cache.parts[path], **sub)
            else:
                parts[path] = self._multimodal_forward(
                    ids, pixel_values, embeds, cache.parts[path], lora_mode=lora_mode, **sub
                )
        order = [groups["text"], groups["multimodal"]]
        outputs = [parts["text"], parts["multimodal"]]
        logits = stitch_rows([o.logits for o in outputs], order, batch)
        loss = None
        if labels is not None:
            if input_ids is not None:
                labels = labels.masked_fill(self.get_placeholder_mask(input_ids), -100)
            loss = self.language_model.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size
            )
        if use_cache:
            cache.parts = {path: output_cache(out) for path, out in parts.items()}
        return _outputs(
            cache if use_cache else None,
            loss=loss,
            logits=logits,
            hidden_states=stitch_tuples([o.hidden_states for o in outputs], order, batch),
            attentions=stitch_tuples([o.attentions for o in outputs], order, batch),
            image_hidden_states=parts["multimodal"].image_hidden_states,
        )

    # -- generation -----------------------------------------------------------------------------------------------
    def generate(self, inputs=None, generation_config=None, **kwargs):
        """``GenerationMixin.generate``. Prompt-lookup decoding drafts tokens copied from the prompt, image
        placeholders included, and keeps only drafts its logits processors allow. Over a prompt with images, the
        placeholder id is therefore added to ``suppress_tokens`` (the multimodal path never selects it anyway), so no
        draft crosses an image. A placeholder id outside the base vocabulary (GenieBlue's default) cannot be checked
        that way, transformers indexes a vocabulary-sized tensor with each draft, and is refused with a clear error:
        use a draft model (``assistant_model=``), or compose with a reserved in-vocabulary ``image_token_id``."""
        config = generation_config if generation_config is not None else self.generation_config
        lookup = kwargs.get("prompt_lookup_num_tokens") or getattr(config, "prompt_lookup_num_tokens", None)
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        image_id = self.config.image_token_id
        if lookup and isinstance(input_ids, torch.Tensor) and bool(self.get_placeholder_mask(input_ids).any()):
            if image_id >= self.config.text_config.vocab_size:
                raise ValueError(
                    f"prompt-lookup decoding cannot run over image placeholders with an id outside the base "
                    f"vocabulary (image_token_id={image_id}, vocabulary {self.config.text_config.vocab_size}): "
                    f"transformers' proposer indexes a vocabulary-sized tensor with every drafted token. Use "
                    f"assistant_model=<a draft model>, or compose with a reserved in-vocabulary image_token_id"
                )
            suppressed = kwargs.get("suppress_tokens") or getattr(config, "suppress_tokens", None) or []
            kwargs["suppress_tokens"] = sorted({*suppressed, image_id})
        return super().generate(inputs, generation_config, **kwargs)

    def prepare_inputs_for_generation(self, *args, pixel_values=None, **kwargs):
        """The base LLM's own ``prepare_inputs_for_generation`` (so text generation prepares its inputs exactly as the
        base does: its cache type, ``logits_to_keep``, positions), plus GenieBlue's inputs.

        ``pixel_values`` are passed exactly when the images are consumed: while the KV cache is still empty (the
        prefill, whoever runs it: assisted decoding runs an assistant's prefill as a later iteration), or at every
        step without a cache. An empty cache starts new sequences: generate may reuse one cache object across calls
        (a reset StaticCache), so the routes recorded for it are forgotten. A stateful base (a Mamba hybrid) builds
        its own cache type when handed none, which older releases need."""
        cache = kwargs.get(CACHE_NAME)
        fresh = cache is None or cache.get_seq_length() == 0
        if fresh and cache is not None:
            self._route_registry.forget(cache)
            if getattr(type(self.language_model), "_is_stateful", False):
                kwargs[CACHE_NAME] = None
        model_inputs = self.language_model.prepare_inputs_for_generation(*args, **kwargs)
        for key in ("route", "lora_mode"):  # GenieBlue's own forward arguments, which a base's override may drop
            if key in kwargs:
                model_inputs[key] = kwargs[key]
        if fresh or not kwargs.get("use_cache", True):
            model_inputs["pixel_values"] = pixel_values
        else:
            model_inputs.pop("pixel_values", None)
        return model_inputs


def portable_key(key, vision_model_type):
    """A GenieBlue checkpoint key in the layout every transformers 5.x release reads: SigLIP-style towers keep their
    ``vision_model.`` wrapper (``vision_tower.vision_model.encoder...``). Recent releases dropped the wrapper from the
    class and map the wrapped keys on load; 5.0 reads only those."""
    prefix = "vision_tower."
    if (
        vision_model_type in _WRAPPED_VISION_TYPES
        and key.startswith(prefix)
        and not key.startswith(prefix + "vision_model.")
    ):
        return prefix + "vision_model." + key[len(prefix):]
    return key


# forward arguments that hold one entry per position, never per row, even when there are as many positions as rows
PER_POSITION_ARGUMENTS = frozenset({"cache_position", "logits_to_keep"})


def _kept_positions(logits_to_keep, inputs):
    """``logits_to_keep=k`` as the index tensor of the last ``k`` positions (transformers' documented alternative).

    The base slices ``hidden_states[:, -k:]``; with ``k=1`` at prefill that view has strides torch's matmul cannot
    fold into one ``mm``, and when the LM head's weight does not require grad (a frozen base) torch 2.13 takes a
    batched path that copies the whole transposed weight: 2.7 s per prefill for a 151936-token vocabulary on a CPU,
    where the base alone (trainable weights) takes 33 ms. Indexing with a tensor gives the same rows, contiguous, and
    the same ``mm`` as the base alone."""
    if not isinstance(logits_to_keep, int) or logits_to_keep <= 0 or inputs is None:
        return logits_to_keep
    length = inputs.shape[1]
    return torch.arange(max(0, length - logits_to_keep), length, device=inputs.device)


def _floating_dtype(module, default):
    """The dtype ``module`` computes in: its first floating-point parameter's (a quantized linear stores integers)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), default)


def _check_lora_mode(mode):
    if mode not in LORA_EXECUTION_MODES:
        raise ValueError(f"lora_mode must be one of {LORA_EXECUTION_MODES}, got {mode!r}")


def _routed_cache(past_key_values, routes):
    """The ``RoutedCache`` a mixed batch decodes over: the one it holds already, or a new one at its prefill."""
    if isinstance(past_key_values, RoutedCache):
        return past_key_values
    if past_key_values is None or (
        type(past_key_values).__name__ == "DynamicCache" and past_key_values.get_seq_length() == 0
    ):
        return RoutedCache(routes)
    raise NotImplementedError(
        f"A batch mixing text-only and image sequences keeps one KV cache per path and starts from none or an empty "
        f"DynamicCache, got {type(past_key_values).__name__} (holding {past_key_values.get_seq_length()} tokens). "
        f"Run the text-only and the image sequences as separate batches to use this cache."
    )


# save_pretrained copies this file and its relative imports next to config.json (config.auto_map lists them all).
GenieBlueForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "GenieBlueForConditionalGeneration", "GenieBluePreTrainedModel", "GenieBlueMultiModalProjector", "portable_key",
]
