"""Folders written under one transformers release load bit for bit under the other (oldest and newest supported).

Runs when ``GENIEBLUE_OTHER_PYTHON`` names the interpreter of an environment with the other release
(``make test-cross-version``; CI runs it). Each writer's folder (``save_pretrained``, ``convert``, ``publish``,
``publish --non-shared``, ``export-dense``, ``export-dense --language-model-only``) is read by both releases and
every tensor compared by digest, in both directions.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

OTHER = os.environ.get("GENIEBLUE_OTHER_PYTHON")
TOOL = str(Path(__file__).parent / "cross_version.py")

pytestmark = pytest.mark.skipif(not OTHER, reason="set GENIEBLUE_OTHER_PYTHON (make test-cross-version) to run")


def run(python, *args):
    completed = subprocess.run([python, TOOL, *args], capture_output=True, text=True, timeout=600,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def read(python, folder):
    line = [l for l in run(python, "read", str(folder)).stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def versions(python):
    return subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("direction", ["this-writes", "other-writes"])
def test_folders_move_between_releases_bit_for_bit(tmp_path, direction):
    assert versions(sys.executable) != versions(OTHER), "GENIEBLUE_OTHER_PYTHON must run another transformers release"
    writer, reader = (sys.executable, OTHER) if direction == "this-writes" else (OTHER, sys.executable)
    run(writer, "write", str(tmp_path))
    own, other = read(writer, tmp_path), read(reader, tmp_path)
    assert own.keys() == other.keys()
    for folder in own:
        assert other[folder]["tensors"] == own[folder]["tensors"], folder
        assert other[folder].get("text_is_base", True) and other[folder].get("image_finite", True), folder
