"""TensorFlow's C++ start-up lines obey TF_CPP_MIN_LOG_LEVEL; nothing else written to stderr is lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.tensorflow_logs import lines_to_show
from tests.stage_runner import stage_env

# What `import tensorflow` and the first device listing wrote on a CPU-only machine (TF 2.21).
PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
ONEDNN = ("I0000 00:00:1795859673.494217   30103 port.cc:153] oneDNN custom operations are on. You may see "
          "slightly different numerical results due to floating-point round-off errors.\n")
NO_CUDA = ("I0000 00:00:1795859673.494598   30103 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
           "GPU will not be used.\n")
CUINIT = ("E0000 00:00:1795859680.393549   30103 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
          "Failed call to cuInit: UNKNOWN ERROR (303)\n")
START_UP = PREAMBLE + ONEDNN + NO_CUDA + PREAMBLE + ONEDNN + NO_CUDA + CUINIT


def test_the_start_up_lines_are_hidden_at_the_default_level_without_a_driver() -> None:
    assert lines_to_show(START_UP, min_level=2, has_nvidia_driver=False) == ""


def test_a_failed_cuinit_is_shown_where_an_nvidia_driver_is_installed() -> None:
    assert lines_to_show(START_UP, min_level=2, has_nvidia_driver=True) == CUINIT
    assert lines_to_show(START_UP, min_level=3, has_nvidia_driver=True) == ""


def test_each_level_hides_only_what_is_below_it() -> None:
    warning = "W0000 00:00:1795859673.5   30103 some.cc:1] a warning\n"
    error = "E0000 00:00:1795859673.6   30103 other.cc:2] an error\n"
    text = ONEDNN + warning + error
    assert lines_to_show(text, min_level=1, has_nvidia_driver=False) == warning + error
    assert lines_to_show(text, min_level=2, has_nvidia_driver=False) == error
    assert lines_to_show(text, min_level=3, has_nvidia_driver=False) == ""


def test_every_line_that_is_not_a_tensorflow_log_line_stays() -> None:
    other = "some library's own note on stderr\n"
    error = ONEDNN.replace("I0000", "E0000")
    assert lines_to_show(ONEDNN + other + error + other, min_level=2, has_nvidia_driver=False) == other + error + other


def _python(code: str, tmp_path: Path, level: str | None = None, fake_tensorflow: str | None = None,
            **variables: str):
    """Run ``code`` in a fresh interpreter, with a stand-in ``tensorflow`` package if given."""
    env = stage_env(**variables)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    if fake_tensorflow is not None:
        package = tmp_path / "fake" / "tensorflow"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(fake_tensorflow, encoding="utf-8")
        env["PYTHONPATH"] = os.pathsep.join([str(package.parent), env["PYTHONPATH"]])
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False)


# With an NVIDIA driver a failed cuInit is news, and it is shown; without one it is hidden.
_CUINIT_WITH_A_DRIVER = CUINIT if Path("/dev/nvidiactl").exists() else ""

# A stand-in that writes to file descriptor 2 from "C++" as TensorFlow does, at import and on the
# first device listing.
FAKE = f"""
import os
os.write(2, {(PREAMBLE + ONEDNN).encode()!r})
os.write(2, b"a note from the import itself\\n")


class config:
    @staticmethod
    def list_physical_devices():
        os.write(2, {CUINIT.encode()!r})
        return []
"""


def test_import_through_pipeline_filters_what_the_library_writes(tmp_path: Path) -> None:
    done = _python("import pipeline, tensorflow; print(type(tensorflow.__loader__).__name__)", tmp_path,
                   fake_tensorflow=FAKE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SourceFileLoader"  # the module looks as if imported the usual way
    assert done.stderr == "a note from the import itself\n" + _CUINIT_WITH_A_DRIVER


def test_asking_whether_tensorflow_is_installed_does_not_spend_the_capture(tmp_path: Path) -> None:
    code = ("import importlib.util, pipeline; assert importlib.util.find_spec('tensorflow'); "
            "import tensorflow")
    done = _python(code, tmp_path, fake_tensorflow=FAKE)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "a note from the import itself\n" + _CUINIT_WITH_A_DRIVER


def test_level_zero_shows_everything(tmp_path: Path) -> None:
    done = _python("import pipeline, tensorflow; tensorflow.config.list_physical_devices()", tmp_path, level="0",
                   fake_tensorflow=FAKE)
    assert done.returncode == 0, done.stderr
    assert done.stderr == PREAMBLE + ONEDNN + "a note from the import itself\n" + CUINIT


def test_a_failing_import_writes_back_everything_it_printed(tmp_path: Path) -> None:
    failing = FAKE + "\nraise ImportError('libtensorflow_framework.so.2: cannot open shared object file')\n"
    done = _python("import pipeline, tensorflow", tmp_path, fake_tensorflow=failing)
    assert done.returncode == 1
    assert done.stderr.startswith(PREAMBLE + ONEDNN + "a note from the import itself\n")
    assert "ImportError: libtensorflow_framework.so.2: cannot open shared object file" in done.stderr


def test_a_device_probe_that_fails_does_not_fail_the_import(tmp_path: Path) -> None:
    broken = FAKE.replace("        return []", "        raise RuntimeError('CUDA driver version is insufficient')")
    done = _python("import pipeline, tensorflow; print('imported')", tmp_path, fake_tensorflow=broken)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"


def test_an_import_that_aborts_the_process_still_shows_what_it_wrote(tmp_path: Path) -> None:
    """A fatal CPU-feature check calls abort() while stderr is captured: its message must reach the user."""
    aborting = ("import os\nos.write(2, b'F0000 00:00:1.0 1 cpu_feature_guard.cc:1] The TensorFlow library was "
                "compiled to use AVX512F instructions, but these are not available on your machine.\\n')\n"
                "os.abort()\n")
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    done = _python("import pipeline, tensorflow", tmp_path, fake_tensorflow=aborting, TMPDIR=str(private_tmp))
    assert done.returncode == -6  # SIGABRT
    assert "compiled to use AVX512F instructions, but these are not available" in done.stderr
    assert list(private_tmp.iterdir()) == []  # the guardian that printed the capture also removed it


@pytest.mark.slow  # imports the real TensorFlow twice, in fresh interpreters
def test_real_tensorflow_starts_without_a_word_below_the_level(tmp_path: Path) -> None:
    code = "import pipeline, keras, tensorflow as tf; print(float(tf.reduce_sum(tf.ones(3))))"
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3.0"
    assert done.stderr == _CUINIT_WITH_A_DRIVER or Path("/dev/nvidiactl").exists() and not [
        line for line in done.stderr.splitlines() if line[:1] in "IW" and line[1:5] == "0000" or "absl::" in line]
    # The same without the pipeline's default level: the lines are there to hide.
    loud = _python(code, tmp_path, level="0")
    assert "absl::InitializeLog" in loud.stderr
