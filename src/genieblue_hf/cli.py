"""genieblue: compose, convert, export and publish GenieBlue Hub folders; run the paper in miniature.

Every command reads local folders and writes its output atomically: a failure leaves the previous output (or none).
Mistakes are reported in one line (exit code 1); --traceback shows where an unexpected error came from.
"""

import argparse
import logging
import sys

from transformers.utils import logging as hf_logging


def _publish(args):
    from .publish import publish

    publish(
        args.model_dir, args.out_dir, repo_id=args.repo_id, push=args.push, overwrite=args.overwrite,
        license=args.license, base_model=args.base_model, max_shard_size=args.max_shard_size,
        non_shared=args.non_shared, allow_nonfinite=args.allow_nonfinite, vllm_adapter=not args.no_vllm_adapter,
    )


def _compose(args):
    from .conversion import compose

    compose(args.language_model, args.vision_model, args.out_dir, overwrite=args.overwrite,
            max_shard_size=args.max_shard_size)


def _convert(args):
    from .conversion import convert

    convert(
        args.src, args.out_dir, format=args.format, config=args.config, base=args.base, rest=args.rest,
        processor=args.processor, key_map=args.key_map, dtype=args.dtype, cast_base=args.cast_base,
        max_shard_size=args.max_shard_size, verify=not args.no_verify, overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite, allow_base_drift=args.allow_base_drift,
    )


def _export_dense(args):
    from .conversion import export_dense

    export_dense(args.model_dir, args.out_dir, language_model_only=args.language_model_only,
                 overwrite=args.overwrite, max_shard_size=args.max_shard_size)


def _export_executorch(args):
    from .executorch import export_executorch

    export_executorch(args.model_dir, args.out_dir, max_cache_len=args.max_cache_len, quantize=args.quantize,
                      overwrite=args.overwrite)


def _bench_paper(args):
    from genieblue_paper import Settings, render, reproduce

    if args.from_results:
        render(args.from_results)
        return

    settings = Settings.quick() if args.quick else Settings()
    if args.seeds:
        settings.seeds = tuple(args.seeds)
    if args.stage2_steps:
        settings.stage2_steps = args.stage2_steps
    if args.jobs:
        settings.jobs = args.jobs
    settings.cache_dir = args.cache_dir
    reproduce(args.out, settings, demo_model_dir=args.save_demo_model, overwrite=args.overwrite)


def build_parser():
    parser = argparse.ArgumentParser(prog="genieblue", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an unexpected error")
    commands = parser.add_subparsers(dest="command", required=True)

    publish = commands.add_parser("publish", help="assemble a Hub folder with a model card; optionally push it")
    publish.add_argument("model_dir", help="a saved GenieBlue model folder (with its processor files)")
    publish.add_argument("out_dir", help="where to write the Hub folder")
    publish.add_argument("--repo-id", help="org/name on the Hub (used in the model card and for --push)")
    publish.add_argument("--push", action="store_true", help="create the repo and upload the folder")
    publish.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    publish.add_argument("--license", default="apache-2.0")
    publish.add_argument("--base-model", help="Hub id of the base LLM, for the card metadata")
    publish.add_argument("--max-shard-size", default="2GB")
    publish.add_argument("--allow-nonfinite", action="store_true", help="warn instead of failing on NaN/Inf weights")
    publish.add_argument("--no-vllm-adapter", action="store_true",
                         help="leave out multimodal_lora/, the adapter vLLM routes image requests with")
    publish.add_argument("--non-shared", action="store_true",
                         help="put the base LLM in language_model/ so text-only users can fetch it alone")
    publish.set_defaults(func=_publish)

    compose = commands.add_parser("compose", help="a fresh GenieBlue folder from a base LLM and a SigLIP tower")
    compose.add_argument("--language-model", required=True, help="folder of a Hugging Face causal LM")
    compose.add_argument("--vision-model", required=True, help="folder of a SigLIP vision model")
    compose.add_argument("out_dir")
    compose.add_argument("--overwrite", action="store_true")
    compose.add_argument("--max-shard-size", default="2GB")
    compose.set_defaults(func=_compose)

    convert = commands.add_parser("convert", help="a training checkpoint to a sharded-safetensors Hub folder")
    convert.add_argument("src", help="Trainer/accelerate folder, .pt/.bin file, PEFT adapter folder or DCP folder")
    convert.add_argument("out_dir")
    convert.add_argument("--format", choices=["trainer", "torch", "peft", "dcp"], help="default: detected")
    convert.add_argument("--config", help="GenieBlue config.json (or its folder) when SRC has none")
    convert.add_argument("--base", help="the original base LLM folder: its tensors are copied byte for byte")
    convert.add_argument("--rest", help="with a PEFT adapter: the folder/file with the other trained tensors")
    convert.add_argument("--processor", help="folder with the tokenizer/processor files to include")
    convert.add_argument("--key-map", action="append", default=[], metavar="REGEX=REPLACEMENT",
                         help="extra key renaming rule (repeatable)")
    convert.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast the trained tensors")
    convert.add_argument("--cast-base", action="store_true", help="cast the base tensors with --dtype too")
    convert.add_argument("--max-shard-size", default="2GB")
    convert.add_argument("--no-verify", action="store_true", help="skip reloading and comparing the output")
    convert.add_argument("--overwrite", action="store_true")
    convert.add_argument("--allow-nonfinite", action="store_true", help="warn instead of failing on NaN/Inf")
    convert.add_argument("--allow-base-drift", action="store_true",
                         help="warn instead of failing when the checkpoint's base differs from --base")
    convert.set_defaults(func=_convert)

    dense = commands.add_parser("export-dense", help="the multimodal path as a plain model (blocks swapped, LoRA merged)")
    dense.add_argument("model_dir")
    dense.add_argument("out_dir")
    dense.add_argument("--language-model-only", action="store_true",
                       help="write only the dense causal LM, as a folder of the base's own class")
    dense.add_argument("--overwrite", action="store_true")
    dense.add_argument("--max-shard-size", default="2GB")
    dense.set_defaults(func=_export_dense)

    on_device = commands.add_parser(
        "export-executorch",
        help="an ExecuTorch program (XNNPACK): vision encoder, token embedding, text and multimodal decoders",
    )
    on_device.add_argument("model_dir", help="a saved GenieBlue model folder")
    on_device.add_argument("out_dir", help="where to write model.pte and the tokenizer/processor files")
    on_device.add_argument("--max-cache-len", type=int, default=1024,
                           help="KV-cache positions of each decoder: prompt plus new tokens (default 1024)")
    on_device.add_argument("--quantize", choices=["paper"],
                           help="paper: int4 LLM and replicated blocks, int8 vision, projector and LoRA "
                                "(8-bit dynamic activations)")
    on_device.add_argument("--overwrite", action="store_true")
    on_device.set_defaults(func=_export_executorch)

    bench = commands.add_parser("bench", help="benchmarks")
    benches = bench.add_subparsers(dest="bench", required=True)
    paper = benches.add_parser(
        "paper", help="the paper's Tables 3-6 in miniature: synthetic data, tiny models, CPU, ~2 hours"
    )
    paper.add_argument("--out", default="docs/miniature", help="folder for results.json, tables.md, retention.png")
    paper.add_argument("--quick", action="store_true", help="seconds-long settings (one seed, three variants)")
    paper.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2)")
    paper.add_argument("--stage2-steps", type=int, help="image batches per variant in stage 2")
    paper.add_argument("--jobs", type=int, help="variant runs trained at once, each in its own process with its share "
                                                "of the CPU threads (default 2; 1 runs them in turn)")
    paper.add_argument("--save-demo-model", metavar="DIR", help="also save the GenieBlue-Skip model of the best seed")
    paper.add_argument("--cache-dir", help="reuse the pretrained base and vision tower between runs")
    paper.add_argument("--overwrite", action="store_true")
    paper.add_argument("--from-results", metavar="RESULTS_JSON",
                       help="only redraw tables.md and retention.png beside an existing results.json (no training)")
    paper.set_defaults(func=_bench_paper)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    hf_logging.set_verbosity_warning()
    log = logging.getLogger("genieblue")
    from .atomic import OutputExistsError
    from .publish import PublishError

    try:
        args.func(args)
    except KeyboardInterrupt:
        log.error("interrupted: nothing was written (unfinished output was removed)")
        return 130
    except OutputExistsError as error:
        log.error("%s already exists; pass --overwrite to replace it", error.path)
        return 1
    except (ValueError, OSError, PublishError, ImportError, NotImplementedError) as error:
        # ConversionError is a ValueError; a full disk, a read-only folder or a bad path is an OSError
        log.error("%s", error)
        return 1
    except Exception as error:
        if args.traceback:
            raise
        log.error("unexpected %s: %s (rerun with --traceback to see where)", type(error).__name__, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
