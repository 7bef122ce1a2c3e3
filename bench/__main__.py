"""``python -m bench [--quick | --tiny] [--rows ingest,input,...] [--photos DIR] [--out FILE]``: run the suite,
print one table, write the same figures as JSON (``bench/results.json`` for every row at full sizes,
``bench/results-quick.json`` / ``bench/results-tiny.json`` at the others; ``--rows`` adds the rows'
names, ``bench/results-recipe.json``, so a run of some rows never replaces a fuller run's file)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench.common import RowResult, default_results_name, format_table, load_average, machine_info

ROWS = {
    "ingest": "bench.ingest",
    "input": "bench.training_input",
    "numerics": "bench.numerics",
    "orchestration": "bench.orchestration",
    "e2e": "bench.end_to_end",
    "photos": "bench.photos",
    "recipe": "bench.photo_recipe",
    "near_duplicates": "bench.near_duplicates",
    "serving": "bench.serving",
    "sweep": "bench.sweep",
    "utilisation": "bench.utilisation",
    "loop": "bench.training_loop",
    "batch_norm": "bench.batch_norm",
    "filters": "bench.filters",
}
BENCH_DIR = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="small sizes, for development (minutes)")
    sizes.add_argument("--tiny", action="store_true",
                       help="smallest sizes, for the smoke test (the e2e, photos, serving and sweep rows are skipped)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated rows to run, in any order (default: all): {', '.join(ROWS)}")
    parser.add_argument("--photos", type=Path, default=None,
                        help="a photo folder with one subfolder per class for the photo rows (default: "
                             "$BENCH_PHOTOS; the rows are skipped when neither names one)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results file (default: bench/results.json, or results-quick.json / "
                             "results-tiny.json for --quick / --tiny; with --rows, the rows' names added: "
                             "results-recipe.json)")
    args = parser.parse_args(argv)
    args.mode = "quick" if args.quick else "tiny" if args.tiny else "full"
    args.rows = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = [name for name in args.rows if name not in ROWS]
    if unknown:
        parser.error(f"unknown row {unknown[0]!r} (rows: {', '.join(ROWS)})")
    if args.out is None:
        args.out = BENCH_DIR / default_results_name(args.mode, args.rows)
    return args


def run_row(key: str, mode: str) -> RowResult:
    """One row, timed, with the load average around it; a failure becomes an error row."""
    load_before = load_average()
    started = time.perf_counter()
    try:
        row = importlib.import_module(ROWS[key]).run(mode)
    except Exception as error:  # noqa: BLE001 - one broken row must not cost the others
        row = RowResult(key, key, status="error")
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        row.notes.append(f"error: {type(error).__name__}: {message}")
        row.data["traceback"] = traceback.format_exc()
        print(row.data["traceback"], file=sys.stderr)
    row.seconds = round(time.perf_counter() - started, 1)
    row.load_before, row.load_after = load_before, load_average()
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.photos is not None:
        os.environ["BENCH_PHOTOS"] = str(args.photos.resolve())
    info = machine_info()
    started = datetime.now(UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    cores = info["cores"] or 1
    load = load_average()
    if load and load[0] > 0.5 * cores:
        print(f"warning: load average {load[0]} on {cores} cores: other work is running, figures will be noisy",
              file=sys.stderr)
    rows = []
    for key in args.rows:
        print(f"[bench] row {key} ({args.mode} sizes) ...", file=sys.stderr, flush=True)
        row = run_row(key, args.mode)
        print(f"[bench] row {key}: {row.status} in {row.seconds} s", file=sys.stderr, flush=True)
        rows.append(row)
    table = format_table(rows, info, args.mode, started)
    print(table)
    results = {
        "command": shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
        "mode": args.mode,
        "started": started,
        "machine": info,
        "load_average_start": load,
        "load_average_end": load_average(),
        "rows": {row.key: row.to_json() for row in rows},
        "table": table.splitlines(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten: {args.out}", file=sys.stderr)
    return 1 if any(row.status == "error" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
