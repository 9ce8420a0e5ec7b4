"""The ExecuTorch program against the base alone and a dense multimodal program, in float32 and quantized like the
paper, all built and measured in the same run with ExecuTorch's runtime (XNNPACK) on this CPU.

    python benchmarks/bench_executorch.py --json benchmarks/results/executorch-cpu.json

Programs: ``genieblue`` (vision encoder, token embedding, text and multimodal decoders over one copy of the base),
``base`` (token embedding and the base's decoder: what the text path must equal), ``dense`` (vision encoder, token
embedding and one decoder with the replicated blocks swapped in and LoRA merged: the multimodal model without the
text path). Reports storage (file bytes), resident memory of a process that loads a program and serves a request
(resident set after serving, over the
interpreter with everything imported; Linux; the runner loads a method on first use, so a text request loads no
multimodal method, and ``both`` serves a text request and then image requests), and decode tokens per second (greedy, batch 1), as
ratios: genieblue/base on text requests, genieblue/dense on image requests. Each measurement runs in a process of
its own, interleaved over ``--rounds``; the best decode speed and the median resident memory count.
"""

import argparse
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_paths import build  # the script's folder is on sys.path

from genieblue_hf.conversion.dense import dense_model  # noqa: E402
from genieblue_hf.executorch import ExecuTorchRunner, genieblue_programs, language_model_programs, lower  # noqa: E402


log = logging.getLogger("genieblue.bench.executorch")


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else ():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def resident_mb():
    """This process's resident set now (Linux ``/proc``), in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(program, route, prompt_tokens, new_tokens, repeats):
    """In this process: load ``program``, serve ``repeats`` requests of ``route``; decode tok/s and the resident
    memory the program added (after serving, over the interpreter with everything imported)."""
    from executorch.runtime import Runtime

    Runtime.get()  # the runtime's own libraries are not the program's memory
    idle = resident_mb()
    start = time.perf_counter()
    runner = ExecuTorchRunner(program)
    load_s = time.perf_counter() - start
    config = runner.metadata
    prompt = torch.randint(3, 100, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    pixel_values = None
    if route == "both":  # a text request first: both decoders loaded, then measured on image requests
        runner.generate(prompt, max_new_tokens=2)
        route = "multimodal"
    if route == "multimodal":
        tile = torch.full((1, int(config["image_tokens_per_tile"])), int(config["image_token_id"]))
        prompt = torch.cat([prompt[:, :8], tile, prompt[:, 8:]], dim=1)
        size = int(config["image_size"])
        pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    best = 0.0
    for _ in range(repeats):
        runner.prefill(prompt, pixel_values)
        start = time.perf_counter()
        runner.generate(prompt, pixel_values, max_new_tokens=new_tokens)  # prefill + decode
        total = time.perf_counter() - start
        prefill_start = time.perf_counter()
        runner.prefill(prompt, pixel_values)
        prefill = time.perf_counter() - prefill_start
        best = max(best, (new_tokens - 1) / max(total - prefill, 1e-9))
    return {"decode_tok_s": best, "resident_mb": resident_mb() - idle, "load_s": load_s}


def measured(program, route, args):
    command = [sys.executable, __file__, "--measure", str(program), route, "--prompt", str(args.prompt),
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def build_programs(model, folder, quantize, max_cache_len):
    """Write the three programs for one precision; returns their paths and the lowering seconds."""
    paths, seconds = {}, {}
    dense = dense_model(model).eval()
    builders = {
        "genieblue": lambda: genieblue_programs(model, max_cache_len, quantize),
        "base": lambda: language_model_programs(model.language_model, max_cache_len, quantize),
        "dense": lambda: language_model_programs(None, max_cache_len, quantize, vision_of=dense),
    }
    for name, make in builders.items():
        start = time.perf_counter()
        paths[name] = folder / f"{name}-{quantize or 'fp32'}.pte"
        if paths[name].exists():  # --programs-dir from an earlier run of the same settings
            continue
        lower(*make()).save(str(paths[name]))
        seconds[name] = time.perf_counter() - start
        log.info("%s (%s): %.1f MB in %.0f s", name, quantize or "fp32", paths[name].stat().st_size / 2**20,
                 seconds[name])
    return paths, seconds


def compare(paths, args):
    sizes = {name: path.stat().st_size / 2**20 for name, path in paths.items()}
    plan = {"genieblue_text": (paths["genieblue"], "text"), "genieblue_multimodal": (paths["genieblue"], "multimodal"),
            "genieblue_both": (paths["genieblue"], "both"), "base_text": (paths["base"], "text"),
            "dense_multimodal": (paths["dense"], "multimodal")}
    rounds = {name: [] for name in plan}
    for _ in range(args.rounds):  # interleaved, so that drift on a shared machine hits every program alike
        for name, (program, route) in plan.items():
            rounds[name].append(measured(program, route, args))
    runs = {name: {"decode_tok_s": max(r["decode_tok_s"] for r in results),
                   "resident_mb": statistics.median(r["resident_mb"] for r in results),
                   "load_s": statistics.median(r["load_s"] for r in results)}
            for name, results in rounds.items()}
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {
        "storage_mb": sizes,
        "runs": runs,
        "ratios": {
            "storage_vs_base": ratio(sizes["genieblue"], sizes["base"]),
            "storage_vs_dense": ratio(sizes["genieblue"], sizes["dense"]),
            "resident_text_vs_base": ratio(runs["genieblue_text"]["resident_mb"], runs["base_text"]["resident_mb"]),
            "resident_both_decoders_vs_base": ratio(runs["genieblue_both"]["resident_mb"],
                                                    runs["base_text"]["resident_mb"]),
            "resident_both_decoders_vs_dense": ratio(runs["genieblue_both"]["resident_mb"],
                                                     runs["dense_multimodal"]["resident_mb"]),
            "resident_multimodal_vs_dense": ratio(runs["genieblue_multimodal"]["resident_mb"],
                                                  runs["dense_multimodal"]["resident_mb"]),
            "text_decode_vs_base": ratio(runs["genieblue_text"]["decode_tok_s"], runs["base_text"]["decode_tok_s"]),
            "multimodal_decode_vs_dense": ratio(runs["genieblue_multimodal"]["decode_tok_s"],
                                                runs["dense_multimodal"]["decode_tok_s"]),
            "multimodal_decode_vs_base_text": ratio(runs["genieblue_multimodal"]["decode_tok_s"],
                                                    runs["base_text"]["decode_tok_s"]),
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="device")
    parser.add_argument("--max-cache-len", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="requests per measuring process (the best counts)")
    parser.add_argument("--rounds", type=int, default=3, help="measuring processes per program, interleaved")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "paper"], choices=["fp32", "paper"])
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--programs-dir", help="keep the programs here (reused if present) instead of a temp dir")
    parser.add_argument("--measure", nargs=2, metavar=("PROGRAM", "ROUTE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args.prompt, args.new_tokens, args.repeats)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = build(args.size, torch.float32, torch.device("cpu"))
    with torch.no_grad():  # trained copies differ from the blocks they copy (identical bytes would be stored once)
        for param in model.replicated_layers.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    report = {
        "machine": f"{cpu_model()}, {torch.get_num_threads()} threads",
        "size": args.size,
        "config": {"replicated_layers": model.config.replicated_layers, "lora_layers": model.config.lora_layers,
                   "max_cache_len": args.max_cache_len, "prompt": args.prompt, "new_tokens": args.new_tokens},
    }
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.programs_dir or scratch
        Path(folder).mkdir(parents=True, exist_ok=True)
        for precision in args.precisions:
            paths, seconds = build_programs(model, Path(folder), None if precision == "fp32" else precision,
                                            args.max_cache_len)
            report[precision] = {**compare(paths, args), "lowering_s": seconds}
            log.info("%s: %s", precision, json.dumps(report[precision]["ratios"], indent=1))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
