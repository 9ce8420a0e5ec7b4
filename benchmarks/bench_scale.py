"""GenieBlue at the paper's real size, end to end, on this machine: Qwen2.5-3B shapes + SigLIP-so400m-patch14-384.

    python benchmarks/bench_scale.py --size 3b --work /big/disk/folder --json benchmarks/results/scale-3b-cpu.json
    python benchmarks/bench_scale.py --size tiny          # the same chain in seconds (CI runs it)

Random weights in bf16 with the real shapes (36 layers, hidden 2048, 16 heads, 2 KV heads, vocab 151936, tied
embeddings; SigLIP 27 layers of width 1152 at 384 px). The chain, each step a process of its own:

1. ``make``: a base LLM folder and a SigLIP folder, composed into GenieBlue (LoRA B perturbed, as after training), saved
   as a Trainer-style checkpoint with its processor;
2. ``convert-memory``: ``convert`` without verification, its peak resident memory against the largest tensor plus
   one shard; then ``genieblue convert CKPT OUT --base BASE`` (verified) on the command line;
3. ``genieblue publish OUT --non-shared`` into an offline Hugging Face cache as ``org/genieblue-3b``;
4. ``fresh``: a process where ``genieblue_hf`` cannot be imported loads the repo with ``AutoModel`` and
   ``AutoModelForImageTextToText`` (remote code), runs a text and an image ``generate``, and checks the text tokens
   against the base's own class loaded alone from the same files (``language_model/``);
5. ``load``: ``from_pretrained`` of GenieBlue and of the base alone, each in a fresh process, alternated;
6. ``speed``: text prefill/decode against the base, multimodal prefill against the base at equal length, and
   multimodal decode (merged, unmerged) against a dense export of the multimodal path.

Every number is a ratio of two measurements taken in the same run (medians; the two sides interleaved).
"""

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("genieblue.bench.scale")
HERE = Path(__file__).resolve()
REPO_ID = "org/genieblue-3b"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

SIZES = {
    "3b": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=384, patch_size=14),
        shard="2GB", prefill=64, decode=8, repeats=3, load_repeats=3,
    ),
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=512),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=54, patch_size=2),  # a 27x27 patch grid, as so400m-patch14-384
        shard="200KB", prefill=32, decode=4, repeats=1, load_repeats=1,
    ),
}


# -- helpers --------------------------------------------------------------------------------------------------------


def status_mb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def emit(result):
    print("RESULT" + json.dumps(result), flush=True)


def run_stage(args, stage, *extra, env=None):
    """Run one stage in a fresh process; return its RESULT dict."""
    command = [sys.executable, str(HERE), "--size", args.size, "--work", str(args.work), "--stage", stage, *extra]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=environment)
    if completed.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{completed.stderr[-6000:]}")
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT")]
    result = json.loads(lines[-1][len("RESULT"):]) if lines else {}
    log.info("stage %-14s %6.1f s  %s", stage, time.perf_counter() - started,
             {k: v for k, v in result.items() if not isinstance(v, (dict, list))})
    return result


def run_cli(*argv):
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "genieblue_hf.cli", *argv], capture_output=True, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if completed.returncode != 0:
        raise RuntimeError(f"genieblue {' '.join(argv)} failed:\n{completed.stderr[-4000:]}")
    return time.perf_counter() - started


def folder_bytes(folder, pattern="*.safetensors"):
    return sum(p.stat().st_size for p in Path(folder).rglob(pattern))


def random_model_folder(model_class, config, folder, seed, max_shard_size):
    """A model folder with random weights (N(0, 0.02), norms at 1) in bf16, written without a slow random init."""
    from huggingface_hub import save_torch_state_dict

    with torch.device("meta"):
        skeleton = model_class(config)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in skeleton.state_dict().items():
        tensor = torch.empty(meta.shape, dtype=torch.bfloat16)
        if tensor.ndim > 1:
            tensor.normal_(0.0, 0.02, generator=generator)
        elif key.endswith("bias"):
            tensor.zero_()
        else:
            tensor.fill_(1.0)
        state[key] = tensor
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    folder.mkdir(parents=True)
    save_torch_state_dict(state, folder, max_shard_size=max_shard_size)
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(candidate, baseline, repeats):
    """Medians of ``candidate`` and ``baseline`` seconds, alternating, after one warm-up each."""
    candidate(), baseline()
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(candidate))
        b.append(timed(baseline))
    return statistics.median(a), statistics.median(b)


# -- stages ---------------------------------------------------------------------------------------------------------


def stage_make(args, spec):
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from genieblue_hf import GenieBlueForConditionalGeneration, GenieBlueProcessor
    from genieblue_hf.synthetic import build_bpe_tokenizer, corpus

    work = args.work
    text_config = Qwen2Config(**spec["text"])
    random_model_folder(Qwen2ForCausalLM, text_config, work / "base", 0, spec["shard"])
    random_model_folder(SiglipVisionModel, SiglipVisionConfig(**spec["vision"]), work / "vision", 1, spec["shard"])
    tokenizer = build_bpe_tokenizer(corpus())
    tokenizer.save_pretrained(work / "base")
    model = GenieBlueForConditionalGeneration.from_base(work / "base", work / "vision")
    with torch.no_grad():  # a trained multimodal path: LoRA B no longer zero
        generator = torch.Generator().manual_seed(2)
        for name, param in model.lora.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.02)
    checkpoint = work / "run" / "checkpoint-1000"  # the layout Trainer's save_strategy writes
    model.save_pretrained(checkpoint, max_shard_size=spec["shard"])
    GenieBlueProcessor.for_model(model.config, tokenizer, max_tiles=1).save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1000}))
    counts = {part: sum(p.numel() for p in getattr(model, part).parameters())
              for part in ("language_model", "vision_tower", "multi_modal_projector", "replicated_layers", "lora")}
    emit({"parameters": counts, "image_tokens_per_tile": model.config.image_tokens_per_tile})


def stage_convert_memory(args, spec):
    from genieblue_hf.conversion import convert
    from genieblue_hf.conversion.converter import expected_tensors, load_config

    config = load_config(args.work / "run" / "checkpoint-1000")
    expected_tensors(config)  # lazy transformers imports happen before the baseline is taken
    baseline = status_mb("VmHWM")
    out = args.work / "convert-memory"
    started = time.perf_counter()
    convert(args.work / "run" / "checkpoint-1000", out, base=args.work / "base", max_shard_size=spec["shard"],
            verify=False)
    seconds = time.perf_counter() - started
    growth = status_mb("VmHWM") - baseline
    from safetensors import safe_open

    largest = 0
    for path in out.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                shape, dtype = piece.get_shape(), piece.get_dtype()
                largest = max(largest, torch.Size(shape).numel() * {"BF16": 2, "F16": 2, "F32": 4}.get(dtype, 4))
    shard = max(p.stat().st_size for p in out.glob("*.safetensors"))
    shutil.rmtree(out)
    emit({"seconds": seconds, "peak_growth_mb": growth, "largest_tensor_mb": largest / 2**20,
          "largest_shard_mb": shard / 2**20})


FRESH = """
import json, sys, time
sys.modules["genieblue_hf"] = None  # only the repo's own remote code can serve
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
repo = sys.argv[1]
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
result = {}
for auto in (AutoModel, AutoModelForImageTextToText):
    start = time.perf_counter()
    model = auto.from_pretrained(repo, trust_remote_code=True).eval()
    result[auto.__name__] = {"class": type(model).__module__.split(".")[0] + "." + type(model).__name__,
                             "load_s": time.perf_counter() - start}
    del model
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
messages = [{"role": "user", "content": [{"type": "text", "text": "the quick brown fox"}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                     return_tensors="pt")
image = Image.new("RGB", (500, 400), "white")
messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "describe"}]}]
multimodal = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
greedy = dict(max_new_tokens=int(sys.argv[2]), do_sample=False)
start = time.perf_counter()
text_tokens = model.generate(**text, **greedy)
result["text_generate_s"] = time.perf_counter() - start
start = time.perf_counter()
image_tokens = model.generate(**multimodal, **greedy)
result["image_generate_s"] = time.perf_counter() - start
result["image_placeholders"] = int((multimodal["input_ids"] == model.config.image_token_id).sum())
del model
base = AutoModelForCausalLM.from_pretrained(repo, subfolder="language_model",
                                            key_mapping={r"^language_model\\.": ""}).eval()
result["base_class"] = type(base).__name__
result["text_tokens_equal_base"] = bool(torch.equal(text_tokens, base.generate(**text, **greedy)))
result["image_tokens_differ_from_text"] = image_tokens.shape[1] > multimodal["input_ids"].shape[1]
print("RESULT" + json.dumps(result))
"""


def stage_load(args, spec):
    """One ``from_pretrained`` in this fresh process: GenieBlue (remote code, whole repo) or the base alone."""
    which = args.extra
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    before = status_mb("VmRSS")
    start = time.perf_counter()
    if which == "genieblue":
        model = AutoModelForImageTextToText.from_pretrained(REPO_ID, trust_remote_code=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(REPO_ID, subfolder="language_model",
                                                     key_mapping={r"^language_model\.": ""})
    seconds = time.perf_counter() - start
    # safetensors are memory-mapped: pages arrive when first read. Read every tensor once, so resident memory
    # and the time until the weights are really in memory compare like for like
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()
    resident_seconds = time.perf_counter() - start
    growth = (status_mb("VmRSS") - before) * 2**20
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    emit({"seconds": seconds, "resident_seconds": resident_seconds, "rss_growth_bytes": growth,
          "parameter_bytes": parameter_bytes, "buffer_bytes": buffer_bytes})


def shared_twin(language_model, replace=None):
    """An instance of the base's class whose tensors are ``language_model``'s (no copy), with some replaced."""
    config = language_model.config
    with torch.device("meta"):
        twin = type(language_model)(config)
    state = dict(language_model.state_dict())
    state.update(replace or {})
    twin.load_state_dict(state, assign=True, strict=False)
    for name, buffer in language_model.named_buffers():
        module_path, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(module_path) if module_path else twin, leaf, buffer)
    twin.tie_weights()
    return twin.eval()


def dense_sharing(model):
    """The dense export of ``model``'s multimodal path in memory, sharing every tensor it can: the base's, the
    replicated blocks', and the merged LoRA weights ``model`` computed in merged mode."""
    from genieblue_hf.modeling.genieblue_dispatch import find_decoder_layers

    layers_path, layers = find_decoder_layers(model.language_model, model.config.text_config.num_hidden_layers)
    replace = {}
    for index, replica in model.replicated_layers.items():
        for key, tensor in replica.state_dict().items():
            replace[f"{layers_path}.{index}.{key}"] = tensor
    for index, tree in model.lora.items():
        for path, adapter in tree.adapters().items():
            linear = layers[int(index)].get_submodule(path)
            merged = model._merged_weights.get(linear, adapter, model.config.lora_scaling)
            replace[f"{layers_path}.{index}.{path}.weight"] = merged
    return shared_twin(model.language_model, replace)


def stage_speed(args, spec):
    from genieblue_hf import GenieBlueForConditionalGeneration

    torch.manual_seed(0)
    model = GenieBlueForConditionalGeneration.from_pretrained(args.work / "published").eval()
    base = shared_twin(model.language_model)
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(3, min(vocab, 30000), (1, spec["prefill"]))
    gen = dict(max_new_tokens=spec["decode"], min_new_tokens=spec["decode"], do_sample=False)
    repeats = spec["repeats"]
    result = {}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
        ours, theirs = interleaved(lambda: model(input_ids=ids), lambda: base(input_ids=ids), repeats)
        result["text_prefill_ratio"] = ours / theirs
        ours, theirs = interleaved(lambda: model.generate(input_ids=ids, **gen),
                                   lambda: base.generate(input_ids=ids, **gen), repeats)
        result["text_decode_ratio"] = ours / theirs
        result["base_generate_tokens_per_s"] = spec["decode"] / theirs
        # the multimodal path's decoder against the base at equal length (the vision tower is timed on its own)
        ours, theirs = interleaved(lambda: model(input_ids=ids, route="multimodal"), lambda: base(input_ids=ids),
                                   repeats)
        result["multimodal_prefill_ratio_vs_base_unmerged"] = ours / theirs
        size = model.config.vision_image_size
        pixels = torch.randn(1, 3, size, size, dtype=torch.bfloat16)
        result["vision_tower_and_projector_s"] = statistics.median(
            timed(lambda: model.get_image_features(pixels)) for _ in range(repeats))
        model(input_ids=ids[:, :8], route="multimodal", lora_mode="merged")  # builds the merged weights
        dense = dense_sharing(model)
        for mode in ("unmerged", "merged"):
            ours, theirs = interleaved(
                lambda: model.generate(input_ids=ids, route="multimodal", lora_mode=mode, **gen),
                lambda: dense.generate(input_ids=ids, **gen), repeats)
            result[f"{mode}_decode_speed_vs_dense"] = theirs / ours
        ours, theirs = interleaved(lambda: model(input_ids=ids, route="multimodal", lora_mode="merged"),
                                   lambda: dense(input_ids=ids), repeats)
        result["merged_prefill_speed_vs_dense"] = theirs / ours
        ours, theirs = interleaved(lambda: model(input_ids=ids, route="multimodal", lora_mode="merged"),
                                   lambda: base(input_ids=ids), repeats)
        result["multimodal_prefill_ratio_vs_base_merged"] = ours / theirs
    emit(result)


# -- driver ---------------------------------------------------------------------------------------------------------


def populate_hub_cache(folder, hf_home):
    repo = Path(hf_home) / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.parent.mkdir(parents=True)
    shutil.move(str(folder), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def unique_tensor_bytes(folder):
    from safetensors import safe_open

    total = 0
    for path in Path(folder).rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                total += torch.Size(piece.get_shape()).numel() * {"BF16": 2, "F16": 2, "F32": 4}[piece.get_dtype()]
    return total


def drive(args, spec):
    report = {"size": args.size, "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    import transformers

    report["transformers"] = transformers.__version__
    started = time.perf_counter()
    report["make"] = run_stage(args, "make")
    report["convert_memory"] = cm = run_stage(args, "convert-memory")
    report["conversion_peak_vs_largest_tensor_plus_shard"] = cm["peak_growth_mb"] / (
        cm["largest_tensor_mb"] + cm["largest_shard_mb"])
    report["convert_cli_s"] = run_cli("convert", str(args.work / "run" / "checkpoint-1000"), str(args.work / "out"),
                                      "--base", str(args.work / "base"), "--max-shard-size", spec["shard"])
    shutil.rmtree(args.work / "run")
    report["publish_cli_s"] = run_cli("publish", str(args.work / "out"), str(args.work / "published"), "--repo-id",
                                      REPO_ID, "--non-shared", "--max-shard-size", spec["shard"])
    shutil.rmtree(args.work / "out")
    stored = folder_bytes(args.work / "published")
    report["storage_vs_unique_tensor_bytes"] = stored / unique_tensor_bytes(args.work / "published")
    report["storage_gb"] = stored / 1e9
    report["speed"] = run_stage(args, "speed")
    hf_home = args.work / "hf_home"
    populate_hub_cache(args.work / "published", hf_home)
    env = {"HF_HOME": str(hf_home), "HF_MODULES_CACHE": str(args.work / "modules")}
    fresh = subprocess.run([sys.executable, "-c", FRESH, REPO_ID, str(spec["decode"])], capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, cwd=args.work)
    if fresh.returncode != 0:
        raise RuntimeError(f"fresh-process load failed:\n{fresh.stderr[-6000:]}")
    report["fresh_process"] = json.loads(fresh.stdout.split("RESULT")[-1])
    loads = {"genieblue": [], "base": []}
    for _ in range(spec["load_repeats"]):
        for which in ("base", "genieblue"):
            loads[which].append(run_stage(args, "load", which, env=env))
    genieblue_load, base_load = (statistics.median(r["seconds"] for r in loads[w]) for w in ("genieblue", "base"))
    report["load_time_ratio_vs_base"] = genieblue_load / base_load
    report["load_seconds"] = {"genieblue": genieblue_load, "base": base_load}
    resident = {w: statistics.median(r["resident_seconds"] for r in loads[w]) for w in ("genieblue", "base")}
    report["load_until_resident_seconds"] = resident
    report["load_until_resident_ratio_vs_base_per_byte"] = (
        resident["genieblue"] / loads["genieblue"][-1]["parameter_bytes"]) / (
        resident["base"] / loads["base"][-1]["parameter_bytes"])
    last = loads["genieblue"][-1]
    report["resident_memory_vs_parameter_bytes"] = last["rss_growth_bytes"] / (
        last["parameter_bytes"] + last["buffer_bytes"])
    report["total_minutes"] = (time.perf_counter() - started) / 60
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--work", help="folder for the checkpoints (the 3b run writes ~25 GB; default: a temp dir)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = SIZES[args.size]
    if args.stage:
        args.work = Path(args.work)
        {"make": stage_make, "convert-memory": stage_convert_memory, "load": stage_load,
         "speed": stage_speed}[args.stage](args, spec)
        return None
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        args.work = Path(work)
        report = drive(args, spec)
    log.info("\n%s", json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
