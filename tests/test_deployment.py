"""The non-shared deployment layout: GenieBlue loads it whole; a text-only user loads only the base, bit for bit."""

import shutil

import torch
from safetensors import safe_open

from genieblue_hf import GenieBlueForConditionalGeneration
from genieblue_hf.deployment import load_text_only_base, save_non_shared
from genieblue_hf.synthetic import compose_tiny

from genieblue_hf.testing import base_twin, perturb_multimodal, state_hash


def saved_keys(folder):
    keys = []
    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            keys.extend(handle.keys())
    return keys


def test_non_shared_layout(tmp_path):
    model, processor = compose_tiny()
    perturb_multimodal(model)
    model.eval()
    out = save_non_shared(model, tmp_path / "hub", processor=processor, max_shard_size="100KB")
    # every tensor once: no key in two files, and nothing but the model's own tensors
    keys = saved_keys(out)
    assert len(keys) == len(set(keys)) == len(model.state_dict())
    assert all(k.startswith("language_model.") for k in saved_keys(out / "language_model"))
    assert not any(k.startswith("language_model.") for p in out.glob("*.safetensors") for k in saved_keys_of(p))

    reloaded = GenieBlueForConditionalGeneration.from_pretrained(out).eval()
    assert state_hash(reloaded) == state_hash(model)

    # a text-only user fetches language_model/ alone and needs no remote code
    text_only = tmp_path / "text-only"
    shutil.copytree(out / "language_model", text_only / "language_model")
    base = load_text_only_base(text_only).eval()
    assert type(base) is type(model.language_model)
    inputs = processor(text="the quick brown fox")
    with torch.no_grad():
        assert torch.equal(base(**inputs).logits, model(**inputs).logits)
        assert torch.equal(base(**inputs).logits, base_twin(model)(**inputs).logits)
    row = processor(text="<image> what colour?", images=[torch.rand(3, 32, 32)])
    with torch.no_grad():
        assert torch.equal(reloaded(**row).logits, model(**row).logits)


def saved_keys_of(path):
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def test_publish_non_shared_card_snippet_runs(tmp_path):
    import re
    from genieblue_hf.cli import main
    from test_hub_packaging import populate_hub_cache, run_isolated

    model, processor = compose_tiny()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "hub"
    assert main(["publish", str(tmp_path / "model"), str(out), "--repo-id", "org/genieblue-ns", "--non-shared"]) == 0
    assert (out / "language_model" / "config.json").is_file() and (out / "README.md").is_file()
    snippet = re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)[1]
    populate_hub_cache(out, "org/genieblue-ns", tmp_path / "hf_home")
    script = ('import sys\nsys.modules["genieblue_hf"] = None\n' + snippet +
              '\nprint("RESULT" + "{\\"class\\": \\"%s\\"}" % type(llm).__name__)\n')
    result = run_isolated(script, env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")},
                          cwd=tmp_path)
    assert result["class"] == type(model.language_model).__name__
    # and the whole folder still loads as GenieBlue, without the package
    code = re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)[0]
    run_isolated('import sys\nsys.modules["genieblue_hf"] = None\n' + code + '\nprint("RESULT{}")\n',
                 env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
                            "HF_MODULES_CACHE": str(tmp_path / "modules")}, cwd=tmp_path)
