"""genieblue publish: a complete Hub folder with a model card whose quick start runs, written atomically."""

import re

import pytest
from huggingface_hub import ModelCard

from genieblue_hf import publish as publish_module
from genieblue_hf.cli import main
from genieblue_hf.publish import parameter_counts

from genieblue_hf.testing import populate_hub_cache, run_isolated


@pytest.fixture(scope="module")
def published(saved, tmp_path_factory):
    folder, _ = saved
    out = tmp_path_factory.mktemp("published") / "genieblue-tiny"
    assert main(["publish", str(folder), str(out), "--repo-id", "org/genieblue-tiny", "--base-model", "org/base"]) == 0
    return folder, out


def test_hub_folder_is_complete(published):
    _, out = published
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "config.json", "generation_config.json", "chat_template.jinja", "processor_config.json",
            "tokenizer.json", "modeling_genieblue.py", "configuration_genieblue.py", "processing_genieblue.py",
            "image_processing_genieblue.py", "genieblue_dispatch.py", "genieblue_lora.py", "genieblue_routing.py"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    assert not any(n == "adapter_config.json" for n in names)  # would make transformers treat the repo as PEFT
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_model_card_metadata_and_computed_numbers(published):
    from genieblue_hf import GenieBlueForConditionalGeneration

    folder, out = published
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0"
    assert card.data.base_model == "org/base"
    assert "genieblue" in card.data.tags
    model = GenieBlueForConditionalGeneration.from_pretrained(folder)
    for part, count in parameter_counts(model).items():
        assert f"| {part} |" in card.text and f"({count:,})" in card.text, part
    assert str(model.config.replicated_layers) in card.text


def test_model_card_quick_start_runs(published, tmp_path):
    _, out = published
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    populate_hub_cache(out, "org/genieblue-tiny", tmp_path / "hf_home")
    script = 'import sys\nsys.modules["genieblue_hf"] = None\n' + code + '\nprint("RESULT{}")\n'
    run_isolated(script, env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
                                    "HF_MODULES_CACHE": str(tmp_path / "modules")}, cwd=tmp_path)


def test_publish_refuses_existing_output_and_keeps_it(published, caplog):
    folder, out = published
    before = sorted(p.name for p in out.iterdir())
    assert main(["publish", str(folder), str(out)]) == 1
    assert "already exists" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == before


def test_push_without_network_fails_clearly_and_leaves_the_folder(saved, tmp_path, monkeypatch, caplog):
    folder, _ = saved
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "push"
    assert main(["publish", str(folder), str(out), "--repo-id", "org/genieblue-tiny", "--push"]) == 1
    assert "could not push to the Hub repo org/genieblue-tiny" in caplog.text
    assert (out / "README.md").is_file() and (out / "config.json").is_file()


def test_failure_while_writing_leaves_nothing(saved, tmp_path, monkeypatch):
    folder, _ = saved

    def broken_save(self, path):
        raise OSError("No space left on device")

    monkeypatch.setattr(ModelCard, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        publish_module.publish(folder, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
