"""The CI workflow: it parses, and the report never passes off the committed decision as this run's."""

from __future__ import annotations

import yaml

from tests.conftest import REPO_ROOT

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "pipeline.yml"


def test_the_report_follows_only_a_pipeline_that_ran_to_its_gate() -> None:
    (job,) = yaml.safe_load(WORKFLOW.read_text())["jobs"].values()
    steps = {step["id"]: step for step in job["steps"] if "id" in step}
    assert steps["pipeline"]["run"] == "make repro"
    report = next(step for step in job["steps"] if "pipeline.report" in step.get("run", ""))
    assert report["if"] == "always() && steps.pipeline.outcome == 'success'"
    assert any(step.get("if") == "always() && steps.pipeline.outcome != 'success'" and "GITHUB_STEP_SUMMARY"
               in step["run"] for step in job["steps"])
    # The team's replacement step, commented out, keeps the id the report depends on.
    team = WORKFLOW.read_text().split("# - name: Run the pipeline (pull requests", 1)[1]
    assert team.splitlines()[1].strip() == "#   id: pipeline"
