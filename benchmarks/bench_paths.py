"""GenieBlue benchmarks: every number is a ratio against a baseline measured in the same run.

    python benchmarks/bench_paths.py                       # tiny model, CPU
    python benchmarks/bench_paths.py --size mid            # ~0.5B parameters, Qwen2.5-0.5B shapes
    python benchmarks/bench_paths.py --device cuda --dtype bf16 --size mid

Measures (medians of ``--repeats``, the two sides of each ratio interleaved):
  1. text path vs the plain base class: prefill forward and greedy decode (target <= 1.01)
  2. multimodal path per LoRA mode vs the dense export: prefill and decode speed (targets merged >= 0.97,
     unmerged >= 0.85 of the dense speed)
  3. memory: parameter bytes per part, and the process's resident memory against their sum
  4. load time (from_pretrained) vs the base alone
  5. conversion: seconds and peak resident memory per shard size
Writes a JSON report (``--json``) and logs a table.
"""

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from huggingface_hub.utils import tqdm
from transformers import AutoModelForCausalLM

from genieblue_hf import GenieBlueForConditionalGeneration
from genieblue_hf.conversion import dense_model
from genieblue_hf.publish import parameter_counts
from genieblue_hf.synthetic import tiny_base, tiny_vision_tower


log = logging.getLogger("genieblue.bench")

SIZES = {
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8)),
    # Qwen2.5-0.5B shapes (the vision tower is kept small: the LLM paths are what is compared)
    "mid": dict(text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
                vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
                            image_size=224, patch_size=14)),
    # the ExecuTorch benchmark: weights dominate the program, 4 blocks (block 3 replicated, LoRA on 0-2), lowering
    # takes minutes
    "device": dict(text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True),
                   vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                               image_size=64, patch_size=8)),
    # GenieBlue-3B: Qwen2.5-3B and SigLIP-so400m-patch14-384 shapes (for accelerators: 8.5 GB in bf16)
    "3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
               vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=384, patch_size=14)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(size, dtype, device):
    """A GenieBlue of ``SIZES[size]`` from the package's tiny-model factory (no special tokens: generation runs its
    full length)."""
    spec = SIZES[size]
    base = tiny_base("qwen2", 0, max_position_embeddings=4096, pad_token_id=None, bos_token_id=None,
                     eos_token_id=None, **spec["text"])
    vision = tiny_vision_tower(1, **spec["vision"])
    model = GenieBlueForConditionalGeneration.from_base(base, vision).eval()
    with torch.no_grad():  # a trained multimodal path: LoRA B no longer zero
        for name, param in model.lora.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.02)
    return model.to(device=device, dtype=dtype)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def compare(name, candidate, baseline, device, repeats):
    """Median seconds of ``candidate`` and ``baseline``, interleaved, after one warm-up each."""
    candidate(), baseline()
    a, b = [], []
    for _ in tqdm(range(repeats), desc=name, leave=False):
        a.append(timed(candidate, device))
        b.append(timed(baseline, device))
    return statistics.median(a), statistics.median(b)


def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def bench_text_path(model, device, args):
    base = type(model.language_model)(model.language_model.config)
    base.load_state_dict(model.language_model.state_dict())
    base.to(device=device, dtype=model.language_model.dtype).eval()
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(3, vocab, (1, args.prefill), device=device)
    results = {}
    with torch.no_grad():
        ours, theirs = compare("text prefill", lambda: model(input_ids=ids), lambda: base(input_ids=ids), device,
                               args.repeats)
        results["text_prefill_ratio"] = ours / theirs
        gen = dict(max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False)
        ours, theirs = compare("text decode", lambda: model.generate(input_ids=ids, **gen),
                               lambda: base.generate(input_ids=ids, **gen), device, args.repeats)
        results["text_decode_ratio"] = ours / theirs
    return results


def image_inputs(model, device):
    config = model.config
    size = config.vision_image_size
    ids = torch.cat([torch.randint(3, 100, (1, 8)), torch.full((1, config.image_tokens_per_tile), config.image_token_id),
                     torch.randint(3, 100, (1, 24))], dim=1).to(device)
    pixels = torch.randn(1, 3, size, size, device=device, dtype=model.vision_tower.dtype)
    return ids, pixels


def bench_multimodal(model, device, args):
    dense = dense_model(model).to(device).eval()
    ids, pixels = image_inputs(model, device)
    gen = dict(max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False)
    results = {}
    with torch.no_grad():
        for mode in ("unmerged", "merged"):
            ours, theirs = compare(f"{mode} prefill", lambda: model(input_ids=ids, pixel_values=pixels, lora_mode=mode),
                                   lambda: dense(input_ids=ids, pixel_values=pixels), device, args.repeats)
            results[f"{mode}_prefill_speed_vs_dense"] = theirs / ours
            ours, theirs = compare(
                f"{mode} decode", lambda: model.generate(input_ids=ids, pixel_values=pixels, lora_mode=mode, **gen),
                lambda: dense.generate(input_ids=ids, pixel_values=pixels, **gen), device, args.repeats)
            results[f"{mode}_decode_speed_vs_dense"] = theirs / ours
    return results


def bench_mixed_batch(model, device, args):
    """One text row and one image row of ``--mixed-prompt`` tokens each, generated as one batch (a RoutedCache: one
    KV cache per path) against the two rows generated as separate batches."""
    length = args.mixed_prompt
    ids, pixels = image_inputs(model, device)
    filler = torch.randint(3, 100, (1, length - ids.shape[1]), device=device)
    image_row = torch.cat([ids, filler], dim=1)
    text_row = torch.randint(3, 100, (1, length), device=device)
    both = torch.cat([text_row, image_row])
    gen = dict(max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False)

    def separate():
        model.generate(input_ids=text_row, **gen)
        model.generate(input_ids=image_row, pixel_values=pixels, **gen)

    with torch.no_grad():
        ours, theirs = compare("mixed batch", lambda: model.generate(input_ids=both, pixel_values=pixels, **gen),
                               separate, device, args.repeats)
    return {"mixed_batch_time_vs_separate_batches": ours / theirs, "mixed_prompt_tokens": length}


def bench_memory(args, device):
    baseline = rss_mb()
    model = build(args.size, DTYPES[args.dtype], device)
    after_build = rss_mb()
    counts = parameter_counts(model)
    element = torch.finfo(DTYPES[args.dtype]).bits // 8
    param_bytes = {part: count * element for part, count in counts.items()}
    result = {"param_mb": {k: v / 2**20 for k, v in param_bytes.items()}}
    if device.type == "cpu":
        result["rss_growth_vs_param_bytes"] = (after_build - baseline) * 2**20 / param_bytes["total"]
    return model, result


def bench_load(model, args):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model.save_pretrained(folder / "genieblue")
        model.language_model.save_pretrained(folder / "base")
        ours, theirs = [], []
        for _ in tqdm(range(args.repeats), desc="load", leave=False):
            ours.append(timed(lambda: GenieBlueForConditionalGeneration.from_pretrained(folder / "genieblue"),
                              torch.device("cpu")))
            theirs.append(timed(lambda: AutoModelForCausalLM.from_pretrained(folder / "base"), torch.device("cpu")))
        return {"load_time_ratio_vs_base": statistics.median(ours) / statistics.median(theirs)}


CONVERT = textwrap.dedent(
    """
    import sys, time
    from genieblue_hf.conversion import convert
    def hwm():
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) for l in status if l.startswith("VmHWM")) / 1024
    before = hwm(); start = time.perf_counter()
    convert(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[3], verify=False)
    print("RESULT", time.perf_counter() - start, hwm() - before)
    """
)


def bench_conversion(model, args):
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model.save_pretrained(folder / "ckpt")
        model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        for shard in args.shard_sizes:
            out = subprocess.run([sys.executable, "-c", CONVERT, str(folder / "ckpt"), str(folder / f"out-{shard}"),
                                  shard], capture_output=True, text=True, check=True)
            seconds, peak = map(float, out.stdout.split("RESULT")[1].split())
            results[shard] = {"seconds": seconds, "mb_per_s": model_mb / seconds, "peak_growth_mb": peak}
    return {"conversion": results, "checkpoint_mb": model_mb}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--shard-sizes", nargs="+", default=["2MB", "50MB"])
    parser.add_argument("--mixed-prompt", type=int, default=1024,
                        help="prompt tokens per row of the mixed-batch comparison (0 skips it)")
    parser.add_argument("--paths-only", action="store_true", help="skip the load-time and conversion measurements")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model, report = bench_memory(args, device)
    report.update(size=args.size, device=str(device), dtype=args.dtype, repeats=args.repeats,
                  torch=torch.__version__, parameters=parameter_counts(model))
    report.update(bench_text_path(model, device, args))
    report.update(bench_multimodal(model, device, args))
    if args.mixed_prompt:
        report.update(bench_mixed_batch(model, device, args))
    if not args.paths_only:
        cpu_model = model if device.type == "cpu" else model.to("cpu")
        report.update(bench_load(cpu_model, args))
        report.update(bench_conversion(cpu_model, args))

    rows = [(k, v) for k, v in report.items() if isinstance(v, float)]
    log.info("\n%s", "\n".join(f"{k:<40} {v:8.3f}" for k, v in rows))
    log.info("parameter MB per part: %s", {k: round(v, 2) for k, v in report["param_mb"].items()})
    log.info("conversion: %s", report.get("conversion"))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
