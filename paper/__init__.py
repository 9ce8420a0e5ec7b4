"""GenieBlue's central claims, reproduced in miniature on a CPU with synthetic data (``genieblue bench paper``).

Research code, kept apart from the runtime package ``genieblue_hf``, which it uses like any user would.

A tiny base LLM learns a text task, a tiny vision tower learns to see generated scenes, and then each of the
paper's variants (Full-Finetune, LoRA, CogVLM-Skip, GenieBlue-Post/Pre/Skip) is trained on the same image-question
data with the same budget. The tables it prints are shaped like the paper's Tables 3-6. ``tasks`` makes the data,
``pretrain`` the starting point, ``variants`` the models, ``loop`` trains and scores, ``experiment`` runs it all,
``report`` writes the tables and the plot.
"""

import json
import logging
import shutil

from genieblue_hf.atomic import atomic_output_dir, refuse_existing
from .experiment import DEFAULT_RUNS, Settings, run


logger = logging.getLogger(__name__)

DEMO_RUN = ("GenieBlue-Skip", True)


def reproduce(out_dir, settings=None, demo_model_dir=None, overwrite=False):
    """Run the experiment and write ``results.json``, ``tables.md`` and ``retention.png`` into ``out_dir``.

    With ``demo_model_dir``, a GenieBlue-Skip model (trained with text data, as the tables' main rows) is saved
    there with its processor: the seed's whose multimodal average is best (``experiment.best_kept``). Both folders
    are written atomically; existing ones are refused before any training unless ``overwrite``. Returns the report.
    """
    from . import report as tables

    settings = settings or Settings()
    settings.check()
    try:
        import matplotlib  # noqa: F401  (checked before training, not after it)
    except ImportError:
        raise ImportError("the miniature's plot needs matplotlib: pip install 'genieblue-hf[paper]'") from None
    refuse_existing(out_dir, overwrite)
    if demo_model_dir is not None:
        refuse_existing(demo_model_dir, overwrite)
        if DEMO_RUN not in settings.runs:
            raise ValueError(f"saving the demo model needs the run {DEMO_RUN} in settings.runs")
    results, demo_model, bench = run(settings, keep=DEMO_RUN if demo_model_dir is not None else None)
    with atomic_output_dir(out_dir, overwrite=overwrite) as staging:
        (staging / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (staging / "tables.md").write_text(tables.markdown(results))
        tables.plot(results, staging / "retention.png")
    logger.info("tables, results and plot written to %s", out_dir)
    if demo_model_dir is not None:
        save_demo_model(demo_model, bench.processor, demo_model_dir, overwrite=overwrite)
    return results


def render(results_path, out_dir=None):
    """Write ``tables.md`` and ``retention.png`` again from a ``results.json`` (beside it by default)."""
    from pathlib import Path

    from . import report as tables

    results_path = Path(results_path)
    try:
        results = json.loads(results_path.read_text())
        markdown = tables.markdown(results)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{results_path} is not a results.json of `genieblue bench paper` ({error!r})") from None
    out_dir = Path(out_dir) if out_dir else results_path.parent
    (out_dir / "tables.md").write_text(markdown)
    tables.plot(results, out_dir / "retention.png")
    return results


def save_demo_model(model, processor, out_dir, overwrite=False):
    """Save a trained miniature model with its processor, without the remote-code files.

    The folder is loaded through the installed package (``genieblue_hf.demo``); ``genieblue publish`` adds the
    remote code when it becomes a Hub folder, so no stale copy of the modeling files is kept beside the weights.
    """
    with atomic_output_dir(out_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging, max_shard_size="50MB")
        processor.save_pretrained(staging)
        for code in staging.glob("*.py"):
            code.unlink()
        shutil.rmtree(staging / "__pycache__", ignore_errors=True)
    logger.info("demo model saved to %s", out_dir)


__all__ = ["DEFAULT_RUNS", "Settings", "render", "reproduce", "run", "save_demo_model"]
