"""The CI report: a short markdown page from the files the pipeline wrote.

The gate's decision on one screen, ``dvc metrics diff`` against a base revision, the test-set
confusion matrices as tables, and the pictures (training curves, confusion matrices, misclassified
images, Grad-CAM of the surest mistakes, reliability diagrams) inline. The GitHub workflow appends
it to ``$GITHUB_STEP_SUMMARY``; locally::

    python -m pipeline.report --base main > report.md
"""

from __future__ import annotations

import argparse
import base64
import html
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.files import read_json

# What the report shows, in this order: the pictures the stages write (see dvc.yaml).
PICTURES = ("train_custom_curves", "train_resnet50_curves", "confusion_custom", "confusion_resnet50",
            "misclassified_custom", "misclassified_resnet50", "gradcam_custom", "gradcam_resnet50",
            "reliability_custom", "reliability_resnet50")
IMAGE_WIDTH = 420   # pixels in the page; the files themselves are small (figures.PNG_DPI)


def decision_section(gate: Mapping, scores: Mapping) -> list[str]:
    """The gate's decision: what was deployed and why, each model's scores (in the gated metric) and
    verdict, and what became of the registered champion."""
    metric, champion = gate["metric"], gate["champion"]
    if gate.get("deploy") and not gate.get("promoted", True):
        deployed = (f"**Nothing deployed, compare only** (`gate.promote: false`): `{gate['model']}` would be "
                    "promoted")
    elif gate.get("deploy"):
        deployed = f"**Deployed: `{gate['model']}`**"
    elif champion["outcome"] == "stays":
        deployed = f"**Nothing deployed**: champion v{champion['version']} stays"
    elif champion["outcome"] == "same model":
        deployed = f"**Nothing new deployed**: champion v{champion['version']} is this same model"
    elif champion["outcome"] in ("unknown", "not comparable") and champion.get("reasons"):
        deployed = (f"**Nothing deployed**: the champion check said {champion['outcome']} "
                    f"({cell(champion['reasons'][0])})")
    else:
        deployed = "**Nothing deployed**: no model passed both thresholds"
    thresholds = ", ".join(f"{key} {value}" for key, value in gate.get("thresholds", {}).items())
    lines = ["## Gate", "", f"{deployed} ({metric}; {thresholds}).", "",
             "| model | train | validation | test [95% interval] | verdict |", "| --- | ---: | ---: | ---: | --- |"]
    for name, candidate in gate["candidates"].items():
        validation = scores.get(name, {}).get("validation", {}).get(metric)
        shown = f"{validation:.4f}" if validation is not None else "-"
        interval = candidate.get("test_interval")
        test = f"{candidate['test_score']:.4f}" + (f" [{interval['low']:.3f}, {interval['high']:.3f}]" if interval else "")
        lines.append(f"| {name} | {candidate['train_score']:.4f} | {shown} | {test} | {candidate['verdict']} |")
    lines += ["", *(f"Champion: {cell(reason)}" for reason in champion.get("reasons", [])), "",
              "<details><summary>Why</summary>", ""]
    for name, candidate in gate["candidates"].items():
        lines += [f"- **{name}**: " + "; ".join(cell(reason) for reason in candidate.get("reasons", []))]
    lines += ["", "</details>", ""]
    return lines


def metrics_diff_section(base: str, diff: str | None, problem: str | None = None) -> list[str]:
    """``dvc metrics diff --md`` against ``base`` as it printed it, or why there is none."""
    lines = [f"## Metrics against `{base}`", ""]
    if problem:
        lines.append(f"Not compared: {problem}")
    elif diff and len([line for line in diff.splitlines() if line.startswith("|")]) > 2:  # rows past the header
        lines.append(diff.strip())
    else:
        lines.append(f"No metric differs from `{base}`.")
    return [*lines, ""]


def cell(text: object) -> str:
    """Text from the user's folders (class names) or the gate's reasons, safe in a Markdown table cell
    or list item: a pipe, a line break or HTML would break the table or the page."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def confusion_section(report: Mapping) -> list[str]:
    """Each model's test-set confusion matrix as a table (rows: actual class, columns: predicted)."""
    names = [cell(name) for name in report["class_names"]]
    lines = ["## Confusion matrices (test set)", ""]
    for model, splits in report.items():
        if model == "class_names":
            continue
        matrix = splits["test"]["confusion_matrix"]
        lines += [f"**{model}** (rows: actual, columns: predicted)", "",
                  "| | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
        lines += [f"| **{actual}** | " + " | ".join(str(count) for count in row) + " |"
                  for actual, row in zip(names, matrix)]
        lines.append("")
    return lines


def pictures_section(images: Mapping[str, bytes]) -> list[str]:
    """The PNGs inline as data URIs: the page stands alone, with no upload and no token."""
    if not images:
        return []
    lines = ["## Pictures", ""]
    for name, data in images.items():
        encoded = base64.b64encode(data).decode("ascii")
        lines.append(f'<img alt="{name}" title="{name}" width="{IMAGE_WIDTH}" src="data:image/png;base64,{encoded}">')
    return [*lines, ""]


def build_report(gate: Mapping, scores: Mapping, report: Mapping | None, base: str, diff: str | None,
                 diff_problem: str | None, images: Mapping[str, bytes]) -> str:
    """The whole page, section by section."""
    lines = ["# Pipeline report", "", *decision_section(gate, scores), *metrics_diff_section(base, diff, diff_problem)]
    if report:
        lines += confusion_section(report)
    lines += pictures_section(images)
    return "\n".join(lines).rstrip() + "\n"


def dvc_metrics_diff(base: str) -> tuple[str | None, str | None]:
    """``dvc metrics diff --md <base>``: its markdown, or (None, why it failed)."""
    try:
        # This interpreter's DVC, whether or not its environment is activated.
        result = subprocess.run([sys.executable, "-m", "dvc", "metrics", "diff", "--md", base], capture_output=True,
                                text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"dvc metrics diff could not run ({error})"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        return None, f"dvc metrics diff {base} failed: {last}"
    return result.stdout, None


def read_pictures(plots_dir: Path, names: Sequence[str] = PICTURES) -> dict[str, bytes]:
    """The pictures that exist, in report order."""
    return {f"{plots_dir.as_posix()}/{name}.png": (plots_dir / f"{name}.png").read_bytes()
            for name in names if (plots_dir / f"{name}.png").is_file()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="the revision dvc metrics diff compares with")
    parser.add_argument("--gate", default="metrics/gate.json", help="the gate's decision")
    parser.add_argument("--scores", default="metrics/evaluate.json", help="accuracy per model and split")
    parser.add_argument("--report", default="metrics/evaluate_report.json", help="confusion matrices")
    parser.add_argument("--plots-dir", default="metrics/plots", help="the pictures the stages wrote")
    parser.add_argument("--out", type=Path, help="append the page to this file (default: print it)")
    args = parser.parse_args(argv)
    if not Path(args.gate).exists():
        print(f"{args.gate} is missing: run the pipeline first (dvc repro)", file=sys.stderr)
        return 2
    scores = read_json(Path(args.scores)) if Path(args.scores).exists() else {}
    report = read_json(Path(args.report)) if Path(args.report).exists() else None
    diff, problem = dvc_metrics_diff(args.base)
    page = build_report(read_json(Path(args.gate)), scores, report, args.base, diff, problem,
                        read_pictures(Path(args.plots_dir)))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as summary:
            summary.write(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
