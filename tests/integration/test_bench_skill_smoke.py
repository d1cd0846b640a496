"""``goclaw bench skill``, small: every variant answers what Python answers, and is timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from goclaw.bench_skill import TEXT, python_text_stats, run_skill_bench


def test_skill_bench_times_all_variants_against_the_python_answer(tmp_path: Path) -> None:
    result = run_skill_bench(calls=30, warmup=3, workdir=str(tmp_path))
    for name in ("python", "sandbox", "tool"):
        assert 0 < result[f"{name}_p50_us"] <= result[f"{name}_p99_us"], name
    for name in ("sandbox", "tool"):
        assert result[f"{name}_added_p50_us"] == pytest.approx(
            result[f"{name}_p50_us"] - result["python_p50_us"], abs=0.02
        )
    assert result["compile_ms"] > 0 and result["cache_load_ms"] > 0
    assert result["calls"] == 30 and result["skill"] == "text_stats"


def test_the_python_baseline_counts_like_the_skill() -> None:
    # The bench checks every sandboxed answer against this, so it must be right itself.
    assert python_text_stats("") == {"bytes": 0, "chars": 0, "lines": 0, "words": 0}
    assert python_text_stats("é a\n") == {"bytes": 5, "chars": 4, "lines": 1, "words": 2}
    assert python_text_stats(TEXT)["lines"] == 2


def test_goclaw_bench_skill_json(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "goclaw.cli",
            "bench",
            "skill",
            "--calls",
            "5",
            "--warmup",
            "0",
            "--workdir",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(out.stdout)["sandbox_p50_us"] > 0
