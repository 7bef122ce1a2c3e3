"""The benchmark harness's runners leave nothing running: not at a timeout, not after Ctrl-C, not a
descendant that outlives the command."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import child_env, run_measured, run_timestamped
from tests.conftest import REPO_ROOT


def gone(pid_file: Path, wait: float = 5.0) -> bool:
    """Whether the process whose id the command wrote has ended (a zombie, not yet reaped, counts as ended)."""
    deadline = time.monotonic() + wait
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    stat = Path("/proc") / pid_file.read_text().strip() / "stat"
    while time.monotonic() < deadline:
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def returns_while_the_descendant_lives(call, pid_file: Path) -> bool:
    """Whether ``call`` returned (within half a minute) while the ten-minute descendant it started was
    still to run; the descendant is ended either way."""
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout=30)
    returned = not worker.is_alive()
    if not returned and pid_file.exists():   # the old behaviour: waiting for it; end it ourselves
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    return returned


def test_a_descendant_left_holding_the_output_is_ended(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    results = []
    command = ["bash", "-c", f"sleep 600 & echo $! > {pid_file}; echo started"]
    assert returns_while_the_descendant_lives(
        lambda: results.append(run_measured(command, timeout=1200, sample_tree=False)), pid_file)
    assert results[0].returncode == 0 and results[0].stdout.strip() == "started"
    assert gone(pid_file)


def test_a_timed_out_repro_ends_the_stages_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    results = []
    command = ["bash", "-c", f"sleep 600 & echo $! > {pid_file}; wait"]
    assert returns_while_the_descendant_lives(
        lambda: results.append(run_timestamped(command, cwd=tmp_path, env=child_env(), timeout=1)), pid_file)
    assert results[0].returncode != 0
    assert gone(pid_file)


def test_ctrl_c_during_a_measured_command_ends_it(tmp_path: Path) -> None:
    """The command runs in a session of its own, so the terminal's Ctrl-C reaches only the harness."""
    pid_file = tmp_path / "pid"
    # Ctrl-C raises KeyboardInterrupt in the harness, whatever handler this test process passed down.
    driver = (f"import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
              f"from bench.common import run_measured\n"
              f"run_measured(['bash', '-c', 'echo $$ > {pid_file}; exec sleep 60'], sample_tree=False)\n")
    harness = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO_ROOT, env=child_env(),
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(harness.pid, signal.SIGINT)
    _, err = harness.communicate(timeout=30)
    assert "KeyboardInterrupt" in err
    assert gone(pid_file)
