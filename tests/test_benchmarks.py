"""The benchmark script runs end to end (timings are reported, never asserted)."""


def test_benchmark_reports_every_ratio(run_benchmark):
    saved = run_benchmark("bench_paths.py", "--repeats", "1", "--decode", "2", "--prefill", "8", "--shard-sizes",
                          "1MB", "--mixed-prompt", "48")
    for key in ("text_prefill_ratio", "text_decode_ratio", "unmerged_decode_speed_vs_dense",
                "merged_decode_speed_vs_dense", "load_time_ratio_vs_base", "mixed_batch_time_vs_separate_batches"):
        assert saved[key] > 0
    assert saved["param_mb"]["total"] > saved["param_mb"]["base LLM (frozen)"]
    assert saved["conversion"]["1MB"]["peak_growth_mb"] >= 0
