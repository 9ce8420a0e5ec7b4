"""The miniature's experiment: pretrain once, then per seed run stage 1 and every variant's stage 2, and score them.

Per seed: the same stage-1 projector, the same data and the same batch order for every variant, so the variants
differ only in how the LLM side is adapted. Scores are exact-match accuracies (greedy decoding).
"""

import copy
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from huggingface_hub.utils import tqdm

from genieblue_hf.modeling.modeling_genieblue import GenieBlueForConditionalGeneration
from genieblue_hf.modeling.processing_genieblue import GenieBlueProcessor
from genieblue_hf.training import ConversationCollator
from . import pretrain, tasks
from .loop import accuracy_by_kind, batches_of, exact_match, train
from .variants import VARIANTS, VARIANTS_BY_NAME


logger = logging.getLogger(__name__)

# The runs of the paper's tables: every variant trained on image data mixed with text data (the paper's 9M set),
# plus Table 3's Full-Finetune without text data.
DEFAULT_RUNS = tuple((variant.name, True) for variant in VARIANTS) + (("Full-Finetune", False),)


@dataclass
class Settings:
    """Sizes and budgets; the defaults take about 2 hours on a 2-core CPU: pretraining the base (``cache_dir``
    keeps it for later runs), then 21 variant runs of 2000 image batches, two at a time (``jobs``)."""

    seeds: tuple = (0, 1, 2)
    runs: tuple = DEFAULT_RUNS
    hidden_size: int = 64
    lora_rank: int = 8
    downsample_ratio: int = 4  # 4x4 patches per image token: one token per quadrant, i.e. per object
    batch_size: int = 32
    copying_steps: int = 300  # the base's generic pretraining (copying strings) before the text task
    base_steps: int = 8000
    base_learning_rate: float = 1e-3
    reading_share: float = 0.9  # of the base's text-task samples; facts and sums are few and learnt by heart
    vision_steps: int = 200
    stage1_steps: int = 100
    stage2_steps: int = 2000
    text_mix: float = 2 / 7  # text batches per image batch, the paper's 2M text samples on top of 7M
    # of the stage-2 text samples: reading only by default. The paper mixes in general text data, not its text
    # benchmarks' own training sets; facts and sums stand for knowledge and skills that are tested but not
    # rehearsed, so a path that shares the base's weights can forget them (and the non-shared one cannot)
    stage2_reading_share: float = 1.0
    learning_rate: float = 1e-3
    multimodal_test_size: int = 500
    threads: int = 2  # CPU threads in all: pretraining uses them all, each of the `jobs` workers its share
    jobs: int = 2  # variant runs trained at once, each in its own process (1: all in this process, in turn)
    cache_dir: str = None  # keep the pretrained base and vision tower here, keyed by the settings that shape them
    smoke_test: bool = False  # seconds-long settings: the pipeline runs, the numbers mean nothing (labelled so)

    @classmethod
    def quick(cls):
        """Short settings for tests: the whole pipeline, seconds per stage, one seed and three variants."""
        return cls(
            seeds=(0,), runs=(("Full-Finetune", True), ("LoRA", True), ("GenieBlue-Skip", True)),
            copying_steps=10, base_steps=60, vision_steps=20, stage1_steps=10, stage2_steps=20,
            multimodal_test_size=50, jobs=1, smoke_test=True,
        )

    def check(self):
        for name, _ in self.runs:
            if name not in VARIANTS_BY_NAME:
                raise ValueError(f"unknown variant {name!r}; choose from {sorted(VARIANTS_BY_NAME)}")
        if not self.seeds:
            raise ValueError("settings.seeds is empty")
        if self.copying_steps < 0:
            raise ValueError(f"settings.copying_steps must be >= 0, got {self.copying_steps}")
        for name in ("base_steps", "vision_steps", "stage1_steps", "stage2_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"settings.{name} must be at least 1, got {getattr(self, name)}")
        if self.jobs < 1 or self.threads < self.jobs:
            raise ValueError(f"settings.jobs must be between 1 and settings.threads ({self.threads}), got {self.jobs}")
        if self.text_mix < 0:
            raise ValueError(f"settings.text_mix must be >= 0, got {self.text_mix}")
        for name in ("reading_share", "stage2_reading_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"settings.{name} must be between 0 and 1, got {getattr(self, name)}")


@dataclass
class Bench:
    """What every seed shares: tokenizer, processor, the pretrained base and vision tower, the test sets."""

    processor: GenieBlueProcessor
    collator: ConversationCollator
    base: torch.nn.Module
    vision_tower: torch.nn.Module
    text_test: dict
    multimodal_test: list
    stop_token_id: int
    base_text_scores: dict = field(default_factory=dict)
    base_reading_by_kind: dict = field(default_factory=dict)  # the base on each question kind, scene in words


def prepare(settings, pretrained=None, score_base=True):
    """Tokenizer, processor, base LLM (pretrained on the text task) and vision tower (pretrained on the scenes).

    ``pretrained`` (``{"base": state, "vision": state}``) skips the pretraining (a worker process gets the parent's);
    ``score_base=False`` skips reporting the base's scores (only the parent reports them; a worker still scores the
    base on the text benchmark, with its own thread count, to compare the non-shared path with)."""
    tokenizer = pretrain.build_tokenizer()
    base = pretrain.new_base(tokenizer, hidden_size=settings.hidden_size)
    vision = pretrain.new_vision_tower()
    config = GenieBlueForConditionalGeneration.from_base(base, vision, downsample_ratio=settings.downsample_ratio).config
    processor = GenieBlueProcessor.for_model(config, tokenizer, max_tiles=1)
    collator = ConversationCollator(processor)
    cached = _pretrained_cache(settings)
    if pretrained is not None or (cached is not None and cached.exists()):
        state = pretrained if pretrained is not None else torch.load(cached, weights_only=True)
        base.load_state_dict(state["base"])
        vision.load_state_dict(state["vision"])
        base.requires_grad_(False).eval(), vision.eval()
        if pretrained is None:
            logger.info("pretrained base and vision tower read from %s", cached)
    else:
        pretrain.pretrain_base(base, collator, settings.base_steps, settings.batch_size, settings.base_learning_rate,
                               reading_share=settings.reading_share, copying_steps=settings.copying_steps)
        pretrain.pretrain_vision(vision, processor.image_processor, settings.vision_steps, 64, 2e-3)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(".partial")
            torch.save({"base": base.state_dict(), "vision": vision.state_dict()}, partial)
            os.replace(partial, cached)
    multimodal_test = tasks.multimodal_samples(settings.multimodal_test_size, seed=10_000)
    bench = Bench(
        processor=processor, collator=collator, base=base, vision_tower=vision,
        text_test={task: batches_of(collator, samples, 128) for task, samples in tasks.text_eval_samples().items()},
        multimodal_test=multimodal_test, stop_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )

    def base_forward(model, inputs, _kwargs):
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])

    bench.base_text_scores = {
        task: exact_match(base, batches, bench.stop_token_id, forward=base_forward)
        for task, batches in bench.text_test.items()
    }
    if not score_base:
        return bench
    logger.info("base LLM text scores: %s", {t: round(s.float().mean().item(), 3) for t, s in bench.base_text_scores.items()})
    reading = tasks.reading_by_kind(100, seed=30_000)
    correct = exact_match(base, batches_of(collator, reading, 128), bench.stop_token_id, forward=base_forward)
    bench.base_reading_by_kind = accuracy_by_kind(correct, [sample["kind"] for sample in reading])
    logger.info("base LLM on the image questions' text form: %s", bench.base_reading_by_kind)
    return bench


PRETRAINING_SETTINGS = (  # threads too: the pretrained weights' last bits depend on the thread count
    "hidden_size", "batch_size", "copying_steps", "base_steps", "base_learning_rate", "reading_share", "vision_steps",
    "threads",
)


def _pretrained_cache(settings):
    if settings.cache_dir is None:
        return None
    key = {k: getattr(settings, k) for k in PRETRAINING_SETTINGS}
    # the task's wording shapes the base too: a changed format must not reuse a base pretrained on the old one
    key["text_task"] = [sample["messages"] for sample in tasks.text_train_samples(8, seed=0, reading_share=0.5)]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(settings.cache_dir) / f"pretrained-{digest}.pt"


def _multimodal_scores(model, bench, forward):
    batches = batches_of(bench.collator, bench.multimodal_test, 128)
    correct = exact_match(model, batches, bench.stop_token_id, forward=forward)
    return accuracy_by_kind(correct, [sample["kind"] for sample in bench.multimodal_test])


def _text_scores(model, bench, forward, route):
    return {
        task: exact_match(model, batches, bench.stop_token_id, forward=forward, route=route)
        for task, batches in bench.text_test.items()
    }


def seed_setup(bench, settings, seed):
    """One seed's data (image and text batches) and its stage-1 projector, shared by every run of that seed."""
    torch.manual_seed(seed)
    train_samples = tasks.multimodal_samples(settings.stage2_steps * settings.batch_size, seed=seed)
    image_batches = batches_of(bench.collator, train_samples, settings.batch_size)
    text_count = round(len(image_batches) * settings.text_mix)
    text_batches = batches_of(
        bench.collator, tasks.text_train_samples(text_count * settings.batch_size, seed=seed + 1,
                                            reading_share=settings.stage2_reading_share), settings.batch_size
    )

    stage1 = GenieBlueForConditionalGeneration.from_base(
        copy.deepcopy(bench.base), copy.deepcopy(bench.vision_tower), downsample_ratio=settings.downsample_ratio
    )
    stage1.configure_training(stage=1)
    stage1_schedule = [(image_batches[i % len(image_batches)], {}) for i in range(settings.stage1_steps)]
    train(stage1, stage1_schedule, settings.learning_rate, desc=f"seed {seed} stage 1 (projector)")
    return SeedSetup(seed, image_batches, text_batches, stage1.multi_modal_projector.state_dict())


@dataclass
class SeedSetup:
    seed: int
    image_batches: list
    text_batches: list
    projector_state: dict


def build_run(bench, settings, setup, name):
    """The untrained model of variant ``name`` on ``setup``'s stage-1 projector (the same for every run order)."""
    torch.manual_seed(setup.seed)
    return VARIANTS_BY_NAME[name].build(bench.base, bench.vision_tower, setup.projector_state, settings.lora_rank,
                                        downsample_ratio=settings.downsample_ratio)


def train_run(bench, settings, setup, name, text_data):
    """Train and score one run ``(name, text_data)`` of ``setup``'s seed; returns its result dict and the model.

    A run depends only on its seed's setup, not on which runs came before it, so runs can train in any order or
    in parallel processes (``Settings.jobs``) and give the same numbers."""
    variant, seed = VARIANTS_BY_NAME[name], setup.seed
    model = build_run(bench, settings, setup, name)
    trainable = sum(model.trainable_parameters().values())
    schedule = [(batch, {}) for batch in setup.image_batches]
    if text_data:  # text rows train the multimodal path (for Full-Finetune that is the LLM itself)
        schedule += [(batch, {"route": "multimodal"}) for batch in setup.text_batches]
        random.Random(seed).shuffle(schedule)
    started = time.perf_counter()
    label = f"{name}{' +text' if text_data else ''}"
    final_loss = train(model, schedule, settings.learning_rate, desc=f"seed {seed} {label}", forward=variant.forward)
    seconds = time.perf_counter() - started
    shared = _text_scores(model, bench, variant.forward, route="multimodal")
    non_shared = _text_scores(model, bench, variant.forward, route="text") if variant.has_base else None
    result = {
        "seed": seed, "variant": name, "text_data": text_data, "trainable_parameters": trainable,
        "train_seconds": round(seconds, 1), "final_loss": final_loss,
        "multimodal": _multimodal_scores(model, bench, variant.forward),
        "text_shared": {task: s.float().mean().item() for task, s in shared.items()},
        "text_non_shared": None if non_shared is None else {t: s.float().mean().item() for t, s in non_shared.items()},
        # the design's promise, checked sample by sample: the non-shared text path answers exactly as the base
        "non_shared_equals_base": None if non_shared is None else all(
            torch.equal(non_shared[task], bench.base_text_scores[task]) for task in non_shared
        ),
    }
    logger.info("seed %d %s: multimodal %s, text shared %s", seed, label,
                _mean(result["multimodal"]), _mean(result["text_shared"]))
    return result, model


def run_seed(bench, settings, seed, keep=None):
    """Stage 1 once, then every run of ``settings.runs`` from it, one after another; returns ``(result, model)``
    per run, the model only for the run ``keep`` names (``(variant, text_data)``, the demo model), else ``None``."""
    setup = seed_setup(bench, settings, seed)
    outcomes = []
    for name, text_data in settings.runs:
        result, model = train_run(bench, settings, setup, name, text_data)
        outcomes.append((result, model if keep == (name, text_data) else None))
    return outcomes


# -- parallel runs: each worker process trains whole runs with settings.threads // settings.jobs threads ------------
_WORKER = {}


def _worker_start(settings, pretrained, log_level):
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # the parent shows one bar over all runs; a worker logs each run's scores
    logging.basicConfig(level=log_level, format="%(message)s")
    torch.set_num_threads(max(1, settings.threads // settings.jobs))
    _WORKER["settings"] = settings
    _WORKER["bench"] = prepare(settings, pretrained=pretrained, score_base=False)
    _WORKER["setup"] = None


def _worker_run(seed, name, text_data, keep):
    settings, bench = _WORKER["settings"], _WORKER["bench"]
    if _WORKER["setup"] is None or _WORKER["setup"].seed != seed:  # runs arrive grouped by seed
        _WORKER["setup"] = None  # free the previous seed's batches first
        _WORKER["setup"] = seed_setup(bench, settings, seed)
    result, model = train_run(bench, settings, _WORKER["setup"], name, text_data)
    return result, (model.state_dict() if keep else None)


def run_in_workers(bench, settings, keep):
    """Every ``(seed, run)`` in ``settings.jobs`` processes; returns ``(result, model)`` per run as ``run_seed``
    does, seed after seed, the kept runs rebuilt here from their workers' trained weights."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    pretrained = {"base": bench.base.state_dict(), "vision": bench.vision_tower.state_dict()}
    tasks_ = [(seed, name, text_data) for seed in settings.seeds for name, text_data in settings.runs]
    with ProcessPoolExecutor(settings.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
                             initargs=(settings, pretrained, logging.getLogger().level)) as pool:
        futures = [pool.submit(_worker_run, *task, keep is not None and task[1:] == keep) for task in tasks_]
        try:
            for _ in tqdm(as_completed(futures), total=len(futures), desc=f"variant runs, {settings.jobs} at a time"):
                pass
            outcomes = [future.result() for future in futures]
        except BrokenProcessPool:
            raise RuntimeError("a worker process of the miniature died (out of memory?); "
                               "run the variants in turn with settings.jobs = 1 (--jobs 1)") from None
    return [(result, None if state is None else _rebuild(bench, settings, result, state)) for result, state in outcomes]


def _rebuild(bench, settings, result, state):
    """The trained model of ``result``'s run from its ``state_dict`` (the projector state is in it too)."""
    prefix = "multi_modal_projector."
    projector = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    model = build_run(bench, settings, SeedSetup(result["seed"], [], [], projector), result["variant"])
    model.load_state_dict(state)
    return model.eval()


def best_kept(candidates):
    """Of ``(result, model)`` pairs of one run over seeds, the one with the best multimodal average on the
    experiment's test set (the first seed among equals), or ``None``.

    The demo model is chosen this way, as one picks a checkpoint on validation data: its own test
    (``tests/test_miniature.py``) scores it on other scenes."""
    def average(candidate):
        scores = candidate[0]["multimodal"]
        return sum(scores.values()) / len(scores)

    return max(candidates, key=average, default=None)  # max keeps the first of equal maxima


def _mean(scores):
    return round(sum(scores.values()) / len(scores), 3)


def run(settings, keep=None):
    """The whole experiment; returns ``{"settings", "base_text", "results"}`` and the kept model (or ``None``)."""
    settings.check()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)  # timings and float results depend on it; restored afterwards
    started = time.perf_counter()
    try:
        bench = prepare(settings)
        if settings.jobs > 1:
            outcomes = run_in_workers(bench, settings, keep)
        else:
            outcomes = [outcome for seed in settings.seeds for outcome in run_seed(bench, settings, seed, keep=keep)]
        best = best_kept([(result, model) for result, model in outcomes if model is not None])
        results, kept = [result for result, _ in outcomes], (None if best is None else best[1])
    finally:
        torch.set_num_threads(threads)
    report = {
        "settings": {**asdict(settings), "seeds": list(settings.seeds), "runs": [list(run) for run in settings.runs]},
        "base_text": {task: s.float().mean().item() for task, s in bench.base_text_scores.items()},
        "base_reading_by_kind": bench.base_reading_by_kind,
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return report, kept, bench
