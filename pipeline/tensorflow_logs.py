"""Make ``TF_CPP_MIN_LOG_LEVEL`` hold for TensorFlow's C++ start-up lines too.

TensorFlow's C++ libraries print a few lines while they load (absl's "All log messages before
absl::InitializeLog() is called" preamble, the oneDNN hint, "Could not find cuda drivers"), some of
them twice, and one more ("failed call to cuInit") when the runtime first looks for a GPU. They are
written before absl reads ``TF_CPP_MIN_LOG_LEVEL``, so the variable does not stop them, and on a
CPU-only machine the last one reads like an error on every stage.

:func:`quiet_start_up` arranges that the first ``import tensorflow`` (``import keras`` makes it
too) runs with file descriptor 2 captured, lists the physical devices while still captured, and
then writes back every captured line except TensorFlow log lines below the level and the cuInit
failure on a machine without an NVIDIA driver. Anything else, and everything if the import fails,
is written back unchanged. With ``TF_CPP_MIN_LOG_LEVEL=0`` nothing is captured at all.

If the import kills the process instead (a fatal CPU-feature check calls ``abort()``), nobody is
left to write the capture back, so a small guardian process started beside it does: it waits for
an "ok" on a pipe that only a living process can send, and on end-of-file without it copies the
captured text to the real stderr. Where the guardian cannot start, nothing is captured.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

# absl's line format: severity letter, MMDD, time (before absl is set up: seconds since the epoch,
# "00:00:1795859673.494217"), thread id, file:line] message.
_TF_LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ [^\]\s]+\] ")
_SEVERITY_LEVEL = {"I": 0, "W": 1, "E": 2, "F": 3}
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_NO_DRIVER_CUINIT = "failed call to cuInit"
_NVIDIA_DRIVER_NODE = Path("/dev/nvidiactl")


def lines_to_show(captured: str, min_level: int, has_nvidia_driver: bool) -> str:
    """The captured text less the TensorFlow log lines that ``min_level`` hides. Every other line
    stays, even one that might continue a hidden message: better a stray line than a lost one."""
    shown: list[str] = []
    for line in captured.splitlines(keepends=True):
        match = _TF_LOG_LINE.match(line)
        if match:
            hidden = _SEVERITY_LEVEL[match[1]] < min_level
            # Without an NVIDIA driver, "no GPU" is the expected answer, not an error.
            if hidden or (_NO_DRIVER_CUINIT in line and not has_nvidia_driver):
                continue
        elif line.startswith(_ABSL_PREAMBLE):
            continue  # it says only that the log lines after it bypass the level
        shown.append(line)
    return "".join(shown)


def quiet_start_up(min_level: int) -> None:
    """Capture TensorFlow's start-up lines at its first import (see the module docstring)."""
    if min_level <= 0 or "tensorflow" in sys.modules:
        return
    if not any(isinstance(finder, _TensorFlowFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TensorFlowFinder(min_level))


class _TensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as the other finders would, with a loader that captures its start-up."""

    def __init__(self, min_level: int) -> None:
        self.min_level = min_level

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        # Ask the finders after this one, as the import system would. A library that only asks
        # whether TensorFlow is installed gets a spec too; the finder stays until a real import.
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _QuietLoader(spec.loader, self.min_level)
                return spec
        return None


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader with file descriptor 2 captured; everything else goes to the real one."""

    def __init__(self, loader: importlib.abc.Loader, min_level: int) -> None:
        self._loader = loader
        self._min_level = min_level

    def __getattr__(self, name: str):
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _TensorFlowFinder)]
        captured: list[str] = []
        loaded = False
        try:
            with _stderr_into(captured):
                self._loader.exec_module(module)
                loaded = True
                _probe_devices(module)
        finally:
            module.__loader__ = module.__spec__.loader = self._loader
            text = "".join(captured)
            if loaded:
                text = lines_to_show(text, self._min_level, _NVIDIA_DRIVER_NODE.exists())
            if text and sys.stderr is not None:
                sys.stderr.write(text)
                sys.stderr.flush()


def _probe_devices(tensorflow: ModuleType) -> None:
    """List the physical devices, so that the runtime's GPU probe prints its line while captured.

    A failure here is left for the pipeline's own device code to report; the import itself stands.
    """
    try:
        tensorflow.config.list_physical_devices()
    except Exception:  # whatever a broken driver raises, the import must not fail for it
        pass


# Run with the real stderr: unless told "ok" before the pipe closes, print the capture file.
_GUARDIAN = ("import os, sys\n"
             "if os.read(int(sys.argv[1]), 2) != b'ok':\n"
             "    with open(sys.argv[2], 'rb') as capture:\n"
             "        os.write(2, capture.read())\n"
             "    os.unlink(sys.argv[2])\n")


@contextmanager
def _stderr_into(captured: list[str]) -> Iterator[None]:
    """Point file descriptor 2 at a temporary file; append what it got to ``captured`` at the end.

    A guardian process prints the file if this process dies first (see the module docstring).
    """
    import subprocess

    if sys.stderr is not None:
        sys.stderr.flush()
    handle, path = tempfile.mkstemp(prefix="tensorflow-start-up-", suffix=".log")
    listen, tell = os.pipe()
    try:
        guardian = subprocess.Popen([sys.executable, "-I", "-S", "-c", _GUARDIAN, str(listen), path],
                                    pass_fds=(listen,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    except OSError:
        guardian = None
    os.close(listen)
    if guardian is None:  # no safety net: better a few start-up lines than a lost error
        os.close(tell)
        os.close(handle)
        os.unlink(path)
        yield
        return
    saved = os.dup(2)
    os.dup2(handle, 2)
    try:
        yield
    finally:
        if sys.stderr is not None:
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        with os.fdopen(handle, "rb") as sink:
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))
        os.write(tell, b"ok")
        os.close(tell)
        guardian.wait()
        Path(path).unlink(missing_ok=True)
