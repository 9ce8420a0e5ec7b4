"""The benchmark script runs end to end (timings are reported, never asserted)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import bench_paths  # noqa: E402


def test_benchmark_reports_every_ratio(tmp_path):
    report = bench_paths.main(["--repeats", "1", "--decode", "2", "--prefill", "8", "--shard-sizes", "1MB",
                               "--mixed-prompt", "48", "--json", str(tmp_path / "report.json")])
    saved = json.loads((tmp_path / "report.json").read_text())
    for key in ("text_prefill_ratio", "text_decode_ratio", "unmerged_decode_speed_vs_dense",
                "merged_decode_speed_vs_dense", "load_time_ratio_vs_base", "mixed_batch_time_vs_separate_batches"):
        assert report[key] > 0 and saved[key] == report[key]
    assert saved["param_mb"]["total"] > saved["param_mb"]["base LLM (frozen)"]
    assert saved["conversion"]["1MB"]["peak_growth_mb"] >= 0
