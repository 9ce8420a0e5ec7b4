"""GenieBlue as a native vLLM model: vLLM's own layers, attention, LoRA and multimodal processing.

One batch holds text requests and image requests. Per token:

- every base block runs as vLLM's own decoder layer of the base's architecture (Qwen2 or Llama);
- the route probe (``language_model.genieblue_route``, a square linear of zero weight) returns 1 for tokens of
  requests that carry GenieBlue's route adapter (``multimodal_lora/``, attached to image requests by
  ``--default-mm-loras``) and 0 otherwise; LoRA on the base blocks applies to those same tokens only, through vLLM's
  LoRA kernels;
- at a replicated slot the tokens are split: the text tokens run the base block's projections, norms and MLP, the
  image requests' tokens the trained copy's, and one call of the base block's attention op serves both groups (the
  op has no weights; each request's keys and values go to its own KV blocks).

Text requests therefore compute exactly the base's operations on the base's weights. Their prefix-cache blocks
never meet an image request's: the LoRA name is part of vLLM's block hash.

Supported bases: decoders built like Qwen2 and Llama (model types ``qwen2``, ``llama``, ``mistral``), with a SigLIP
vision tower. Tensor parallelism follows vLLM's parallel linears; pipeline parallelism is not supported.
"""

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import BatchFeature

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsMultiModal
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.siglip import SiglipVisionModel
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo, PromptReplacement, PromptUpdate,
)

from ..modeling.configuration_genieblue import GenieBlueConfig
from ..modeling.modeling_genieblue import merge_patch_tokens
from ..modeling.processing_genieblue import GenieBlueProcessor
from .route_adapter import FOLDER, PROBE

logger = init_logger(__name__)

# text_config.model_type -> (vLLM architecture of the base, decoder family of its blocks)
SUPPORTED_BASES = {"qwen2": ("Qwen2ForCausalLM", "qwen2"), "llama": ("LlamaForCausalLM", "llama"),
                   "mistral": ("MistralForCausalLM", "llama")}
STACKED = (  # checkpoint name -> (vLLM fused parameter, shard)
    (".q_proj", ".qkv_proj", "q"), (".k_proj", ".qkv_proj", "k"), (".v_proj", ".qkv_proj", "v"),
    (".gate_proj", ".gate_up_proj", 0), (".up_proj", ".gate_up_proj", 1),
)


# -- multimodal processing ------------------------------------------------------------------------------------------


class GenieBlueProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self):
        return self.ctx.get_hf_config(GenieBlueConfig)

    def get_hf_processor(self, **kwargs):
        return self.ctx.get_hf_processor(GenieBlueProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return self.get_hf_processor().image_processor.num_image_tokens(image_width, image_height)

    def get_image_size_with_most_features(self) -> ImageSize:
        image_processor = self.get_hf_processor().image_processor
        side = image_processor.image_size
        best = max(((c, r) for c in range(1, image_processor.max_tiles + 1)
                    for r in range(1, image_processor.max_tiles + 1) if c * r <= image_processor.max_tiles),
                   key=lambda grid: image_processor.num_tiles(grid[0] * side, grid[1] * side))
        return ImageSize(width=best[0] * side, height=best[1] * side)


class GenieBlueDummyInputsBuilder(BaseDummyInputsBuilder[GenieBlueProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        size = self.info.get_image_size_with_most_features()
        return {"image": self._get_dummy_images(width=size.width, height=size.height,
                                                num_images=mm_counts.get("image", 0),
                                                overrides=mm_options.get("image"))}


class GenieBlueMultiModalProcessor(BaseMultiModalProcessor[GenieBlueProcessingInfo]):
    """Images through GenieBlue's own image processor (tiles and thumbnail); each ``<image>`` marker in the prompt
    becomes ``tiles x image_tokens_per_tile`` placeholder tokens, as the transformers processor does."""

    def _get_hf_mm_text(self, mm_counts):
        return None  # the renderer tokenizes the prompt; only the images go through the processor

    def _call_hf_processor(self, hf_data, hf_kwargs) -> BatchFeature:
        image_processor = self.info.get_hf_processor().image_processor
        images = hf_data.get("images", [])
        processed = image_processor(images)
        return BatchFeature({"pixel_values": processed["pixel_values"],
                             "num_tiles": torch.tensor(processed["num_tiles"], dtype=torch.long)})

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        num_tiles = hf_inputs.get("num_tiles", torch.empty(0, dtype=torch.long))
        return {"pixel_values": MultiModalFieldConfig.flat_from_sizes("image", num_tiles),
                "num_tiles": MultiModalFieldConfig.batched("image", keep_on_cpu=True)}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs,
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        processor = self.info.get_hf_processor()
        # placeholders are the marker token itself, repeated: vLLM takes prompt ids from the tokenizer's vocabulary
        # and finds image positions by the replacement's span (GenieBlue's image_token_id lies past the base vocab)
        marker = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

        def replacement(item_idx: int):
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            return [marker] * self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)

        return [PromptReplacement(modality="image", target=[marker], replacement=replacement)]


# -- model ----------------------------------------------------------------------------------------------------------


class GenieBlueProjector(nn.Module):
    """Token merging (zero-padded odd grids), LayerNorm, 2-layer MLP: GenieBlue's projector with vLLM linears."""

    def __init__(self, config, quant_config, prefix):
        super().__init__()
        self.ratio = config.downsample_ratio
        width = config.vision_config.hidden_size * self.ratio**2
        hidden = config.text_config.hidden_size
        self.layer_norm = nn.LayerNorm(width) if config.projector_layernorm else None
        self.linear_1 = ColumnParallelLinear(width, hidden, bias=True, quant_config=quant_config,
                                             prefix=f"{prefix}.linear_1")
        self.act = get_act_fn(config.projector_hidden_act)
        self.linear_2 = RowParallelLinear(hidden, hidden, bias=True, quant_config=quant_config,
                                          prefix=f"{prefix}.linear_2")

    def forward(self, features):
        features = merge_patch_tokens(features, self.ratio)
        if self.layer_norm is not None:
            features = self.layer_norm(features)
        hidden, _ = self.linear_1(features)
        hidden, _ = self.linear_2(self.act(hidden))
        return hidden


class ReplicaAttentionWeights(nn.Module):
    """A replicated block's attention projections; the attention op itself is the base block's."""

    def __init__(self, config, bias, quant_config, prefix):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=bias, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        bias=getattr(config, "attention_bias", False) and bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")


class ReplicaBlock(nn.Module):
    """A trained copy of a base block: its norms, attention projections and MLP (weights of its own)."""

    def __init__(self, family, config, quant_config, prefix):
        super().__init__()
        if family == "qwen2":
            from vllm.model_executor.models.qwen2 import Qwen2MLP as MLP

            qkv_bias, mlp_kwargs = True, {}
        else:
            from vllm.model_executor.models.llama import LlamaMLP as MLP

            qkv_bias = getattr(config, "attention_bias", False)
            mlp_kwargs = {"bias": getattr(config, "mlp_bias", False)}
        self.self_attn = ReplicaAttentionWeights(config, qkv_bias, quant_config, f"{prefix}.self_attn")
        self.mlp = MLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                       hidden_act=config.hidden_act, quant_config=quant_config, prefix=f"{prefix}.mlp", **mlp_kwargs)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


def _by_group(groups, fn_text, fn_image, *tensors):
    """Run ``fn_text`` on the text tokens and ``fn_image`` on the image tokens; outputs back in token order."""
    text_rows, image_rows = groups
    outputs = []
    for rows, fn in ((text_rows, fn_text), (image_rows, fn_image)):
        if rows.numel():
            outputs.append((rows, fn(*(t.index_select(0, rows) for t in tensors))))
    first = outputs[0][1]
    single = not isinstance(first, tuple)
    results = [first] if single else list(first)
    merged = [r.new_empty((tensors[0].shape[0], *r.shape[1:])) for r in results]
    for rows, out in outputs:
        for target, value in zip(merged, [out] if single else out):
            target.index_copy_(0, rows, value)
    return merged[0] if single else tuple(merged)


def _norm(norm):
    return lambda h, r=None: norm(h) if r is None else norm(h, r)


def _without_lora(linear):
    """The linear layer itself, without vLLM's LoRA wrapper (``base_layer``): blocks at replicated slots carry no
    LoRA in GenieBlue, and a wrapper's token-to-adapter map covers the whole batch, not a split of it."""
    return getattr(linear, "base_layer", linear)


def _linear(linear):
    plain = _without_lora(linear)
    return lambda h: plain(h)[0]


def _mlp(mlp):
    """vLLM's Qwen2/Llama MLP (fused gate and up projection, activation, down projection) without LoRA wrappers."""
    gate_up, down = _linear(mlp.gate_up_proj), _linear(mlp.down_proj)
    return lambda h: down(mlp.act_fn(gate_up(h)))


def routed_block(base, replica, positions, hidden, residual, groups):
    """One decoder block at a replicated slot: base weights on text tokens, the copy's on image tokens, one
    attention op for all (vLLM's Qwen2/Llama decoder layer, split by token group)."""
    attn = base.self_attn
    if residual is None:
        residual = hidden
        hidden = _by_group(groups, _norm(base.input_layernorm), _norm(replica.input_layernorm), hidden)
    else:
        hidden, residual = _by_group(groups, _norm(base.input_layernorm), _norm(replica.input_layernorm), hidden,
                                     residual)
    qkv = _by_group(groups, _linear(attn.qkv_proj), _linear(replica.self_attn.qkv_proj), hidden)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = attn.rotary_emb(positions, q, k)
    out = attn.attn(q, k, v)
    hidden = _by_group(groups, _linear(attn.o_proj), _linear(replica.self_attn.o_proj), out)
    hidden, residual = _by_group(groups, _norm(base.post_attention_layernorm),
                                 _norm(replica.post_attention_layernorm), hidden, residual)
    hidden = _by_group(groups, _mlp(base.mlp), _mlp(replica.mlp), hidden)
    return hidden, residual


@MULTIMODAL_REGISTRY.register_processor(
    GenieBlueMultiModalProcessor, info=GenieBlueProcessingInfo, dummy_inputs=GenieBlueDummyInputsBuilder
)
class GenieBlueForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsLoRA):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError("GenieBlue takes images only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        text_config = config.text_config
        quant_config = vllm_config.quant_config
        self.config = config
        if text_config.model_type not in SUPPORTED_BASES:
            raise ValueError(f"GenieBlue's vLLM model supports bases of type {sorted(SUPPORTED_BASES)}, not "
                             f"{text_config.model_type!r}; serve this checkpoint with transformers")
        architecture, family = SUPPORTED_BASES[text_config.model_type]
        self.dense = config.is_dense  # a dense export (genieblue export-dense): one LM for both routes, no LoRA
        if not self.dense:
            check_route_adapter(vllm_config)
        # image positions never look up the base embedding (the marker may lie past it): mask them all
        self.configure_mm_token_handling(vocab_size=text_config.vocab_size, mm_token_ids=[text_config.vocab_size])
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = SiglipVisionModel(config.vision_config, quant_config=quant_config,
                                                  require_post_norm=True, use_head=False,
                                                  prefix=maybe_prefix(prefix, "vision_tower"))
            self.multi_modal_projector = GenieBlueProjector(config, quant_config,
                                                            maybe_prefix(prefix, "multi_modal_projector"))
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=text_config, architectures=[architecture],
                prefix=maybe_prefix(prefix, "language_model"))
            if not self.dense:
                # the route probe: zero weight; the route adapter's LoRA makes it the identity for image requests
                rank = config.lora_rank
                self.language_model.add_module(PROBE, ReplicatedLinear(
                    rank, rank, bias=False, quant_config=None, prefix=maybe_prefix(prefix, f"language_model.{PROBE}")))
        self.replicated_layers = nn.ModuleDict({
            str(i): ReplicaBlock(family, text_config, quant_config, maybe_prefix(prefix, f"replicated_layers.{i}"))
            for i in config.replicated_layers
        })
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        self._is_multimodal = None

    # -- images -----------------------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs):
        pixel_values = kwargs.get("pixel_values")
        num_tiles = kwargs.get("num_tiles")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        features = self.vision_tower(pixel_values.to(self.vision_tower.dtype))
        projected = self.multi_modal_projector(features)
        tiles = torch.as_tensor(num_tiles).flatten().tolist()
        return [item.flatten(0, 1) for item in projected.split(tiles)]

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        self._is_multimodal = is_multimodal  # checked against the route in forward
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    # -- decoder ----------------------------------------------------------------------------------------------------
    def _routes(self, hidden):
        """Per token: True for tokens of requests carrying the route adapter (the multimodal path)."""
        probe = getattr(self.language_model, PROBE)
        ones = hidden.new_ones((hidden.shape[0], probe.input_size))
        routed, _ = probe(ones)
        return routed[:, 0] > 0.5

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        lm = self.language_model.model
        hidden = inputs_embeds if inputs_embeds is not None else lm.embed_input_ids(input_ids)
        if self.dense:
            self._is_multimodal = None
            return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=hidden)
        routes = self._routes(hidden)
        images = self._is_multimodal
        self._is_multimodal = None
        if images is not None and images.shape[0] == routes.shape[0] and bool((images & ~routes).any()):
            raise ValueError("an image request reached GenieBlue without its route adapter; serve with "
                             f"--enable-lora --default-mm-loras '{{\"image\": \"<model>/{FOLDER}\"}}'")
        groups = ((~routes).nonzero().flatten(), routes.nonzero().flatten())
        residual = None
        for index, layer in enumerate(lm.layers):
            replica = self.replicated_layers[str(index)] if str(index) in self.replicated_layers else None
            if replica is None or not groups[1].numel():
                hidden, residual = layer(positions, hidden, residual)
            else:
                hidden, residual = routed_block(layer, replica, positions, hidden, residual, groups)
        hidden, _ = lm.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden_states):
        return self.language_model.compute_logits(hidden_states)

    # -- weights ----------------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint keys as GenieBlue saves them (``language_model.``, ``vision_tower.vision_model.``,
        ``multi_modal_projector.``, ``replicated_layers.``); ``lora.`` is served from the route adapter."""
        replicas = {}
        rest = []
        for name, tensor in weights:
            if name.startswith("lora."):
                continue
            if name.startswith("replicated_layers."):
                replicas[name] = tensor
            else:
                rest.append((name, tensor))
        loaded = AutoWeightsLoader(self).load_weights(rest)
        params = dict(self.named_parameters())
        for name, tensor in replicas.items():
            for ours, fused, shard in STACKED:
                if ours in name:
                    target = name.replace(ours, fused)
                    params[target].weight_loader(params[target], tensor, shard)
                    loaded.add(target)
                    break
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        if not self.dense:
            with torch.no_grad():  # the probe's own weight is zero: only its LoRA (image requests) makes it non-zero
                getattr(self.language_model, PROBE).weight.zero_()
            loaded.add(f"language_model.{PROBE}.weight")
        return loaded

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(language_model="language_model",
                                                connector="multi_modal_projector", tower_model="vision_tower")


def check_route_adapter(vllm_config):
    """GenieBlue routes image requests by a LoRA request. Start only where every image request gets it: with LoRA
    enabled and the route adapter as the default for images, or as a text-only deployment (no images admitted, no
    LoRA needed: every request runs the base)."""
    model_config = vllm_config.model_config
    images = model_config.multimodal_config.get_limit_per_prompt("image") if model_config.multimodal_config else 0
    if images == 0:
        logger.info("GenieBlue serves text only (no images per prompt): every request runs the base")
        return
    lora = vllm_config.lora_config
    rank = model_config.hf_config.lora_rank
    flags = (f"--enable-lora --max-lora-rank {max(8, rank)} --default-mm-loras "
             f"'{{\"image\": \"<model folder>/{FOLDER}\"}}'")
    if lora is None:
        raise ValueError(f"GenieBlue runs image requests on its multimodal path through its route adapter: start vLLM "
                         f"with {flags}, or serve text only with --limit-mm-per-prompt '{{\"image\": 0}}'")
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and lora.max_loras < 2:
        # vLLM's CPU LoRA ops index adapters by token with -1 for "none", which picks the last slot: with one slot,
        # text tokens decoded beside an image request would get the image adapter; a spare slot stays empty
        raise ValueError("on vLLM's CPU backend GenieBlue needs --max-loras 2 (one slot spare keeps text tokens off "
                         "the image adapter)")
    if lora.max_lora_rank < rank:
        raise ValueError(f"--max-lora-rank must be at least GenieBlue's lora_rank ({rank})")
    if not (lora.default_mm_loras or {}).get("image"):
        raise ValueError(f"GenieBlue needs its route adapter as the default LoRA of image requests: start vLLM with "
                         f"{flags}")
