"""The paper in miniature: the pipeline end to end (short settings), its parts, and the packaged demo model."""

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import SiglipVisionModel

from genieblue_hf import GenieBlueForConditionalGeneration, GenieBlueProcessor
from genieblue_hf.cli import main as cli_main
from genieblue_hf.demo import DEMO_MODEL_DIR, load_demo_model
from genieblue_paper import Settings, experiment, pretrain, render, reproduce, tasks
from genieblue_paper import report as report_module
from genieblue_paper.loop import accuracy_by_kind, batches_of, exact_match
from genieblue_paper.variants import VARIANTS_BY_NAME, VisualExpertLinear, image_token_mask, make_visual_experts
from genieblue_hf.training import ConversationCollator

from genieblue_hf.testing import base_twin, tiny_base, tiny_vision_config


QUICK_RUNS = (("Full-Finetune", True), ("LoRA", True), ("CogVLM-Skip", True), ("GenieBlue-Skip", True),
              ("Full-Finetune", False))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("miniature")
    settings = Settings.quick()
    settings.runs = QUICK_RUNS
    report = reproduce(root / "out", settings, demo_model_dir=root / "demo")
    return root, report


def test_pipeline_writes_tables_plot_and_results(quick_run):
    root, report = quick_run
    out = root / "out"
    assert json.loads((out / "results.json").read_text()) == report
    assert (out / "retention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = (out / "tables.md").read_text()
    for heading in ("paper Tables 4 and 5", "paper Table 6", "paper Table 3"):
        assert heading in tables
    assert "Smoke test (`--quick`)" in tables and "not results" in tables  # never mistaken for the experiment
    assert "Smoke test" not in (Path(__file__).parents[1] / "docs" / "miniature" / "tables.md").read_text()
    runs = {(r["variant"], r["text_data"]) for r in report["results"]}
    assert runs == set(QUICK_RUNS)
    for variant in ("LoRA", "CogVLM-Skip", "GenieBlue-Skip"):
        assert f"| {variant} | ✗ |" in tables  # its non-shared (base) row in Table 6
    assert "| Full-Finetune | ✗ |" not in tables.split("paper Table 3")[0]  # no untouched base after full FT
    (root / "again").mkdir()
    render(out / "results.json", root / "again")  # `bench paper --from-results`: the same tables, no training
    assert (root / "again" / "tables.md").read_text() == tables
    counts = {r["variant"]: r["trainable_parameters"] for r in report["results"]}
    assert counts["Full-Finetune"] > counts["GenieBlue-Skip"] > counts["CogVLM-Skip"] > counts["LoRA"]


def test_non_shared_text_score_equals_the_base_exactly(quick_run):
    _, report = quick_run
    for result in report["results"]:
        if result["variant"] == "Full-Finetune":
            assert result["text_non_shared"] is None and result["non_shared_equals_base"] is None
            continue
        assert result["non_shared_equals_base"] is True, result["variant"]
        assert result["text_non_shared"] == report["base_text"]


def test_saved_demo_model_text_path_is_its_base_bit_for_bit(quick_run):
    root, _ = quick_run
    model = GenieBlueForConditionalGeneration.from_pretrained(root / "demo").eval()
    processor = GenieBlueProcessor.from_pretrained(root / "demo")
    assert not list((root / "demo").glob("*.py"))
    with safe_open(root / "demo" / "model.safetensors", "pt") as handle:  # the layout transformers 5.0 reads too
        vision_keys = [k for k in handle.keys() if k.startswith("vision_tower.")]
    assert vision_keys and all(k.startswith("vision_tower.vision_model.") for k in vision_keys)
    batch = ConversationCollator(processor)(tasks.text_eval_samples()["facts"][:8])
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base_twin(model)(**inputs).logits)


def test_reproduce_refuses_existing_output_before_training(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        reproduce(tmp_path / "out", Settings.quick())
    assert cli_main(["bench", "paper", "--quick", "--out", str(tmp_path / "out")]) == 1
    assert list((tmp_path / "out").iterdir()) == []


def test_settings_name_bad_values():
    with pytest.raises(ValueError, match="unknown variant 'BLIP'"):
        Settings(runs=(("BLIP", True),)).check()
    with pytest.raises(ValueError, match="stage2_steps"):
        Settings(stage2_steps=0).check()
    with pytest.raises(ValueError, match=r"settings.jobs must be between 1 and settings.threads \(2\), got 3"):
        Settings(jobs=3).check()
    with pytest.raises(ValueError, match="settings.stage2_reading_share must be between 0 and 1, got 1.5"):
        Settings(stage2_reading_share=1.5).check()


def test_stage2_text_data_is_reading_only_by_default():
    """The mixed-in text data rehearses reading, not the benchmark's facts and sums (``stage2_reading_share``), so a
    path that shares the base's weights can forget those, as the paper's shared variants lose text ability."""
    settings = replace(Settings.quick(), stage2_steps=8, text_mix=1.0)
    bench = experiment.prepare(settings, score_base=False)
    tokenizer = bench.processor.tokenizer

    def questions(setup):
        rows = [row for batch in setup.text_batches for row in batch["input_ids"]]
        return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]

    default = questions(experiment.seed_setup(bench, settings, 0))
    assert len(default) == 8 * settings.batch_size
    assert all("scene:" in text and "where does" not in text and "what is" not in text for text in default)
    rehearsed = questions(experiment.seed_setup(bench, replace(settings, stage2_reading_share=0.0), 0))
    assert all("scene:" not in text and ("where does" in text or "what is" in text) for text in rehearsed)


def test_the_kept_model_is_the_best_seeds():
    def run(seed, colour):
        return {"seed": seed, "multimodal": {"colour": colour, "count": 1.0}}, f"model of seed {seed}"

    assert experiment.best_kept([run(0, 0.8), run(1, 1.0), run(2, 0.9)])[1] == "model of seed 1"
    assert experiment.best_kept([run(0, 1.0), run(1, 1.0)])[1] == "model of seed 0"  # the first among equals
    assert experiment.best_kept([]) is None


def test_runs_in_worker_processes_equal_the_runs_in_turn():
    """``Settings.jobs``: a run depends only on its seed's setup, so two worker processes of one thread each give
    the same results and the same kept model, weight for weight, as one process running the runs in turn."""
    settings = replace(Settings.quick(), runs=(("LoRA", True), ("GenieBlue-Skip", True)), threads=1, jobs=1)
    keep = ("GenieBlue-Skip", True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench = experiment.prepare(settings)
        in_turn = experiment.run_seed(bench, settings, 0, keep=keep)
    finally:
        torch.set_num_threads(threads)
    in_workers = experiment.run_in_workers(bench, replace(settings, threads=2, jobs=2), keep)

    def untimed(outcomes):
        return [{k: v for k, v in result.items() if k != "train_seconds"} for result, _ in outcomes]

    kept, kept_in_worker = in_turn[1][1], in_workers[1][1]
    assert [model is None for _, model in in_turn] == [model is None for _, model in in_workers] == [True, False]
    assert untimed(in_workers) == untimed(in_turn)
    assert in_turn[1][0]["multimodal"] and in_turn[1][0]["non_shared_equals_base"] is True
    state, state_in_worker = kept.state_dict(), kept_in_worker.state_dict()
    assert state.keys() == state_in_worker.keys()
    assert all(torch.equal(state[key], state_in_worker[key]) for key in state)


# -- parts --------------------------------------------------------------------------------------------------------
def test_scenes_and_questions_agree():
    rng = random.Random(0)
    for _ in range(200):
        scene = tasks.random_scene(rng)
        assert 1 <= len(scene) <= 3 and len({q for _, _, q in scene}) == len(scene)
        for kind in tasks.QUESTION_KINDS:
            qa = tasks.scene_question(scene, kind, rng)
            if qa is None:
                assert kind == "colour"  # every shape in the scene appears twice or more
                continue
            question, answer = qa
            if kind == "colour":
                shape = question.split()[-1].rstrip("?")
                [colour] = [c for c, s, _ in scene if s == shape]
                assert answer == f"the {shape} is {colour}"
            if kind in ("shape", "position"):  # the object is named by its colour, unique in a scene
                colour = question.split()[-2]
                [(shape, quadrant)] = [(s, q) for c, s, q in scene if c == colour]
                assert answer == {"shape": f"the {colour} one is a {shape}",
                                  "position": f"the {colour} shape is {quadrant}"}[kind]
            if kind == "count_plus":
                assert int(answer) == len(scene) + int(question.split()[-1].rstrip("?"))
    scene = [("red", "square", "northwest")]
    image = tasks.render_scene(scene, seed=3)
    assert image.getpixel((2, 30)) == (255, 255, 255)  # the southwest (bottom-left) quadrant is empty
    assert tasks.COLOURS["red"] in {image.getpixel((x, y)) for x in range(16) for y in range(16)}
    assert image.tobytes() == tasks.render_scene(scene, seed=3).tobytes()


def test_the_base_learns_to_copy_before_the_text_task():
    """The copying stage leaves a base that repeats a string it has never seen, greedily, token for token."""
    tokenizer = pretrain.build_tokenizer()
    base = pretrain.new_base(tokenizer)
    separator = tokenizer.convert_tokens_to_ids(pretrain.COPYING_SEPARATOR)
    final_loss = pretrain.learn_copying(base, steps=250, batch_size=32, learning_rate=1e-3, separator_id=separator)
    assert final_loss < 0.3, final_loss
    [unseen] = pretrain.copying_batches(1, 20, separator, seed=99)  # another seed than the training strings
    prompts, strings = unseen["input_ids"][:, :9], unseen["input_ids"][:, 9:]
    with torch.no_grad():
        repeated = base.eval().generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8,
                                        min_new_tokens=8, do_sample=False)[:, 9:]
    assert (repeated == strings).all(-1).float().mean() >= 0.9


def _tiny_variant(name):
    base, vision = tiny_base(), SiglipVisionModel(tiny_vision_config())
    model = GenieBlueForConditionalGeneration.from_base(base, vision)
    return VARIANTS_BY_NAME[name].build(base, vision, model.multi_modal_projector.state_dict(), lora_rank=4)


def test_visual_expert_uses_the_expert_on_image_tokens_only():
    model = _tiny_variant("CogVLM-Skip")
    expert_linears = [m for m in model.replicated_layers.modules() if isinstance(m, VisualExpertLinear)]
    assert len(expert_linears) == 2 * 7  # blocks 3 and 7, seven projections each
    layer = expert_linears[0]
    with torch.no_grad():
        layer.expert.weight.add_(1.0)  # make the expert differ from the base linear
        x = torch.randn(2, 5, layer.expert.in_features)
        mask = torch.tensor([[True, False, False, True, False], [False] * 5])
        with image_token_mask(mask):
            out = layer(x)
    assert torch.equal(out[mask], layer.expert(x)[mask])
    assert torch.equal(out[~mask], layer.original(x)[~mask])
    with pytest.raises(RuntimeError, match="without the image-token mask"):
        layer(x)
    # norms are the base's, and nothing of the base trains
    assert not any("norm" in name for name, _ in model.replicated_layers.named_parameters())
    assert model.trainable_parameters()["language_model"] == 0


def test_variant_parameter_counts_follow_the_paper():
    """CogVLM-Skip = GenieBlue-Skip minus the replicated blocks' norms; LoRA-only has no replicated block."""
    skip, cogvlm, lora = (_tiny_variant(n).trainable_parameters() for n in ("GenieBlue-Skip", "CogVLM-Skip", "LoRA"))
    hidden = tiny_base().config.hidden_size
    assert skip["replicated_layers"] - cogvlm["replicated_layers"] == 2 * 2 * hidden
    assert lora["replicated_layers"] == 0 and lora["lora"] > skip["lora"]
    full = _tiny_variant("Full-Finetune").trainable_parameters()
    assert full["language_model"] == sum(p.numel() for p in tiny_base().parameters())


def test_make_visual_experts_with_an_all_text_mask_is_the_base_block():
    model = _tiny_variant("GenieBlue-Skip")
    make_visual_experts(model)
    ids = torch.randint(3, 90, (2, 9))
    with torch.no_grad(), image_token_mask(torch.zeros_like(ids, dtype=torch.bool)):
        with_experts = model(input_ids=ids, route="multimodal").logits
    # with LoRA B = 0 and every token a text token, the multimodal path is the base itself
    with torch.no_grad():
        assert torch.allclose(with_experts, base_twin(model)(input_ids=ids).logits, atol=1e-6)


# -- the packaged demo model ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    return load_demo_model()


def _scores_by_kind(model, processor, samples, kinds):
    collator = ConversationCollator(processor)
    stop = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return accuracy_by_kind(exact_match(model, batches_of(collator, samples, 100), stop), kinds)


def test_demo_model_is_small_and_answers_every_kind_of_image_question(demo):
    """On scenes it never saw (another seed than training and the experiment's test set), 100 questions per kind,
    every kind at >= 90% (measured: 100% on every kind)."""
    model, processor = demo
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir())
    assert size < 4_000_000
    samples = tasks.multimodal_samples(500, seed=4242)
    scores = _scores_by_kind(model, processor, samples, [sample["kind"] for sample in samples])
    assert set(scores) == set(tasks.QUESTION_KINDS)
    assert all(score >= 0.9 for score in scores.values()), scores


def test_demo_model_text_path_answers_the_text_task(demo):
    """The base it serves text with knows every fact and sum, and answers >= 90% of every kind of question about
    scenes described in words (measured: colour, count, position, count_plus 100%, shape 94%)."""
    model, processor = demo
    text = tasks.text_eval_samples(reading_count=250, seed=31_337)
    kinds = ["facts"] * len(text["facts"]) + ["sums"] * len(text["arithmetic"])
    scores = _scores_by_kind(model, processor, text["facts"] + text["arithmetic"], kinds)
    assert scores["facts"] == 1.0 and scores["sums"] >= 0.98, scores
    samples = tasks.reading_by_kind(50, seed=5)
    reading = _scores_by_kind(model, processor, samples, [sample["kind"] for sample in samples])
    assert all(score >= 0.9 for score in reading.values()), reading


def test_exact_match_is_greedy_generation(demo):
    """The benchmark's one-forward score equals comparing ``generate``'s greedy answer with the reference."""
    model, processor = demo
    samples = tasks.multimodal_samples(15, seed=77) + tasks.text_eval_samples()["reading"][:10]
    collator = ConversationCollator(processor)
    stop = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    scored = exact_match(model, [collator(samples)], stop).tolist()
    generated = []
    for sample in samples:
        prompt = processor.apply_chat_template(sample["messages"][:1], add_generation_prompt=True, tokenize=False)
        inputs = processor(text=prompt, images=sample["images"] or None)
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        generated.append(processor.decode(output, skip_special_tokens=False).split("<|im_end|>")[0] == sample["answer"]
                         and stop in output.tolist())
    assert scored == generated



def test_tables_and_plot_survive_a_reference_that_scored_zero(quick_run, tmp_path):
    """Retention against a Full-Finetune that answered nothing is undefined: shown as '-', not a crash."""
    _, report = quick_run
    broken = json.loads(json.dumps(report))
    for result in broken["results"]:
        if result["variant"] == "Full-Finetune":
            result["multimodal"] = dict.fromkeys(result["multimodal"], 0.0)
    tables = report_module.markdown(broken)
    lora_row = next(line for line in tables.splitlines() if line.startswith("| LoRA |"))
    assert lora_row.endswith("| - |")
    report_module.plot(broken, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_tables_of_a_results_json_without_the_base_reading_scores(quick_run):
    """A results.json written before the base was scored per kind renders, and says the scores are missing."""
    _, report = quick_run
    assert "The base LLM on the image questions' text form" in report_module.markdown(report)
    older = {key: value for key, value in report.items() if key != "base_reading_by_kind"}
    assert "is not in this results.json" in report_module.markdown(older)
