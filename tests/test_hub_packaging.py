"""Invariant 4: a saved folder is a self-contained Hub repo, loadable by every Auto class without genieblue_hf."""

import ast
import json
import sys
import textwrap
from pathlib import Path

from genieblue_hf.testing import HUB_PROMPTS, populate_hub_cache, run_isolated


REMOTE_CODE = sorted((Path(__file__).parents[1] / "modeling").glob("*genieblue*.py"))
ALLOWED_IMPORTS = {"torch", "transformers", "safetensors", "PIL"} | set(sys.stdlib_module_names)


def test_remote_code_imports_only_torch_transformers_safetensors_pil_and_stdlib():
    assert {p.name for p in REMOTE_CODE} >= {
        "configuration_genieblue.py", "modeling_genieblue.py", "processing_genieblue.py", "image_processing_genieblue.py"
    }
    for path in REMOTE_CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in ALLOWED_IMPORTS, f"{path.name} imports {name}"


# Runs in a fresh interpreter where `import genieblue_hf` fails: only the folder's own code can serve.
LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["genieblue_hf"] = None
    from PIL import Image
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor)

    source, image_path = sys.argv[1], sys.argv[2]
    prompts = json.loads(sys.argv[3])
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    result = {"config": type(config).__module__, "processor": type(processor).__module__,
              "image_processor": type(processor.image_processor).__name__}
    image = Image.open(image_path)
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        model = auto.from_pretrained(source, trust_remote_code=True).eval()
        text = processor(text=prompts[0])
        multimodal = processor(text=prompts[1], images=[image])
        result[auto.__name__] = {
            "class": type(model).__module__ + "." + type(model).__name__,
            "text": model.generate(**text, max_new_tokens=5, do_sample=False)[0].tolist(),
            "image": model.generate(**multimodal, max_new_tokens=5, do_sample=False)[0].tolist(),
        }
    print("RESULT" + json.dumps(result))
    """
)


def assert_loaded_like_saved(result, expected):
    assert result["config"].startswith("transformers_modules.") and "genieblue_hf" not in result["config"]
    assert result["processor"].startswith("transformers_modules.")
    assert result["image_processor"] == "GenieBlueImageProcessor"
    for auto in ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"):
        assert result[auto]["class"].startswith("transformers_modules."), result[auto]["class"]
        assert result[auto]["class"].endswith("GenieBlueForConditionalGeneration")
        assert result[auto]["text"] == expected["text"], auto
        assert result[auto]["image"] == expected["image"], auto


def test_folder_loads_with_every_auto_class_without_the_package(saved, tmp_path):
    folder, expected = saved
    result = run_isolated(
        LOADER, str(folder), str(folder.parent / "image.png"), json.dumps(HUB_PROMPTS),
        env_extra={"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}, cwd=tmp_path,
    )
    assert_loaded_like_saved(result, expected)


def test_offline_hub_cache_layout_loads_org_name(saved, tmp_path):
    folder, expected = saved
    populate_hub_cache(folder, "org/genieblue-tiny", tmp_path / "hf_home")
    result = run_isolated(
        LOADER, "org/genieblue-tiny", str(folder.parent / "image.png"), json.dumps(HUB_PROMPTS),
        env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
                   "HF_MODULES_CACHE": str(tmp_path / "fresh-modules")},
        cwd=tmp_path,
    )
    assert_loaded_like_saved(result, expected)


PIPELINE = textwrap.dedent(
    """
    import json, sys
    sys.modules["genieblue_hf"] = None
    from PIL import Image
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=sys.argv[1], trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(sys.argv[2])},
                                             {"type": "text", "text": "describe the picture"}]}]
    out = pipe(text=messages, max_new_tokens=5, do_sample=False)
    reply = out[0]["generated_text"][-1]
    print("RESULT" + json.dumps({"type": type(pipe.model).__name__, "role": reply["role"],
                                 "content": type(reply["content"]).__name__}))
    """
)


def test_image_text_to_text_pipeline(saved, tmp_path):
    folder, _ = saved
    result = run_isolated(
        PIPELINE, str(folder), str(folder.parent / "image.png"),
        env_extra={"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}, cwd=tmp_path,
    )
    assert result == {"type": "GenieBlueForConditionalGeneration", "role": "assistant", "content": "str"}
