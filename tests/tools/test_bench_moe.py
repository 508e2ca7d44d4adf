"""tools/bench_moe.py: its runs, medians and all-to-all timing."""

from __future__ import annotations

import pytest

from tools import bench_moe


@pytest.mark.slow
def test_bench_moe_ep1_reports_tokens_per_second_and_no_all_to_all(tmp_path):
    """Two gloo ranks at EP1 (every expert on both): the report has the timed steps' medians, and no
    time in all-to-all (megatron's dispatcher sends nothing over an expert group of one)."""
    args = bench_moe.parse_args(
        ["--layouts", "ep1", "--warmup", "1", "--steps", "3", "--repeats", "1", "--work-dir", str(tmp_path)]
    )
    report = bench_moe.run(args)
    ep1 = report["results"]["ep1"]
    (run,) = ep1["runs"]
    assert len(run["tokens_per_sec"]) == len(run["all_to_all_seconds"]) == 3
    assert ep1["median_tokens_per_sec"] > 0
    assert run["all_to_all_seconds"] == [0.0, 0.0, 0.0]
    assert "| ep1 |" in bench_moe.format_table(report)


def test_bench_moe_worker_flag_and_arguments():
    with pytest.raises(SystemExit):
        bench_moe.parse_args(["--steps", "0"])
    assert bench_moe.parse_args([]).layouts == ["ep1", "ep2"]
