"""GenieBlue: a multimodal LLM whose text path is its base LLM, bit for bit (arXiv 2503.06019).

Parts: a SigLIP vision tower, an MLP projector with token merging, the frozen base causal LM
(``.language_model``, the base's own class), trained copies of the blocks at a quarter interval of depth
(``.replicated_layers``) and LoRA adapters for every other block (``.lora``).

Routing (non-shared base deployment): a sequence without images runs ``.language_model`` itself; a sequence with
images runs the multimodal view (``genieblue_view``), which shares every base tensor and writes none. The route is
chosen per sequence at its first forward and stays with its KV cache (``genieblue_routing``).

This file is Hub remote code: it imports only torch, transformers and its sibling files.
"""

import math
import threading
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .configuration_genieblue import LORA_EXECUTION_MODES, GenieBlueConfig
from .genieblue_lora import LoraAdapter, LoraAdapterTree, build_lora_adapters, lora_execution_mode
from .genieblue_routing import ROUTES, RouteRegistry, merge_cache_rows, split_cache
from .genieblue_view import build_multimodal_view, copy_decoder_layer, find_decoder_layers


logger = logging.get_logger(__name__)


@dataclass
class GenieBlueCausalLMOutputWithPast(ModelOutput):
    """Causal-LM outputs plus the projected image features of this call (if any) and each row's route."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    image_hidden_states: torch.Tensor | None = None
    multimodal_rows: torch.Tensor | None = None


class ViewCache:
    """The cached multimodal view and the signature it was built for. A copied or unpickled model starts empty
    (the view references the original's tensors; the copy builds its own on first use)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key = None
        self._view = None

    def get(self, key, build):
        with self._lock:
            if self._view is None or self._key != key:
                self._view, self._key = build(), key
            return self._view

    def clear(self):
        with self._lock:
            self._view, self._key = None, None

    def __deepcopy__(self, memo):
        return ViewCache()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class GenieBlueMultiModalProjector(nn.Module):
    """Merges each ``r x r`` window of vision patches into one token, then a 2-layer MLP into the LLM width."""

    def __init__(self, config):
        super().__init__()
        self.downsample_ratio = config.downsample_ratio
        in_features = config.vision_config.hidden_size * config.downsample_ratio**2
        hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(in_features, hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden)

    def merge_tokens(self, features):
        """``(tiles, g*g, C)`` patch features to ``(tiles, (g/r)^2, r*r*C)`` (pixel unshuffle)."""
        r = self.downsample_ratio
        if r == 1:
            return features
        tiles, patches, channels = features.shape
        grid = int(round(patches**0.5))
        if grid * grid != patches or grid % r:
            raise ValueError(f"vision features have {patches} patches; token merging needs a square grid divisible by {r}")
        features = features.reshape(tiles, grid // r, r, grid // r, r, channels)
        return features.permute(0, 1, 3, 2, 4, 5).reshape(tiles, (grid // r) ** 2, r * r * channels)

    def forward(self, features):
        return self.linear_2(self.act(self.linear_1(self.merge_tokens(features))))


class GenieBluePreTrainedModel(PreTrainedModel):
    config_class = GenieBlueConfig
    config: GenieBlueConfig
    base_model_prefix = "genieblue"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["GenieBlueMultiModalProjector"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        # transformers.initialization skips tensors that were loaded from a checkpoint.
        if isinstance(module, LoraAdapter):
            init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
            init.zeros_(module.lora_B)
            return
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.ndim == 1:  # norms
            init.ones_(module.weight)
            if isinstance(getattr(module, "bias", None), nn.Parameter):
                init.zeros_(module.bias)


class GenieBlueForConditionalGeneration(GenieBluePreTrainedModel, GenerationMixin):
    """GenieBlue with a language-modelling head: ``forward`` and ``generate`` route each sequence.

    Routing of one call (``route`` argument):
      - ``"auto"`` (default): a sequence with image placeholder tokens runs the multimodal path, any other runs the
        base LLM untouched. A sequence keeps the route recorded with its KV cache on every later step.
      - ``"text"``: every sequence runs the base LLM; image placeholders are an error.
      - ``"multimodal"``: every sequence runs the multimodal path, images or not (training on text data through the
        multimodal path, or the paper's "shared base" ablation).

    ``lora_mode`` (``"unmerged"`` or ``"merged"``) overrides ``config.lora_execution_mode`` for one call.

    The base LLM is frozen (``requires_grad=False``) from construction on: GenieBlue never trains it.
    """

    _tied_weights_keys = None

    def __init__(self, config: GenieBlueConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = GenieBlueMultiModalProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.__dict__["_layers_path"] = self._build_multimodal_blocks()
        self.__dict__["_route_registry"] = RouteRegistry()
        self.__dict__["_view_cache"] = ViewCache()
        self.post_init()
        if self.language_model.device.type != "meta":
            self.reset_multimodal_from_base()
        self.language_model.requires_grad_(False)

    def _build_multimodal_blocks(self):
        """(Re)create ``.replicated_layers`` (copies of the base blocks) and ``.lora``; returns the blocks' path."""
        config = self.config
        layers_path, base_layers = find_decoder_layers(self.language_model, config.text_config.num_hidden_layers)
        lm_config = self.language_model.config
        self.replicated_layers = nn.ModuleDict(
            {str(i): copy_decoder_layer(base_layers[i], lm_config) for i in config.replicated_layers}
        )
        self.replicated_layers.requires_grad_(True)
        self.lora = nn.ModuleDict(
            {str(i): LoraAdapterTree(self._adapters_for(base_layers[i], i)) for i in config.lora_layers}
        )
        return layers_path

    def _adapters_for(self, layer, index):
        adapters = build_lora_adapters(layer, set(self.config.lora_target_modules), self.config.lora_rank)
        if not adapters:
            linears = sorted({p.rsplit(".", 1)[-1] for p, m in layer.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"lora_target_modules {self.config.lora_target_modules} match no nn.Linear in decoder layer {index}; "
                f"its linears are {linears}"
            )
        return adapters

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
        model.__dict__["_layers_path"] = model._build_multimodal_blocks()
        model.multi_modal_projector = GenieBlueMultiModalProjector(config).to(device=device, dtype=dtype)
        model._init_weights(model.multi_modal_projector.linear_1)
        model._init_weights(model.multi_modal_projector.linear_2)
        model.config.dtype = dtype
        model.language_model.requires_grad_(False)
        model.drop_multimodal_view()
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
        for part, flag in trainable.items():
            getattr(self, part).requires_grad_(flag)
        self.language_model.requires_grad_(bool(shared_base))
        self.__dict__["_shared_base"] = bool(shared_base)
        counts = self.trainable_parameters()
        logger.info("GenieBlue stage %d trainable parameters: %s", stage, counts)
        return counts

    def trainable_parameters(self):
        """``{part: number of parameters with requires_grad}``, the base LLM included."""
        parts = (*self.TRAINABLE_PARTS, "language_model")
        return {part: sum(p.numel() for p in getattr(self, part).parameters() if p.requires_grad) for part in parts}

    def _check_base_frozen(self):
        """In training: the base LLM must not be trainable (outside the shared-base ablation)."""
        if self.__dict__.get("_shared_base"):
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
        peft_config = self.__dict__.get("peft_config")
        if peft_config is None:
            return
        key = (id(peft_config), tuple(peft_config))
        if self.__dict__.get("_peft_checked") == key:
            return
        for name, module in self.language_model.named_modules():
            if hasattr(module, "adapter_layer_names"):  # a PEFT tuner layer
                raise RuntimeError(
                    f"PEFT wrapped the base LLM's language_model.{name}: its adapter would change the text path. "
                    f"Target only the multimodal parts: genieblue_hf.training.multimodal_lora_config(...), or "
                    f"exclude_modules=r'language_model\\..*' in the LoraConfig."
                )
        self.__dict__["_peft_checked"] = key

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, then the base LLM frozen again (loading materialises new tensors)."""
        model = super().from_pretrained(*args, **kwargs)
        model.language_model.requires_grad_(False)
        return model

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

    # -- the multimodal view --------------------------------------------------------------------------------------
    def set_lora_execution_mode(self, mode):
        """Switch how the multimodal path applies LoRA (``"unmerged"`` or ``"merged"``); base weights are untouched."""
        if mode not in LORA_EXECUTION_MODES:
            raise ValueError(f"lora execution mode must be one of {LORA_EXECUTION_MODES}, got {mode!r}")
        self.config.lora_execution_mode = mode
        self.drop_multimodal_view()

    def drop_multimodal_view(self):
        """Forget the cached multimodal view (and its merged LoRA weights); the next image request rebuilds it."""
        self._view_cache.clear()

    def _view_signature(self):
        # The view references tensors by object; if any of them was replaced (``.to()``, ``load_state_dict(assign=
        # True)``, a swapped module) or a flag it copied changed, it is rebuilt.
        tensors = (*self.language_model.parameters(), *self.language_model.buffers())
        extra = (*self.replicated_layers.parameters(), *self.lora.parameters())
        flags = (
            self.training,
            self.config.lora_execution_mode,
            self.config.lora_dropout,
            tuple(getattr(m, "gradient_checkpointing", None) for m in self.replicated_layers.values()),
            # PEFT adapters a fine-tuner put on the replicated blocks: enabled, active and merged state
            tuple(
                (m._disable_adapters, str(m.active_adapters), tuple(m.merged_adapters))
                for m in self.replicated_layers.modules()
                if hasattr(m, "adapter_layer_names")
            ),
        )
        return flags, tuple(map(id, tensors)), tuple(map(id, extra))

    def multimodal_language_model(self):
        """The language model as the multimodal path runs it: replicated blocks swapped in, LoRA on the rest.

        It shares every tensor with ``.language_model``, ``.replicated_layers`` and ``.lora`` and is not part of
        this model's module tree (nothing is saved or registered twice). A dense export has no view: its language
        model is the multimodal LM.
        """
        if self.config.is_dense:
            return self.language_model
        key = self._view_signature()
        return self._view_cache.get(
            key,
            lambda: build_multimodal_view(
                self.language_model,
                self._layers_path,
                {int(i): layer for i, layer in self.replicated_layers.items()},
                {int(i): tree for i, tree in self.lora.items()},
                scaling=self.config.lora_scaling,
                dropout=self.config.lora_dropout,
                mode=self.config.lora_execution_mode,
            ),
        )

    def _apply(self, fn, *args, **kwargs):
        self.drop_multimodal_view()
        return super()._apply(fn, *args, **kwargs)

    # -- images ---------------------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values):
        """Projected image features, ``(num_tiles, image_tokens_per_tile, text_hidden_size)``."""
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
        layer = self.config.vision_feature_layer
        outputs = self.vision_tower(
            pixel_values=pixel_values.to(self.vision_tower.dtype), output_hidden_states=layer != -1
        )
        features = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
        return self.multi_modal_projector(features.to(self.multi_modal_projector.linear_1.weight.dtype))

    def get_placeholder_mask(self, input_ids):
        return input_ids == self.config.image_token_id

    def _embed_multimodal(self, input_ids, pixel_values, inputs_embeds):
        """Token embeddings with image features scattered onto the placeholder positions."""
        if input_ids is None:
            if pixel_values is not None:
                raise ValueError("pixel_values need input_ids with image placeholder tokens, not inputs_embeds")
            return inputs_embeds, None
        image_mask = self.get_placeholder_mask(input_ids)
        embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        n_tokens = int(image_mask.sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(
                    f"input_ids hold {n_tokens} image placeholder tokens (id {self.config.image_token_id}) but no "
                    f"pixel_values were given"
                )
            return embeds, None
        features = self.get_image_features(pixel_values)
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
    def _resolve_routes(self, input_ids, inputs_embeds, pixel_values, recorded, route):
        """A bool per row (on the CPU, so deciding costs no device sync): True runs the multimodal path.

        Decode steps over a recorded KV cache take the recorded routes without looking at the tokens: a reserved
        in-vocabulary placeholder id that the base itself generates is just a token on the text path. Only new
        images (``pixel_values``) are checked against the rows they would join.
        """
        if route is None:
            route = "auto"
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        batch = reference.shape[0]
        if recorded is not None:
            if recorded.shape[0] != batch:
                raise ValueError(
                    f"past_key_values holds {recorded.shape[0]} sequences but this call has {batch} rows"
                )
            if (route == "text" and recorded.any()) or (route == "multimodal" and not recorded.all()):
                raise ValueError(
                    f"route={route!r} conflicts with the route these sequences started on (multimodal rows: "
                    f"{recorded.nonzero().flatten().tolist()}); a sequence keeps one path for its whole KV cache"
                )
            if pixel_values is not None and input_ids is not None:
                has_image = self.get_placeholder_mask(input_ids).any(-1).cpu()
                text_rows_with_images = (has_image & ~recorded).nonzero().flatten().tolist()
                if text_rows_with_images:
                    raise ValueError(
                        f"rows {text_rows_with_images} started on the text path and now contain image placeholders; "
                        f"an image cannot join a text-path KV cache. Run the whole conversation again without "
                        f"past_key_values."
                    )
            return recorded
        has_image = (
            self.get_placeholder_mask(input_ids).any(-1).cpu()
            if input_ids is not None
            else torch.zeros(batch, dtype=torch.bool)
        )
        if route == "text":
            if has_image.any() or pixel_values is not None:
                raise ValueError(
                    f"route='text' runs the base LLM, which has no image placeholder (id {self.config.image_token_id}) "
                    f"and takes no pixel_values"
                )
            return torch.zeros(batch, dtype=torch.bool)
        if route == "multimodal":
            return torch.ones(batch, dtype=torch.bool)
        if pixel_values is not None and not has_image.any():
            raise ValueError(
                f"pixel_values were given but input_ids hold no image placeholder token (id "
                f"{self.config.image_token_id}); the processor inserts them"
            )
        return has_image

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
        **kwargs,
    ):
        r"""
        route (`str`, *optional*): ``"auto"`` (default), ``"text"`` or ``"multimodal"``; see the class docstring.
        lora_mode (`str`, *optional*): ``"unmerged"`` or ``"merged"`` for this call's multimodal rows.
        """
        if lora_mode is not None and lora_mode not in LORA_EXECUTION_MODES:
            raise ValueError(f"lora_mode must be one of {LORA_EXECUTION_MODES}, got {lora_mode!r}")
        recorded = self._route_registry.get(past_key_values)
        routes = self._resolve_routes(input_ids, inputs_embeds, pixel_values, recorded, route)
        self._check_no_adapter_on_base()
        if self.training and torch.is_grad_enabled():
            self._check_base_frozen()
        common = dict(
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        with lora_execution_mode(lora_mode) if lora_mode is not None else nullcontext():
            if not routes.any():
                outputs = self._text_forward(input_ids, inputs_embeds, past_key_values, **common)
            elif routes.all():
                outputs = self._multimodal_forward(input_ids, pixel_values, inputs_embeds, past_key_values, **common)
            else:
                outputs = self._mixed_forward(
                    routes, input_ids, pixel_values, inputs_embeds, past_key_values, **common
                )
        outputs.multimodal_rows = routes
        if outputs.past_key_values is not None and (recorded is None or outputs.past_key_values is not past_key_values):
            self._route_registry.record(outputs.past_key_values, routes)
        return outputs

    def _text_forward(self, input_ids, inputs_embeds, past_key_values, **kwargs):
        """The base LLM, called as itself."""
        out = self.language_model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, past_key_values=past_key_values, **kwargs
        )
        return GenieBlueCausalLMOutputWithPast(
            loss=out.loss,
            logits=out.logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    def _multimodal_forward(self, input_ids, pixel_values, inputs_embeds, past_key_values, labels=None, **kwargs):
        """Vision tower, projector, then the multimodal view of the language model."""
        inputs_embeds, image_features = self._embed_multimodal(input_ids, pixel_values, inputs_embeds)
        if labels is not None and input_ids is not None:
            labels = labels.masked_fill(self.get_placeholder_mask(input_ids), -100)
        if self.training and torch.is_grad_enabled() and not inputs_embeds.requires_grad:
            # text rows on the multimodal path: reentrant activation checkpointing needs an input that requires grad
            inputs_embeds = inputs_embeds.detach().requires_grad_(True)
        out = self.multimodal_language_model()(
            inputs_embeds=inputs_embeds, past_key_values=past_key_values, labels=labels, **kwargs
        )
        logits = out.logits
        if self.config.image_token_id < logits.shape[-1]:
            # A placeholder id inside the base vocabulary must never be generated by the multimodal path.
            logits = logits.index_fill(-1, torch.tensor([self.config.image_token_id], device=logits.device), float("-inf"))
        return GenieBlueCausalLMOutputWithPast(
            loss=out.loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            image_hidden_states=image_features,
        )

    def _mixed_forward(self, routes, input_ids, pixel_values, inputs_embeds, past_key_values, **kwargs):
        """Each path on its own rows; outputs (and the KV cache) stitched back in batch order."""
        mm_rows = routes.nonzero().flatten()
        text_rows = (~routes).nonzero().flatten()
        groups = (text_rows, mm_rows)
        batch = routes.shape[0]
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.language_model.config, "use_cache", True)
        caches = split_cache(past_key_values, groups) if (use_cache or past_key_values is not None) else (None, None)
        labels = kwargs.pop("labels", None)

        def rows(value, index):
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
                return value.index_select(0, index.to(value.device))
            return value

        sub_kwargs = [{k: rows(v, index) for k, v in kwargs.items()} for index in groups]
        text_out = self._text_forward(rows(input_ids, text_rows), rows(inputs_embeds, text_rows), caches[0], **sub_kwargs[0])
        mm_out = self._multimodal_forward(
            rows(input_ids, mm_rows), pixel_values, rows(inputs_embeds, mm_rows), caches[1], **sub_kwargs[1]
        )
        parts = (text_out, mm_out)

        def stitch(tensors):
            first = tensors[0]
            merged = first.new_empty((batch, *first.shape[1:]))
            for tensor, index in zip(tensors, groups):
                merged.index_copy_(0, index.to(first.device), tensor.to(first.dtype))
            return merged

        def stitch_tuple(name):
            values = [getattr(p, name) for p in parts]
            if any(v is None for v in values):
                return None
            return tuple(stitch(layer_values) for layer_values in zip(*values))

        logits = stitch([p.logits for p in parts])
        loss = None
        if labels is not None:
            if input_ids is not None:
                labels = labels.masked_fill(self.get_placeholder_mask(input_ids), -100)
            loss = self.language_model.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size
            )
        cache = None
        if use_cache:
            cache = past_key_values if past_key_values is not None else DynamicCache()
            merge_cache_rows(cache, [p.past_key_values for p in parts], groups, batch)
        return GenieBlueCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=cache,
            hidden_states=stitch_tuple("hidden_states"),
            attentions=stitch_tuple("attentions"),
            image_hidden_states=mm_out.image_hidden_states,
        )

    # -- generation -----------------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, *args, pixel_values=None, is_first_iteration=False, **kwargs):
        """Pass ``pixel_values`` only where the images are consumed: prefill, or every step without a cache.

        An empty cache at the first iteration starts new sequences: generate may reuse one cache object across calls
        (a reset StaticCache), so the routes recorded for it are forgotten.
        """
        cache = kwargs.get("past_key_values")
        if is_first_iteration and cache is not None and cache.get_seq_length() == 0:
            self._route_registry.forget(cache)
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["pixel_values"] = pixel_values
        else:
            model_inputs.pop("pixel_values", None)
        return model_inputs


# save_pretrained copies this file and its relative imports next to config.json (config.auto_map lists them all).
GenieBlueForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["GenieBlueForConditionalGeneration", "GenieBluePreTrainedModel", "GenieBlueMultiModalProjector"]
