"""Test settings and fixtures; the tiny models and helpers are ``genieblue_hf.testing`` (no Hub access needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genieblue_hf import GenieBlueProcessor
from genieblue_hf.testing import bpe_tokenizer, colour_image, model_for, reference_generations


os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def run_benchmark(tmp_path):
    """Run ``benchmarks/NAME *args --json FILE`` as a script, the way users run it; returns the JSON report."""

    def run(name, *args):
        report = tmp_path / f"{name}.json"
        script = Path(__file__).parents[1] / "benchmarks" / name
        completed = subprocess.run([sys.executable, str(script), *args, "--json", str(report)], capture_output=True,
                                   text=True, timeout=900)
        assert completed.returncode == 0, completed.stderr[-4000:]
        return json.loads(report.read_text())

    return run


@pytest.fixture(params=["qwen2", "llama"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny GenieBlue folder with its processor and an image beside it, and its reference generations."""
    folder = tmp_path_factory.mktemp("genieblue-tiny")
    tokenizer = bpe_tokenizer()
    model = model_for(tokenizer)
    processor = GenieBlueProcessor.for_model(model.config, tokenizer, max_tiles=2)
    model.save_pretrained(folder, max_shard_size="200KB")
    processor.save_pretrained(folder)
    image = colour_image(32, 16, seed=7)
    image.save(folder.parent / "image.png")
    return folder, reference_generations(model, processor, image)
