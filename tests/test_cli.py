"""How a stage's process starts and ends: what it says to MLflow's makers (nothing), and an exit
that skips the interpreter's teardown but keeps what the teardown would have finished."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.stage_runner import stage_env

# A stage's shell around a body that leaves work for the exit: output still in stdout's buffer (a
# pipe, so block-buffered) and an exit handler; with --thread also a non-daemon thread that writes
# a file after the body returned, with --pool a thread pool left open (as pipeline.predict's decoder
# pool is). --fail makes the body fail as a user error.
DEMO_STAGE = """
import atexit, concurrent.futures, sys, threading, time
from pathlib import Path
from pipeline import cli
from pipeline.errors import PipelineError

POOLS = []

def body(args):
    sys.stdout.write("buffered, never flushed by the body")
    atexit.register(lambda: sys.stderr.write("exit handler ran\\n"))
    if args.thread:
        def late_write():
            time.sleep(0.5)
            Path(args.thread).write_text("written by a thread after the body returned")
        threading.Thread(target=late_write).start()
    if args.pool:
        POOLS.append(concurrent.futures.ThreadPoolExecutor(2))   # kept, as a cached pool is
        assert POOLS[0].submit(sum, [1, 2]).result() == 3
    if args.fail:
        raise PipelineError("the demo failed as asked")

parser = cli.stage_parser("demo", "a stage that leaves work for its exit")
parser.add_argument("--thread")
parser.add_argument("--pool", action="store_true")
parser.add_argument("--fail", action="store_true")
cli.main_entry("demo", body, parser)
print("after main_entry: never printed")
"""


def _clean_env(**overrides: str) -> dict[str, str]:
    """A stage's environment (:func:`tests.stage_runner.stage_env`: no MLFLOW_* of the caller's)
    without what would hide the behaviour: unbuffered output, and the variables by which MLflow
    recognises a test or CI run (pytest's, CI providers')."""
    hidden = {"PYTHONUNBUFFERED", "PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL",
              "TRAVIS", "CIRCLECI", "TF_BUILD", "BUILDKITE", "DO_NOT_TRACK"}
    env = {key: value for key, value in stage_env().items() if key not in hidden}
    env.update(overrides)
    return env


@pytest.mark.parametrize("fail, code", [(False, 0), (True, 2)])
@pytest.mark.parametrize("leaves", ["nothing running", "a thread", "a thread pool"])
def test_a_stage_ends_with_its_code_after_its_threads_exit_handlers_and_buffered_output(
        tmp_path: Path, leaves: str, fail: bool, code: int) -> None:
    late = tmp_path / "late.txt"
    options = {"nothing running": [], "a thread": ["--thread", str(late)], "a thread pool": ["--pool"]}[leaves]
    result = subprocess.run([sys.executable, "-c", DEMO_STAGE, *options, *(["--fail"] if fail else [])],
                            cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == code, result.stderr
    assert result.stdout == "buffered, never flushed by the body"
    assert "exit handler ran" in result.stderr
    if leaves == "a thread":
        assert late.read_text() == "written by a thread after the body returned"
    assert ("stage demo failed: the demo failed as asked" in result.stderr) is fail
    assert "Traceback" not in result.stderr


def test_a_profiled_stage_still_writes_its_profile(tmp_path: Path) -> None:
    """``python -m cProfile`` writes its file once the stage's module returns: the short exit waits."""
    script = tmp_path / "demo_stage.py"
    script.write_text(DEMO_STAGE)
    profile = tmp_path / "demo.prof"
    result = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), str(script)], cwd=tmp_path,
                            env=_clean_env(), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert profile.stat().st_size > 0


def test_mlflow_reports_nothing_to_its_makers_unless_the_user_asks(tmp_path: Path) -> None:
    # As a user's stage starts it: no CI or pytest variable that would turn MLflow's telemetry off.
    probe = ("import pipeline, mlflow\n"
             "from mlflow.telemetry.client import get_telemetry_client\n"
             "print(get_telemetry_client())")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=_clean_env(), capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"
    # A user's own choice stands (checked before mlflow is imported: turned on, it would go online).
    kept = subprocess.run([sys.executable, "-c", "import os, pipeline; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"],
                          cwd=tmp_path, env=_clean_env(MLFLOW_DISABLE_TELEMETRY="false"), capture_output=True,
                          text=True, timeout=60, check=False)
    assert kept.stdout.strip() == "false", kept.stderr
