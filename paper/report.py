"""Tables shaped like the paper's (Tables 3-6) and a retention plot, from the experiment's result records.

Every number is a mean over seeds with its spread (sample standard deviation; "±0.0" with one seed). Retentions
are computed per seed against that seed's reference (Full-Finetune for multimodal scores, the base LLM for text
scores) and then averaged, as the paper's "Retention (%)" columns.
"""

import statistics

from . import tasks


FULL = "Full-Finetune"


def _avg(scores):
    return sum(scores.values()) / len(scores)


def _stat(values, percent=True):
    """``(mean, spread)``; ``(nan, 0)`` when no seed has the number (e.g. a reference that scored 0: no retention)."""
    if not values:
        return float("nan"), 0.0
    scale = 100 if percent else 1
    values = [v * scale for v in values]
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, spread


def _fmt(values, percent=True):
    if not values:
        return "-"
    mean, spread = _stat(values, percent)
    return f"{mean:.1f} ± {spread:.1f}"


def _runs(report, text_data):
    """``{variant: [result per seed]}`` for the runs with (or without) text data, in the paper's row order."""
    grouped = {}
    for result in report["results"]:
        if result["text_data"] == text_data:
            grouped.setdefault(result["variant"], []).append(result)
    return grouped


def _reference(report, text_data):
    """``{seed: Full-Finetune multimodal average}`` (the retention reference), empty if that run is missing."""
    return {r["seed"]: _avg(r["multimodal"]) for r in _runs(report, text_data).get(FULL, [])}


def multimodal_retention(report, results, text_data=True):
    """Per-seed multimodal retention (fraction of Full-Finetune's average) of ``results``."""
    reference = _reference(report, text_data)
    return [_avg(r["multimodal"]) / reference[r["seed"]] for r in results if reference.get(r["seed"])]


def text_retention(report, results, key="text_shared"):
    """Per-seed text retention (fraction of the base LLM's average) of ``results``."""
    base = _avg(report["base_text"])
    return [_avg(r[key]) / base for r in results if r[key] is not None and base]


def table_text_data(report):
    """Paper Table 3: what mixing text data into multimodal training does to both scores."""
    lines = [
        "| Model | Text data | Multimodal AVG | Text AVG (shared base) | Text AVG (non-shared base) |",
        "|---|---|---|---|---|",
        f"| Base LLM | - | - | {100 * _avg(report['base_text']):.1f} | - |",
    ]
    for text_data in (False, True):
        for variant, results in _runs(report, text_data).items():
            if not any(other == variant for other in _runs(report, not text_data)):
                continue  # Table 3 compares runs trained both ways
            lines.append(
                f"| {variant} | {'✓' if text_data else '✗'} | {_fmt([_avg(r['multimodal']) for r in results])} | "
                f"{_fmt([_avg(r['text_shared']) for r in results])} | "
                f"{_fmt([_avg(r['text_non_shared']) for r in results if r['text_non_shared']])} |"
            )
    return "\n".join(lines)


def table_multimodal(report):
    """Paper Tables 4 and 5: multimodal accuracy per question kind, average and retention vs Full-Finetune."""
    kinds = tasks.QUESTION_KINDS
    lines = [
        "| Model | #Param (trainable) | " + " | ".join(kinds) + " | AVG | Retention (%) |",
        "|---|---|" + "---|" * len(kinds) + "---|---|",
    ]
    for variant, results in _runs(report, True).items():
        row = [variant, f"{results[0]['trainable_parameters'] / 1e3:.1f}K"]
        row += [_fmt([r["multimodal"][kind] for r in results]) for kind in kinds]
        row.append(_fmt([_avg(r["multimodal"]) for r in results]))
        row.append("-" if variant == FULL else _fmt(multimodal_retention(report, results)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def reading_line(report):
    """The base's score on each image question asked in words: what the multimodal path can build on."""
    scores = report.get("base_reading_by_kind")
    if not scores:  # a results.json written before the base was scored per kind
        return "The base LLM's score on the image questions' text form is not in this results.json."
    return ("The base LLM on the image questions' text form (the scene described in words, 100 new scenes per "
            "kind): " + ", ".join(f"{kind} {100 * value:.0f}%" for kind, value in scores.items()) + ".")


def table_text(report):
    """Paper Table 6: text scores when text requests share the multimodal weights vs run the untouched base."""
    text_tasks = list(report["base_text"])
    lines = [
        "| Model | Shared base | " + " | ".join(text_tasks) + " | AVG | Retention (%) | Equal to the base, sample by sample |",
        "|---|---|" + "---|" * len(text_tasks) + "---|---|---|",
        "| Base LLM | - | " + " | ".join(f"{100 * report['base_text'][t]:.1f}" for t in text_tasks)
        + f" | {100 * _avg(report['base_text']):.1f} | - | - |",
    ]
    for variant, results in _runs(report, True).items():
        for key, shared in (("text_shared", True), ("text_non_shared", False)):
            if not shared and variant == FULL:
                continue  # full fine-tuning leaves no untouched base to deploy
            row = [variant, "✓" if shared else "✗"]
            row += [_fmt([r[key][t] for r in results]) for t in text_tasks]
            row += [_fmt([_avg(r[key]) for r in results]), _fmt(text_retention(report, results, key))]
            row.append("-" if shared else ("yes" if all(r["non_shared_equals_base"] for r in results) else "**no**"))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _paired(runs, name, other):
    """Per-seed ``name`` minus ``other`` multimodal average, in points; ``runs`` as ``_runs`` returns them."""
    mine = {r["seed"]: _avg(r["multimodal"]) for r in runs.get(name, [])}
    theirs = {r["seed"]: _avg(r["multimodal"]) for r in runs.get(other, [])}
    return [100 * (mine[seed] - theirs[seed]) for seed in sorted(mine) if seed in theirs]


def _verdict(differences, at_least=0.0):
    """Whether per-seed differences exceed ``at_least`` by more than their spread (sd over seeds)."""
    if not differences:
        return "not run"
    mean, spread = _stat(differences, percent=False)
    if mean - at_least > spread:
        return "holds"
    if mean - at_least < -spread:
        return "does not hold"
    return "within the seed spread"


def claims(report):
    """The paper's claims, each with the miniature's numbers and a verdict; a list of ``(claim, numbers, verdict)``.

    A comparison "holds" when the mean per-seed difference is beyond the spread of those differences, "does not
    hold" when it is beyond it the other way, and is "within the seed spread" otherwise. Differences are paired by
    seed (every variant of a seed shares the stage-1 projector, data and batch order).
    """
    rows = []
    runs = _runs(report, True)

    def diff(name, other, claim, at_least=0.0):
        values = _paired(runs, name, other)
        rows.append((claim, f"{_fmt(values, percent=False)} points", _verdict(values, at_least)))

    diff(FULL, "LoRA", "LoRA-only clearly below Full-Finetune (paper: 90.6% retention)")
    if "GenieBlue-Skip" in runs:
        retention = [100 * r for r in multimodal_retention(report, runs["GenieBlue-Skip"])]
        rows.append(("GenieBlue-Skip keeps ≥ 97% of Full-Finetune's multimodal score",
                     f"{_fmt(retention, percent=False)}% retention", _verdict(retention, at_least=97.0)))
    diff("GenieBlue-Skip", "GenieBlue-Pre", "GenieBlue-Skip above GenieBlue-Pre")
    diff("GenieBlue-Skip", "GenieBlue-Post", "GenieBlue-Skip above GenieBlue-Post")
    diff("GenieBlue-Skip", "CogVLM-Skip", "GenieBlue-Skip ≥ CogVLM-Skip")
    non_shared = [r for results in runs.values() for r in results if r["non_shared_equals_base"] is not None]
    exact = non_shared and all(r["non_shared_equals_base"] for r in non_shared)
    rows.append(("Non-shared base: text exactly 100% (answer for answer)",
                 f"{sum(r['non_shared_equals_base'] for r in non_shared)} of {len(non_shared)} runs equal the base",
                 "holds" if exact else ("not run" if not non_shared else "does not hold")))
    shared = {name: _stat(text_retention(report, results, "text_shared"))[0] for name, results in runs.items()}
    if shared:
        below = all(value < 100 for value in shared.values())
        lowest = min(shared, key=shared.get)
        numbers = ", ".join(f"{name} {value:.1f}%" for name, value in shared.items())
        verdict = "holds" if below and lowest == FULL else "does not hold"
        rows.append(("Shared base: text below 100%, lowest for Full-Finetune", numbers, verdict))
    return rows


def table_claims(report):
    lines = ["| Claim (paper) | Miniature (mean ± sd over seeds) | Verdict |", "|---|---|---|"]
    lines += [f"| {claim} | {numbers} | {verdict} |" for claim, numbers, verdict in claims(report)]
    return "\n".join(lines)


SMOKE_TEST_BANNER = ("**Smoke test (`--quick`): seconds-long training to check that the pipeline runs. These numbers "
                     "are not results; run without `--quick` for the experiment.**")


def _text_data(settings):
    share = settings.get("stage2_reading_share")  # absent from results of before the setting: all three tasks
    if share is None:
        return ""
    if share == 1:
        return "; reading only, facts and sums not rehearsed"
    return f"; {100 * share:.0f}% reading, the rest facts and sums"


def markdown(report):
    """All tables, with the settings they came from."""
    settings = report["settings"]
    smoke = [SMOKE_TEST_BANNER] if settings.get("smoke_test") else []
    return "\n\n".join([
        "# GenieBlue in miniature: results", *smoke,
        f"Generated by `genieblue bench paper` in {report['seconds'] / 60:.1f} minutes; seeds {settings['seeds']}; "
        f"stage-2 budget {settings['stage2_steps']} image batches of {settings['batch_size']} (plus "
        f"{settings['text_mix']:.2f} text batches per image batch where text data is mixed in{_text_data(settings)}). "
        "Accuracies are exact-match percentages, mean ± standard deviation over seeds.",
        "## The paper's claims", table_claims(report),
        "## Multimodal accuracy (paper Tables 4 and 5)", table_multimodal(report),
        "## Text accuracy, shared vs non-shared base (paper Table 6)", table_text(report), reading_line(report),
        "## Mixing text data into multimodal training (paper Table 3)", table_text_data(report),
    ]) + "\n"


def plot(report, path):
    """Bar chart: multimodal retention vs Full-Finetune, and text retention shared vs non-shared, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _runs(report, True)
    names = list(runs)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    positions = range(len(names))
    mm = [_stat(multimodal_retention(report, runs[n])) if n != FULL else (100.0, 0.0) for n in names]
    left.bar(positions, [m for m, _ in mm], yerr=[s for _, s in mm], color="#4c72b0", capsize=3)
    left.axhline(97, color="grey", linestyle="--", linewidth=1, label="97% (paper's GenieBlue-Skip claim)")
    left.set_title("Multimodal accuracy, % of Full-Finetune")
    width = 0.4
    shared = [_stat(text_retention(report, runs[n], "text_shared")) for n in names]
    right.bar([p - width / 2 for p in positions], [m for m, _ in shared], width, yerr=[s for _, s in shared],
              capsize=3, label="shared base", color="#dd8452")
    with_base = [p for p, n in zip(positions, names) if n != FULL]
    non_shared = [_stat(text_retention(report, runs[names[p]], "text_non_shared")) for p in with_base]
    right.bar([p + width / 2 for p in with_base], [m for m, _ in non_shared], width,
              yerr=[s for _, s in non_shared], capsize=3, label="non-shared base", color="#55a868")
    if FULL in names:
        right.text(names.index(FULL) + width / 2, 45, "no\nuntouched\nbase", ha="center", fontsize=7)
    right.set_title("Text accuracy, % of the base LLM")
    for axis in (left, right):
        axis.set_xticks(list(positions), names, rotation=25, ha="right")
        axis.set_ylim(0, 110)
        axis.legend(loc="lower right", fontsize=8, framealpha=0.95)
    smoke = " - SMOKE TEST (--quick), not results" if report["settings"].get("smoke_test") else ""
    figure.suptitle(f"GenieBlue in miniature ({len(report['settings']['seeds'])} seeds, mean ± sd){smoke}")
    figure.savefig(path, dpi=110)
    plt.close(figure)
