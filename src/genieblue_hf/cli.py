"""``genieblue`` command line: ``publish`` (and ``compose``) GenieBlue Hub folders."""

import argparse
import logging
import sys

from transformers.utils import logging as hf_logging


def _publish(args):
    from .publish import publish

    publish(
        args.model_dir, args.out_dir, repo_id=args.repo_id, push=args.push, overwrite=args.overwrite,
        license=args.license, base_model=args.base_model, max_shard_size=args.max_shard_size,
    )


def _compose(args):
    from .conversion import compose

    compose(args.language_model, args.vision_model, args.out_dir, overwrite=args.overwrite,
            max_shard_size=args.max_shard_size)


def build_parser():
    parser = argparse.ArgumentParser(prog="genieblue", description=__doc__)
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
    publish.set_defaults(func=_publish)

    compose = commands.add_parser("compose", help="a fresh GenieBlue folder from a base LLM and a SigLIP tower")
    compose.add_argument("--language-model", required=True, help="folder of a Hugging Face causal LM")
    compose.add_argument("--vision-model", required=True, help="folder of a SigLIP vision model")
    compose.add_argument("out_dir")
    compose.add_argument("--overwrite", action="store_true")
    compose.add_argument("--max-shard-size", default="2GB")
    compose.set_defaults(func=_compose)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hf_logging.set_verbosity_warning()
    from .publish import PublishError

    try:
        args.func(args)
    except (PublishError, FileExistsError, ValueError) as error:
        logging.getLogger("genieblue").error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
