"""Write GenieBlue folders with every writer, or read them back; run by ``test_cross_version.py`` under two
transformers releases (the oldest and the newest supported), so each reads what the other wrote.

    python tests/cross_version.py write OUT     # save_pretrained, convert, publish (plain and non-shared), export-dense
    python tests/cross_version.py read OUT      # prints RESULT{folder: {key: sha256}} plus path checks, as JSON

Digests are keyed by the portable checkpoint key, so the two releases' module layouts compare directly.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WRITERS = ("save_pretrained", "convert", "publish", "publish_non_shared", "export_dense", "export_dense_lm")


def write(out):
    from genieblue_hf import GenieBlueProcessor
    from genieblue_hf.cli import main
    from genieblue_hf.testing import bpe_tokenizer, tiny_genieblue

    out = Path(out)
    model = tiny_genieblue("qwen2")
    tokenizer = bpe_tokenizer()
    processor = GenieBlueProcessor.for_model(model.config, tokenizer)
    model.save_pretrained(out / "save_pretrained")
    processor.save_pretrained(out / "save_pretrained")
    model.language_model.save_pretrained(out / "base")
    commands = [
        ["convert", str(out / "save_pretrained"), str(out / "convert"), "--base", str(out / "base")],
        ["publish", str(out / "save_pretrained"), str(out / "publish"), "--repo-id", "org/tiny"],
        ["publish", str(out / "save_pretrained"), str(out / "publish_non_shared"), "--repo-id", "org/tiny",
         "--non-shared"],
        ["export-dense", str(out / "save_pretrained"), str(out / "export_dense")],
        ["export-dense", str(out / "save_pretrained"), str(out / "export_dense_lm"), "--language-model-only"],
    ]
    for command in commands:
        if main(command) != 0:
            raise SystemExit(f"genieblue {' '.join(command)} failed")


def digests(model, portable):
    return {portable(key): hashlib.sha256(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for key, tensor in model.state_dict().items()}


def read(out):
    from transformers import AutoModelForCausalLM

    from genieblue_hf import GenieBlueForConditionalGeneration

    from genieblue_hf.testing import base_twin, image_row, text_batch

    out = Path(out)
    result = {}
    for name in WRITERS:
        folder = out / name
        if name == "export_dense_lm":
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            result[name] = {"tensors": digests(model, lambda key: key)}
            continue
        model = GenieBlueForConditionalGeneration.from_pretrained(folder).eval()
        text = text_batch()
        row, pixels = image_row(model)
        with torch.no_grad():
            text_is_base = torch.equal(model(input_ids=text).logits, base_twin(model)(input_ids=text).logits)
            finite = bool(torch.isfinite(model(input_ids=row[None], pixel_values=pixels).logits).all())
        result[name] = {"tensors": digests(model, model.portable_key), "text_is_base": text_is_base,
                        "image_finite": finite}
    print("RESULT" + json.dumps(result))


if __name__ == "__main__":
    {"write": write, "read": read}[sys.argv[1]](sys.argv[2])
