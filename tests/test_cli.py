"""The command line: every mistake is one line naming the problem (exit code 1), never a traceback; nothing is lost."""

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genieblue_hf import GenieBlueForConditionalGeneration
from genieblue_hf.cli import main

from genieblue_hf.testing import tiny_genieblue


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_genieblue("qwen2")
    model.save_pretrained(root / "model")
    model.language_model.save_pretrained(root / "base")
    model.vision_tower.save_pretrained(root / "vision")
    return root


def _config_list(root, tmp):
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "config.json").write_text("[1, 2]")
    return tmp / "ckpt"


def _zero_layers(root, tmp):
    folder = tmp / "ckpt"
    folder.mkdir()
    config = json.loads((root / "model" / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 0
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _copy_model(root, tmp):
    import shutil

    return Path(shutil.copytree(root / "model", tmp / "ckpt"))


def _index(weight_map):
    def make(root, tmp):
        folder = _copy_model(root, tmp)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, **weight_map}))
        return folder
    return make


def _int_keys(root, tmp):
    torch.save({0: torch.zeros(2), 1: torch.ones(2)}, tmp / "weights.pt")
    return tmp / "weights.pt"


def _truncated(root, tmp):
    folder = _copy_model(root, tmp)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    return folder


def _out_file(root, tmp):
    (tmp / "taken").write_text("a file")
    return tmp / "taken"


def _nan_model(root, tmp):
    model = GenieBlueForConditionalGeneration.from_pretrained(root / "model")
    with torch.no_grad():
        model.lora["0"].self_attn.q_proj.lora_B.fill_(float("nan"))
    model.save_pretrained(tmp / "nan-model")
    return tmp / "nan-model"


def _dcp_payload(root, tmp):
    folder = _copy_model(root, tmp)
    marker = tmp / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    return folder


def _existing_out(root, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return tmp / "out"


LONG = "x" * 300
# (name, argv builder (root, tmp) -> list, message fragment). Paths in argv are built by the lambdas.
CASES = [
    ("convert: missing source", lambda r, t: ["convert", str(t / "nope"), str(t / "out")], "does not exist"),
    ("convert: config.json holds a list",
     lambda r, t: ["convert", str(_config_list(r, t)), str(t / "out")], "must hold a JSON object"),
    ("convert: zero layers", lambda r, t: ["convert", str(_zero_layers(r, t)), str(t / "out")],
     "not a valid GenieBlue config"),
    ("convert: index without weight_map",
     lambda r, t: ["convert", str(_index({})(r, t)), str(t / "out")], "no weight_map"),
    ("convert: weight_map is a list",
     lambda r, t: ["convert", str(_index({"weight_map": ["a"]})(r, t)), str(t / "out")], "no weight_map"),
    ("convert: int keys in a .pt",
     lambda r, t: ["convert", str(_int_keys(r, t)), str(t / "out"), "--config", str(r / "model")],
     "keys must be parameter names"),
    ("convert: --format peft on a plain folder",
     lambda r, t: ["convert", str(r / "model"), str(t / "out"), "--format", "peft"], "no adapter_config.json"),
    ("convert: bad --key-map regex",
     lambda r, t: ["convert", str(r / "model"), str(t / "out"), "--key-map", "(unclosed=x"],
     "not a valid regular expression"),
    ("convert: output is a file", lambda r, t: ["convert", str(r / "model"), str(_out_file(r, t))], "is not a folder"),
    ("convert: output name too long", lambda r, t: ["convert", str(r / "model"), str(t / LONG)], "too long"),
    ("convert: missing --processor",
     lambda r, t: ["convert", str(r / "model"), str(t / "out"), "--processor", str(t / "nope")],
     "--processor"),
    ("convert: missing --rest",
     lambda r, t: ["convert", str(r / "model"), str(t / "out"), "--rest", str(t / "nope")], "--rest"),
    ("convert: missing --base",
     lambda r, t: ["convert", str(r / "model"), str(t / "out"), "--base", str(t / "nope")], "--base"),
    ("convert: truncated safetensors", lambda r, t: ["convert", str(_truncated(r, t)), str(t / "out")], "truncated"),
    ("convert: existing output", lambda r, t: ["convert", str(r / "model"), str(_existing_out(r, t))],
     "already exists; pass --overwrite"),
    ("convert: pickled .metadata payload", lambda r, t: ["convert", str(_dcp_payload(r, t)), str(t / "out")],
     "refusing to load posix.system"),
    ("publish: missing folder", lambda r, t: ["publish", str(t / "nope"), str(t / "out")], "does not exist"),
    ("publish: a plain LLM folder", lambda r, t: ["publish", str(r / "base"), str(t / "out")],
     "'qwen2' config, not a GenieBlue config"),
    ("publish: config.json holds a list", lambda r, t: ["publish", str(_config_list(r, t)), str(t / "out")],
     "must hold a JSON object"),
    ("publish: output is a file", lambda r, t: ["publish", str(r / "model"), str(_out_file(r, t))],
     "is not a folder"),
    ("publish: NaN weights", lambda r, t: ["publish", str(_nan_model(r, t)), str(t / "out")], "holds NaN"),
    ("publish: --push without --repo-id", lambda r, t: ["publish", str(r / "model"), str(t / "out"), "--push"],
     "--push needs --repo-id"),
    ("publish: output name too long", lambda r, t: ["publish", str(r / "model"), str(t / LONG)], "too long"),
    ("export-dense: missing folder", lambda r, t: ["export-dense", str(t / "nope"), str(t / "out")],
     "does not exist"),
    ("export-dense: a plain LLM folder", lambda r, t: ["export-dense", str(r / "base"), str(t / "out")],
     "not a GenieBlue config"),
    ("export-dense: config.json holds a list",
     lambda r, t: ["export-dense", str(_config_list(r, t)), str(t / "out")], "must hold a JSON object"),
    ("export-dense: output is a file", lambda r, t: ["export-dense", str(r / "model"), str(_out_file(r, t))],
     "is not a folder"),
    ("compose: missing language model",
     lambda r, t: ["compose", "--language-model", str(t / "nope"), "--vision-model", str(r / "vision"),
                   str(t / "out")], "--language-model"),
    ("compose: a Hub id instead of a folder",
     lambda r, t: ["compose", "--language-model", "Qwen/Qwen2.5-3B", "--vision-model", str(r / "vision"),
                   str(t / "out")], "not a local model folder"),
    ("compose: missing vision model",
     lambda r, t: ["compose", "--language-model", str(r / "base"), "--vision-model", str(t / "nope"),
                   str(t / "out")], "--vision-model"),
    ("compose: output is a file",
     lambda r, t: ["compose", "--language-model", str(r / "base"), "--vision-model", str(r / "vision"),
                   str(_out_file(r, t))], "is not a folder"),
]


def run_cli(argv, caplog):
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="genieblue"):
        code = main(argv)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    return code, errors


@pytest.mark.parametrize("name, build, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(folders, tmp_path, caplog, name, build, fragment):
    code, errors = run_cli(build(folders, tmp_path), caplog)
    assert code == 1
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert fragment in message, message
    assert "Traceback" not in message and errors[0].exc_info is None
    assert not (tmp_path / "payload-ran").exists()  # the pickled payload never ran
    assert not [p for p in tmp_path.iterdir() if ".genieblue-staging-" in p.name]
    if (tmp_path / "out" / "keep.txt").exists():
        assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["convert", "publish", "export-dense", "compose"])
def test_full_disk_and_read_only_output_are_one_line(folders, tmp_path, caplog, monkeypatch, command):
    argv = {
        "convert": ["convert", str(folders / "model"), str(tmp_path / "out"), "--no-verify"],
        "publish": ["publish", str(folders / "model"), str(tmp_path / "out")],
        "export-dense": ["export-dense", str(folders / "model"), str(tmp_path / "out")],
        "compose": ["compose", "--language-model", str(folders / "base"), "--vision-model", str(folders / "vision"),
                    str(tmp_path / "out")],
    }[command]
    import genieblue_hf.atomic as atomic

    for error in (OSError(28, "No space left on device"), PermissionError(13, "Permission denied")):
        def failing_swap(staging, out_dir, error=error):
            raise error

        monkeypatch.setattr(atomic, "swap_in", failing_swap)
        code, errors = run_cli(argv, caplog)
        assert code == 1 and len(errors) == 1
        assert error.strerror in errors[0].getMessage()
        assert not (tmp_path / "out").exists()
        assert [p.name for p in tmp_path.iterdir()] == []  # the staging folder was removed


def test_animated_gif_warns_that_only_the_first_frame_is_used(caplog):
    from PIL import Image

    from genieblue_hf import GenieBlueImageProcessor
    import io

    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING):
        out = GenieBlueImageProcessor(image_size=16, image_tokens_per_tile=4)(buffer.getvalue())
    assert out["num_tiles"] == [1]
    assert any("animated image with 2 frames: only its first frame is used" in r.getMessage() for r in caplog.records)


def test_sixteen_bit_png_is_scaled_by_its_bit_depth():
    """A 50% grey 16-bit PNG stays a 50% grey, whatever the brightest pixel in it."""
    from PIL import Image

    from genieblue_hf.modeling.image_processing_genieblue import to_rgb

    grey = Image.new("I;16", (4, 4), 32768)
    assert to_rgb(grey).getpixel((0, 0)) == (128, 128, 128)
    dim = Image.new("I", (4, 4), 1000)  # 32-bit integer greys are scaled by 65535 too (PNG 16-bit loads as "I")
    assert to_rgb(dim).getpixel((0, 0)) == (4, 4, 4)


def test_interrupted_run_leaves_nothing_and_says_so(folders, tmp_path):
    """SIGTERM during a write: the staging folder is removed, no output appears, one line is printed."""
    script = (
        "import sys, time\n"
        "import genieblue_hf.conversion.writer as writer\n"
        "from genieblue_hf.cli import main\n"
        "real = writer.write_safetensors\n"
        "def slow(*a, **k):\n"
        "    print('WRITING', flush=True)\n"
        "    time.sleep(60)\n"
        "writer.write_safetensors = slow\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, "convert", str(folders / "model"), str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert process.stdout.readline().strip() == "WRITING"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted: nothing was written" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_folders_of_dead_processes_are_removed(folders, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.genieblue-staging-{dead}-abc123"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    mine = tmp_path / f".out.genieblue-staging-{os.getpid()}-live"  # a running process's: kept
    mine.mkdir()
    assert main(["convert", str(folders / "model"), str(tmp_path / "out"), "--no-verify"]) == 0
    assert not stale.exists() and mine.exists()
    assert (tmp_path / "out" / "config.json").is_file()


def test_an_output_set_aside_by_a_killed_run_is_put_back(folders, tmp_path):
    """kill -9 between 'rename the old output aside' and 'rename the new one in': the next run restores it."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    aside = tmp_path / f".out.genieblue-old-{dead}-abc123"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    assert main(["convert", str(folders / "model"), str(tmp_path / "out")]) == 1  # refused: the output exists again
    assert (tmp_path / "out" / "config.json").read_text() == "{}" and not aside.exists()
