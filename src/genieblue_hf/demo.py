"""The demo model: a tiny GenieBlue-Skip trained by ``genieblue bench paper`` (shipped inside the package, 2.4 MB).

Its base LLM learnt the miniature's text task (made-up facts, sums, questions about scenes described in words); its
multimodal path learnt to answer the same questions about 32x32 images of coloured shapes
(``genieblue_paper.tasks.render_scene``). Regenerate it with
``genieblue bench paper --save-demo-model src/genieblue_hf/demo_model --overwrite``.
"""

from pathlib import Path


DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"


def load_demo_model():
    """``(model, processor)`` of the packaged demo model, in eval mode."""
    from .modeling.modeling_genieblue import GenieBlueForConditionalGeneration
    from .modeling.processing_genieblue import GenieBlueProcessor

    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo model is missing from {DEMO_MODEL_DIR}; regenerate it with "
            f"`genieblue bench paper --save-demo-model {DEMO_MODEL_DIR} --overwrite`"
        )
    model = GenieBlueForConditionalGeneration.from_pretrained(DEMO_MODEL_DIR)
    return model.eval(), GenieBlueProcessor.from_pretrained(DEMO_MODEL_DIR)
