"""Throughput of a mixed text/image workload on one GenieBlue vLLM engine, against the two deployments it replaces.

    python benchmarks/bench_vllm.py [--size small] [--image-share 0.5] --json benchmarks/results/vllm-cpu.json

Runs in vLLM's environment (``make test-vllm`` builds it). Three engines with the same settings, random-weight
models built locally (``genieblue_hf.vllm.testing``):

- GenieBlue serving the whole workload in one engine (image requests on the multimodal path by the route adapter);
- the base alone serving the text share;
- the dense multimodal export (``genieblue export-dense``) serving the image share.

Reported: requests and output tokens per second of each, and the ratio of GenieBlue's time for the whole workload to
the two dedicated engines' times added (they run one after another on the same cores: what two deployments on this
machine would take). Every request generates exactly the size's ``max_tokens`` (``ignore_eos``), the prefix cache is
off (every repeat computes everything), and times are medians of interleaved repeats.
"""

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path


log = logging.getLogger("bench_vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GB of KV cache per engine on the CPU

SIZES = {
    # the tests' shapes: overhead-dominated, a smoke run
    "tiny": dict(text=None, vision=None, requests=8, max_tokens=8, repeats=1),
    # Qwen2.5-0.5B's decoder widths at 12 layers, a small SigLIP (16 image tokens per tile)
    "small": dict(text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=12, num_attention_heads=14,
                            num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True),
                  vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                              image_size=112, patch_size=14, vision_use_head=False),
                  requests=32, max_tokens=32, repeats=3),
}


def workload(count, image_share, seed=0):
    """``count`` prompts, the first ``image_share`` of them with one generated image each."""
    from genieblue_hf.synthetic import corpus, shape_image

    words = list(dict.fromkeys(corpus()))
    lines = [" ".join(words[(i + k) % len(words)] for k in range(4)) for i in range(count)]  # all different
    images = round(count * image_share)
    colours, shapes = ("red", "green", "blue"), ("square", "circle", "triangle")
    requests = []
    for i in range(count):
        text = lines[i]
        if i < images:
            image = shape_image(colours[i % 3], shapes[(i // 3) % 3], seed=seed + i)
            requests.append({"prompt": f"<image>\n{text}", "multi_modal_data": {"image": image}})
        else:
            requests.append(text)
    return requests[:images], requests[images:]


def timed_generate(llm, prompts, params, lora_request=None):
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(o.outputs[0].token_ids) for o in outputs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--image-share", type=float, default=0.5)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = SIZES[args.size]

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    from genieblue_hf.vllm import testing as vllm_support
    from genieblue_hf.vllm import image_lora_request

    with tempfile.TemporaryDirectory() as root:
        folders = vllm_support.build(Path(root), text=spec["text"], vision=spec["vision"])
        # every round computes everything: no prefix cache across the repeats
        settings = dict(max_num_seqs=spec["requests"], dtype="bfloat16" if spec["text"] else "float32",
                        enable_prefix_caching=False)
        genieblue = LLM(**vllm_support.genieblue_kwargs(folders["genieblue"], **settings))
        base = LLM(**vllm_support.engine_kwargs(folders["base"], **settings))
        dense = LLM(**vllm_support.engine_kwargs(folders["dense"], limit_mm_per_prompt={"image": 1}, **settings))
        images, texts = workload(spec["requests"], args.image_share)
        lora = image_lora_request(folders["genieblue"])
        params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
        mixed = images + texts
        mixed_loras = [lora] * len(images) + [None] * len(texts)
        runs = {"genieblue_mixed": [], "base_text_share": [], "dense_image_share": [], "genieblue_text_share": [],
                "genieblue_image_share": []}
        tokens = {}
        for repeat in range(spec["repeats"] + 1):  # the first round warms every engine up and is not counted
            for name, run in (("genieblue_mixed", lambda: timed_generate(genieblue, mixed, params, mixed_loras)),
                              ("base_text_share", lambda: timed_generate(base, texts, params)),
                              ("dense_image_share", lambda: timed_generate(dense, images, params)),
                              ("genieblue_text_share", lambda: timed_generate(genieblue, texts, params)),
                              ("genieblue_image_share", lambda: timed_generate(genieblue, images, params,
                                                                               [lora] * len(images)))):
                seconds, tokens[name] = run()
                if repeat:
                    runs[name].append(seconds)
        seconds = {name: statistics.median(values) for name, values in runs.items()}
        separate = seconds["base_text_share"] + seconds["dense_image_share"]
        report = {
            "size": args.size,
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "cpu_threads": os.cpu_count(),
            "requests": spec["requests"],
            "image_share": args.image_share,
            "max_tokens": spec["max_tokens"],
            "seconds": seconds,
            "output_tokens_per_s": {name: tokens[name] / seconds[name] for name in seconds},
            "genieblue_throughput_vs_two_engines": separate / seconds["genieblue_mixed"],
            # where the time goes: each share alone on the GenieBlue engine against its dedicated engine
            "genieblue_text_share_speed_vs_base": seconds["base_text_share"] / seconds["genieblue_text_share"],
            "genieblue_image_share_speed_vs_dense": seconds["dense_image_share"] / seconds["genieblue_image_share"],
        }
        del genieblue, base, dense
    log.info("%s", json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
