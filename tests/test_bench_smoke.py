"""The benchmark suite (``python -m bench``) runs end to end at its smallest sizes and writes its
table and JSON. No timing is asserted: these tests only check that every row runs and reports.

Each row that runs for real at --tiny sizes (ingest, input, numerics, utilisation, near duplicates)
is a test of its own, so the two workers of ``make test`` can take them side by side; e2e, photos,
recipe and sweep report themselves skipped at --tiny sizes; batch_norm (two ResNet50s traced, 25 s) is
left out: its comparison is tests/test_fused_batch_norm.py's; so is filters (six networks traced, 20 s),
whose rule is tests/test_devices.py's. The orchestration row needs a full
``dvc repro`` of a project copy (minutes), so its smoke test runs only with ``BENCH_SMOKE_ALL=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import ROW_NUMBERS, child_env
from tests.conftest import REPO_ROOT


def _bench(tmp_path: Path, *arguments: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = child_env(BENCH_CACHE_DIR=str(tmp_path / "cache"))     # generated data stays out of the user's cache
    return subprocess.run([sys.executable, "-m", "bench", *arguments], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _check_report(result: subprocess.CompletedProcess, out: Path, rows: list[str]) -> dict:
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    table = result.stdout
    assert "Benchmark (tiny sizes)" in table
    assert "Machine:" in table and "AVX-512 BF16" in table and "cores" in table
    for key in rows:
        assert f"{ROW_NUMBERS[key]} {key}" in table, f"row {key} missing from the table:\n{table}"

    data = json.loads(out.read_text())
    assert data["mode"] == "tiny"
    assert data["command"].startswith("python -m bench --tiny --rows "), data["command"]  # docs/performance.md shows it
    assert list(data["rows"]) == rows
    machine = data["machine"]
    assert {"cpu_model", "cores", "avx512_bf16", "amx_bf16", "amx_tile", "gpu", "versions"} <= set(machine)
    assert data["table"] == table.rstrip("\n").splitlines()
    return data


def _tiny_row(tmp_path: Path, key: str, timeout: float) -> dict:
    """Run one row at --tiny sizes, check the report, and return the row, which must be ok."""
    out = tmp_path / "results.json"
    data = _check_report(_bench(tmp_path, "--tiny", "--rows", key, "--out", str(out), timeout=timeout), out, [key])
    row = data["rows"][key]
    assert row["status"] == "ok", row["notes"]
    return row


@pytest.mark.slow
def test_bench_tiny_ingest(tmp_path: Path) -> None:
    ingest = _tiny_row(tmp_path, "ingest", timeout=600)
    cases = [line["case"] for line in ingest["lines"]]
    assert any("images/s" in case for case in cases) and any("peak RSS" in case for case in cases)
    per_size = [line for line in ingest["lines"] if line["case"].endswith("images/s")]
    assert len(per_size) == 2
    assert all(line["ratio"]["median"] > 0 for line in per_size)
    # The speed target is judged on the larger folder only; the smaller one shows start-up's share.
    assert [line["target"] for line in per_size] == ["-", ">= 0.9"]


@pytest.mark.slow
@pytest.mark.parametrize("key", ["input", "numerics"])
def test_bench_tiny_training_rows(tmp_path: Path, key: str) -> None:
    row = _tiny_row(tmp_path, key, timeout=600)
    assert any(line["ratio"] for line in row["lines"]), row["lines"]
    if key == "numerics":
        numerics = [line["case"] for line in row["lines"]]
        assert any("float32 jit=off (reference)" in case for case in numerics)
        assert any("jit=on" in case for case in numerics)
        assert any("mixed_float16" in case for case in numerics)


@pytest.mark.slow
def test_bench_tiny_utilisation(tmp_path: Path) -> None:
    (line,) = _tiny_row(tmp_path, "utilisation", timeout=600)["lines"]
    assert 0 < line["ratio"]["median"] < 1, line      # something, and below the CPU's peak
    # The tiny CNN (32x32x1, two 3x3 convolutions of 8 filters, dense 16, 10 classes) is 696,480
    # multiply-adds per image: about 1.39 MFLOP, plus the adds of its biases.
    assert 1.39e6 <= line["data"]["forward_flops"] <= 1.5e6, line["data"]["forward_flops"]


def test_bench_rows_too_big_for_tiny_sizes_report_themselves_skipped(tmp_path: Path) -> None:
    """Several rows in one run: one table and one JSON, each row in order, each skipped with a note."""
    rows = ["e2e", "photos", "recipe", "sweep"]
    out = tmp_path / "results.json"
    data = _check_report(_bench(tmp_path, "--tiny", "--rows", ",".join(rows), "--out", str(out), timeout=120),
                         out, rows)
    for key in rows:
        assert data["rows"][key]["status"] == "skipped"
        assert data["rows"][key]["notes"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BENCH_SMOKE_ALL") != "1",
                    reason="needs a full dvc repro of a project copy (minutes); set BENCH_SMOKE_ALL=1")
def test_bench_tiny_orchestration(tmp_path: Path) -> None:
    row = _tiny_row(tmp_path, "orchestration", timeout=1800)
    verdicts = {line["case"].strip(): line["verdict"] for line in row["lines"]}
    assert "no-op dvc repro (the gate only)" in verdicts and "gate threshold changed: dvc repro" in verdicts
    assert "stages it ran" in verdicts and "gate process imported TensorFlow" in verdicts


def test_bench_rejects_an_unknown_row(tmp_path: Path) -> None:
    result = _bench(tmp_path, "--tiny", "--rows", "ingest,nonsense", "--out", str(tmp_path / "r.json"), timeout=60)
    assert result.returncode == 2
    assert "unknown row 'nonsense'" in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_a_run_of_some_rows_never_replaces_the_file_of_a_fuller_run() -> None:
    """``make bench BENCH_ARGS="--rows recipe"`` once wrote bench/results.json with that row alone,
    and the performance page lost every other table on its next regeneration."""
    from bench.__main__ import BENCH_DIR, parse_args
    from bench.common import is_development_results

    assert parse_args([]).out == BENCH_DIR / "results.json"
    assert parse_args(["--rows", ",".join(reversed(ROW_NUMBERS))]).out.name == "results.json"
    assert parse_args(["--rows", "recipe"]).out.name == "results-recipe.json"
    assert parse_args(["--rows", "photos,near_duplicates"]).out.name == "results-photos-near-duplicates.json"
    assert parse_args(["--quick"]).out.name == "results-quick.json"
    assert parse_args(["--tiny", "--rows", "ingest"]).out.name == "results-tiny-ingest.json"
    assert parse_args(["--rows", "recipe", "--out", "x.json"]).out == Path("x.json")
    # A development run's file stays off the page (git ignores it); a full-size run's does not.
    assert [name for name in ("results-tiny-ingest.json", "results-quick.json", "results-recipe.json",
                              "results-quickstart.json") if is_development_results(name)] == [
        "results-tiny-ingest.json", "results-quick.json"]
    ignored = subprocess.run(["git", "check-ignore", "bench/results-tiny-ingest.json", "bench/results-quick-x.json",
                              "bench/results-recipe.json"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == ["bench/results-tiny-ingest.json", "bench/results-quick-x.json"]


def test_bench_table_format() -> None:
    from bench.common import Line, RowResult, format_table, machine_info

    row = RowResult("ingest", "title")
    row.lines.append(Line("5,000 JPEGs: images/s", "1,000 img/s", "1,100 img/s floor",
                          {"median": 0.91, "min": 0.9, "max": 0.92, "n": 3, "values": [0.9, 0.91, 0.92]},
                          ">= 0.9", True))
    skipped = RowResult("photos", "title", status="skipped", notes=["skipped: folder absent"])
    table = format_table([row, skipped], machine_info(), "tiny", "now")
    assert "1 ingest" in table and "0.91 [0.90-0.92]" in table and " ok" in table
    assert "6 photos" in table and "skipped" in table
    assert json.loads(json.dumps(row.to_json()))["lines"][0]["ratio"]["median"] == 0.91


def test_bench_tiny_near_duplicates(tmp_path: Path) -> None:
    row = _tiny_row(tmp_path, "near_duplicates", timeout=300)
    scaling = [line for line in row["lines"] if "hashes, within" in line["case"]]
    assert [line["data"]["hashes"] for line in scaling] == [2_000, 10_000]
    assert all(line["verdict"] == "ok" for line in scaling)    # every planted near copy found
    study = [line for line in row["lines"] if line["case"].startswith("sklearn crops: within")]
    assert [line["data"]["bits"] for line in study] == list(range(0, 21, 2))
