"""``python -m bench.precision_seeds [--model custom] [--seeds 10] [--out FILE]``: the accuracy
question behind ``precision: auto``, with enough seeds to answer it.

The numerics row compares dtype policies by mean accuracy over a few training seeds; one seed's
accuracy moves by a point or two, so a few seeds cannot tell a real loss from chance. This runs the
numerics row's task (the same worker, XLA off) for float32 and ``mixed_bfloat16`` under many seeds,
interleaved, and prints each policy's mean accuracy with its standard error, the difference with
its standard error, and the speed ratio. A policy that is faster and whose mean accuracy is within
the row's tolerance of float32's is the better default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

from bench.common import machine_info, paired_ratios, run_worker, stats
from bench.numerics import ACCURACY_TOLERANCE, SIZES
from bench.training_input import model_spec

POLICIES = ("float32", "mixed_bfloat16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precision_seeds", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("custom", "resnet50"), default="custom")
    parser.add_argument("--seeds", type=int, default=10, help="training seeds per policy (default 10)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: print only)")
    args = parser.parse_args(argv)

    from bench.synth import digits_folder

    count, epochs, _ = SIZES["full"]
    spec = {**model_spec(args.model, {"image_size": 32, "channels": 1}), "folder": str(digits_folder()),
            "count": count, "epochs": epochs[args.model], "jit": False}
    runs: dict[str, list[dict]] = {policy: [] for policy in POLICIES}
    for seed in range(42, 42 + args.seeds):
        for policy in POLICIES:       # interleaved: drift in the machine's speed hits both alike
            result = run_worker("bench.numerics", {**spec, "seed": seed, "policy": policy,
                                                   "label": f"{args.model} {policy} seed {seed}"})
            runs[policy].append(result)
            print(f"{args.model} {policy:15s} seed {seed}: accuracy {result['test_accuracy']:.4f}, "
                  f"{stats(result['steady_images_per_s'])['median']:.0f} img/s", file=sys.stderr, flush=True)

    summary = summarise(runs)
    lines = [f"{args.model}, {args.seeds} seeds, {spec['epochs']} epochs, digits at 32x32 "
             f"({runs['float32'][0]['test_images']} test images)"]
    for policy in POLICIES:
        lines.append(f"  {policy:15s} accuracy {summary[policy]['mean']:.4f} +- {summary[policy]['sem']:.4f} "
                     f"(range {min(summary[policy]['values']):.3f}-{max(summary[policy]['values']):.3f})")
    difference = summary["difference"]
    lines.append(f"  mixed_bfloat16 - float32: {difference['mean'] * 100:+.2f} +- {difference['sem'] * 100:.2f} "
                 f"points (tolerance {ACCURACY_TOLERANCE * 100:.0f}); speed {summary['speed_ratio']['median']:.2f}x "
                 f"[{summary['speed_ratio']['min']:.2f}-{summary['speed_ratio']['max']:.2f}]")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"), "machine": machine_info(),
            "model": args.model, "spec": spec, "summary": summary, "table": lines,
            "runs": {policy: [{key: run[key] for key in ("test_accuracy", "steady_images_per_s", "epoch_seconds",
                                                         "policy_in_effect")} for run in results]
                     for policy, results in runs.items()}}, indent=2) + "\n")
    return 0


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Mean accuracy and its standard error per policy; the paired difference (seed by seed) and
    the speed ratio (epoch by epoch) of mixed_bfloat16 against float32."""
    summary: dict = {}
    for policy, results in runs.items():
        values = [run["test_accuracy"] for run in results]
        summary[policy] = {"values": values, "mean": statistics.fmean(values), "sem": _sem(values)}
    differences = [b["test_accuracy"] - f["test_accuracy"] for f, b in zip(runs["float32"], runs["mixed_bfloat16"])]
    summary["difference"] = {"values": differences, "mean": statistics.fmean(differences), "sem": _sem(differences)}
    summary["speed_ratio"] = paired_ratios(
        [speed for run in runs["mixed_bfloat16"] for speed in run["steady_images_per_s"]],
        [speed for run in runs["float32"] for speed in run["steady_images_per_s"]])
    return summary


def _sem(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")


if __name__ == "__main__":
    sys.exit(main())
