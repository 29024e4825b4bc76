"""scripts/bench_latency.py: engine-only prefill / decode timing with the roofline figure, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gptoss.scripts import bench_latency


def test_bench_latency_on_tiny_checkpoint(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "latency.json"
    code = bench_latency.main(
        [
            "--model",
            str(tiny_checkpoint),
            "--batch-sizes",
            "1,3",
            "--input-lens",
            "8",
            "--output-lens",
            "3",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--profile",
            "--quiet",
            "--result-json",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["batch"], r["input"], r["output"]) for r in rows] == [(1, 8, 3), (3, 8, 3)]
    for row in rows:
        for key in bench_latency.COLUMNS[3:-2]:
            assert row[key] > 0, key
        # The step's wall time splits into kernel time and the host's share, neither negative (each is a
        # difference of two runs: on a loaded 2-core machine with 2 decode steps either can round to 0).
        assert row["device ms/step"] >= 0 and row["host ms/step"] >= 0
        assert row["device ms/step"] + row["host ms/step"] == pytest.approx(row["decode ms/step"], rel=1e-9)
        # The roofline floor is what the step's bytes take at the measured bandwidth.
        assert row["roofline ms/step"] == pytest.approx(
            row["step GB"] * 1e9 / report["copy_bandwidth_bytes_per_s"] * 1e3, rel=1e-6
        )
    assert report["bandwidth_measured"] and report["copy_bandwidth_bytes_per_s"] > 1e8
    assert report["roofline_first_row"]["total"] > 0
    tensor_parallel = report["tensor_parallel"]
    assert tensor_parallel["world_size"] == 1 and tensor_parallel["kv_tokens_per_rank"] > 0
    # The tiny preset's 6 heads and 6 experts split over 1 and 2 ranks only.
    assert [e["world_size"] for e in tensor_parallel["predicted_h100"]] == [1, 2]
    assert "aten::" in report["profile"]
    printed = capsys.readouterr().out
    assert "% roofline" in printed and "decode step, batch 1" in printed


def test_preset_with_random_weights(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    code = bench_latency.main(
        [
            "--random-weights",
            "--preset",
            "tiny",
            "--batch-sizes",
            "2",
            "--input-lens",
            "4",
            "--output-lens",
            "2",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--quiet",
            "--bandwidth-gbs",
            "10",
            "--result-json",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["copy_bandwidth_bytes_per_s"] == 10e9 and not report["bandwidth_measured"]
    assert report["model"].startswith("preset:tiny")
