"""The files a GenieBlue folder carries beside its weights: config, generation config, the Hub remote code and the
tokenizer/processor files. Used by ``convert``, ``compose``, ``export-dense``, ``publish``, the non-shared layout
and the ExecuTorch export."""

import shutil
from pathlib import Path

from transformers import GenerationConfig


# The Hub remote-code files: every ``*genieblue*.py`` of the modeling package (they import each other relatively).
REMOTE_CODE_DIR = Path(__file__).resolve().parents[1] / "modeling"
REMOTE_CODE_FILES = tuple(sorted(path.name for path in REMOTE_CODE_DIR.glob("*genieblue*.py")))
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "processor_config.json", "preprocessor_config.json", "chat_template.jinja",
    "chat_template.json",
)


def write_side_files(staging, config, processor_sources=()):
    """Config, generation config and remote code; tokenizer/processor files from the first source that has them."""
    config.save_pretrained(staging)
    GenerationConfig.from_model_config(config).save_pretrained(staging)
    copy_remote_code(staging)
    return any(copy_processor_files(folder, staging) for folder in processor_sources)


def copy_remote_code(destination):
    """Every remote-code file ``config.auto_map`` may name (model, config, processor, image processor)."""
    for name in REMOTE_CODE_FILES:
        shutil.copy(REMOTE_CODE_DIR / name, Path(destination) / name)


def copy_processor_files(folder, destination):
    """Copy the tokenizer/processor files of ``folder`` (if it has any) into ``destination``; True if it had some."""
    if folder is None or not Path(folder).is_dir():
        return False
    present = [name for name in PROCESSOR_FILES if (Path(folder) / name).is_file()]
    for name in present:
        shutil.copy(Path(folder) / name, Path(destination) / name)
    return bool(present)
