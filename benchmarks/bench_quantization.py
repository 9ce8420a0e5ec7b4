"""Mixed precision as in the paper (W4 LLM, W8 vision/projector/LoRA) against the same model in bf16.

    python benchmarks/bench_quantization.py --size tiny
    python benchmarks/bench_quantization.py --size mid --json benchmarks/results/quantization-mid.json

Reports, per part, the stored bytes (packed weights and scales) in bf16 and quantized; and the quality cost on both
paths: logit error against bf16 (max, mean, and mean relative to the mean |logit|) and greedy-token agreement over
generated continuations. The text path is also checked against the base quantized on its own (bit-identical).
The models are random: their logits are nearly flat, so greedy agreement here is a lower bound that says little
about a trained model; the logit errors are the meaningful numbers.
"""

import argparse
import copy
import json
import logging
from pathlib import Path

import torch
from huggingface_hub.utils import tqdm

from bench_paths import build, image_inputs  # the script's folder is on sys.path

from genieblue_hf.quantization import quantize_language_model, quantize_like_paper, storage_bytes  # noqa: E402


log = logging.getLogger("genieblue.bench.quantization")
PARTS = ("language_model", "replicated_layers", "lora", "vision_tower", "multi_modal_projector")


def agreement(reference, candidate, inputs_list, steps):
    """Mean fraction of greedy tokens that match, and logit errors on the prompt, over ``inputs_list``."""
    matches, total, max_err, mean_err, scale = 0, 0, 0.0, [], []
    with torch.no_grad():
        for inputs in tqdm(inputs_list, desc="prompts", leave=False):
            a = reference(**inputs).logits.float()
            b = candidate(**inputs).logits.float()
            max_err = max(max_err, (a - b).abs().max().item())
            mean_err.append((a - b).abs().mean().item())
            scale.append(a.abs().mean().item())
            gen = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
            x = reference.generate(**inputs, **gen)[:, -steps:]
            y = candidate.generate(**inputs, **gen)[:, -steps:]
            matches += (x == y).sum().item()
            total += x.numel()
    return {"greedy_agreement": matches / total, "logit_max_abs_err": max_err,
            "logit_mean_abs_err": sum(mean_err) / len(mean_err),
            "logit_mean_rel_err": sum(mean_err) / sum(scale)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "mid"], default="tiny")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cpu = torch.device("cpu")
    reference = build(args.size, torch.bfloat16, cpu)
    quantized = quantize_like_paper(copy.deepcopy(reference))
    base_alone = copy.deepcopy(reference.language_model)
    quantize_language_model(base_alone)

    report = {"size": args.size, "storage_mb": {}}
    for part in PARTS:
        before, after = storage_bytes(getattr(reference, part)), storage_bytes(getattr(quantized, part))
        report["storage_mb"][part] = {"bf16": before / 2**20, "quantized": after / 2**20, "ratio": after / before}
    before, after = storage_bytes(reference), storage_bytes(quantized)
    report["storage_mb"]["total"] = {"bf16": before / 2**20, "quantized": after / 2**20, "ratio": after / before}

    vocab = reference.config.text_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    text_inputs = [{"input_ids": torch.randint(3, vocab, (1, 32), generator=generator)} for _ in range(args.prompts)]
    image_list = []
    for seed in range(args.prompts):
        torch.manual_seed(seed)
        ids, pixels = image_inputs(reference, cpu)
        image_list.append({"input_ids": ids, "pixel_values": pixels})
    report["text_path"] = agreement(reference, quantized, text_inputs, args.steps)
    report["multimodal_path"] = agreement(reference, quantized, image_list, args.steps)
    with torch.no_grad():
        report["text_path_equals_quantized_base"] = all(
            torch.equal(quantized(**inputs).logits, base_alone(**inputs).logits) for inputs in text_inputs
        )

    for part, row in report["storage_mb"].items():
        log.info("%-24s bf16 %9.2f MB  quantized %9.2f MB  (x%.3f)", part, row["bf16"], row["quantized"], row["ratio"])
    for path in ("text_path", "multimodal_path"):
        log.info("%-16s %s", path, {k: round(v, 4) for k, v in report[path].items()})
    log.info("text path equals the base quantized on its own: %s", report["text_path_equals_quantized_base"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
