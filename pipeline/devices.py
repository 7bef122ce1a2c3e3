"""Which devices train: one, several GPUs on one machine, or several machines.

Nothing here is ours to invent: it picks one of TensorFlow's own ``tf.distribute`` strategies
from ``base.distribution`` and what the machine has.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from pipeline.cpu import CpuMath, cpu_isa, cpuinfo_field, isa_in_use
from pipeline.model_table import model_spec

log = logging.getLogger("pipeline.devices")


@dataclass(frozen=True)
class Placement:
    """The chosen strategy, how many replicas it trains on, and this worker's share of the input."""

    strategy: tf.distribute.Strategy
    name: str
    replicas: int
    num_workers: int = 1
    worker_index: int = 0


def choose_placement(setting: str) -> Placement:
    """``auto``: several machines if ``TF_CONFIG`` names two or more, else every GPU if there are several,
    else one device. ``mirrored``: every GPU, or every logical CPU when there is no GPU.
    ``multi_worker``: ``MultiWorkerMirroredStrategy`` (needs ``TF_CONFIG``). ``none``: one device.
    """
    cluster = tf_config()
    # Before anything that starts TensorFlow's runtime (listing devices does): collective ops can
    # only be configured at program start.
    if setting == "multi_worker" or (setting == "auto" and worker_share(cluster)[0] > 1):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        workers, index = worker_share(cluster)
        return Placement(strategy, "multi_worker", strategy.num_replicas_in_sync, workers, index)
    gpus = tf.config.list_logical_devices("GPU")
    if setting == "mirrored" or (setting == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
        return Placement(strategy, "mirrored", strategy.num_replicas_in_sync)
    return Placement(tf.distribute.get_strategy(), "none", 1)


def worker_share(cluster: dict) -> tuple[int, int]:
    """How many processes train (a ``chief`` trains too) and which of them this one is."""
    tasks = cluster.get("cluster", {})
    chiefs = len(tasks.get("chief", []))
    task = cluster.get("task", {})
    index = int(task.get("index", 0)) + (chiefs if task.get("type", "worker") == "worker" else 0)
    return max(1, chiefs + len(tasks.get("worker", []))), index


def tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        from pipeline.errors import PipelineError

        raise PipelineError("TF_CONFIG is not valid JSON (see the tf.distribute multi-worker guide)") from None


# GPUs with bfloat16 tensor cores: compute capability 8.0 and up (A100, L4, H100, ...). On an H100
# (a probe through Keras's JAX and torch backends, 2026-11-28; docs/performance.md) mixed_bfloat16 trained both models at least as fast as
# mixed_float16, and it needs no loss scaling; older GPUs have float16 tensor cores only.
_GPU_BF16_CAPABILITY = (8, 0)


def resolve_precision(setting: str, model_name: str, cpu_bfloat16: bool | None = None) -> str:
    """The Keras dtype policy for ``precision: auto``: mixed precision on a GPU (see
    :func:`gpu_precision`), the measured best where the CPU's math has bfloat16 instructions
    (:attr:`CpuMath.bfloat16`), float32 elsewhere. Any other setting is used as it is.
    ``cpu_bfloat16`` overrides what :func:`cpu_math` finds (for tests and benchmarks)."""
    if setting != "auto":
        return setting
    # The GPUs this process may use (after any tf.config.set_visible_devices), the ones
    # choose_placement trains on; physical devices, as get_device_details needs.
    gpus = tf.config.get_visible_devices("GPU")
    if gpus:
        return gpu_precision([tf.config.experimental.get_device_details(gpu).get("compute_capability")
                              for gpu in gpus])
    if cpu_math().bfloat16 if cpu_bfloat16 is None else cpu_bfloat16:
        return model_spec(model_name).cpu_bfloat16_precision
    return "float32"


# oneDNN's bfloat16 convolutions on a CPU work on channels in groups of 16: a layer whose filters are
# not a multiple of 16 leaves that path. Measured by `make bench` (row 14, filters) on a 2-core Intel
# Xeon with AMX: the photo preset's network with 24 filters in its first block instead of 32 trained
# 0.35 times as many images a second in mixed_bfloat16, and 1.08 times in float32 (docs/performance.md).
BFLOAT16_CHANNEL_GROUP = 16


def slow_bfloat16_widths(filters: tuple[int, ...] | list[int], precision: str) -> list[int]:
    """The convolution widths that leave oneDNN's fast bfloat16 path on a CPU (none in any other
    precision, or on a GPU), each once, in order."""
    if precision != "mixed_bfloat16" or tf.config.get_visible_devices("GPU"):
        return []
    return list(dict.fromkeys(width for width in filters if width % BFLOAT16_CHANNEL_GROUP))


def resolve_jit_compile(setting: bool | str, model_name: str, math: CpuMath | None = None) -> bool:
    """Whether the training step is compiled with XLA. ``jit_compile: auto`` follows measurement
    (docs/performance.md): on a CPU whose TensorFlow runs without oneDNN, XLA's own kernels beat
    TensorFlow's (the model table says per model); with oneDNN, TensorFlow's own are faster. On a
    GPU, where it was not measured, auto leaves it off. ``math`` overrides :func:`cpu_math`."""
    if setting != "auto":
        return bool(setting)
    if tf.config.get_visible_devices("GPU"):
        return False
    math = math or cpu_math()
    return model_spec(model_name).cpu_xla_without_onednn and not math.onednn


def gpu_precision(compute_capabilities: list[tuple[int, int] | None]) -> str:
    """``mixed_bfloat16`` when every GPU has bfloat16 tensor cores, else ``mixed_float16``."""
    if compute_capabilities and all(c is not None and tuple(c) >= _GPU_BF16_CAPABILITY
                                    for c in compute_capabilities):
        return "mixed_bfloat16"
    return "mixed_float16"


def cpu_math(cpuinfo: str = "/proc/cpuinfo", onednn: bool | None = None) -> CpuMath:
    """The CPU's vector extensions (:func:`pipeline.cpu.cpu_isa`), those oneDNN may use, and
    whether TensorFlow's oneDNN is on (``onednn`` overrides that, for tests)."""
    best = cpu_isa(cpuinfo)
    return CpuMath(best, isa_in_use(best), _onednn_enabled() if onednn is None else onednn)


def _onednn_enabled() -> bool:
    """TensorFlow's own answer (a C++ helper without a public Python name; False where it is gone)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return False
    return bool(_pywrap_util_port.IsMklEnabled())


def machine_summary() -> dict[str, Any]:
    """The facts that decide speed and the ``auto`` choices: CPU model, cores, vector extensions
    (the CPU's and those in use), whether oneDNN is on, GPUs."""
    math = cpu_math()
    gpus = tf.config.get_visible_devices("GPU")
    return {"cpu": cpuinfo_field("model name") or platform.machine(), "cpu_cores": os.cpu_count() or 0,
            "cpu_isa": math.cpu_isa, "isa_in_use": math.isa_in_use, "onednn": math.onednn, "gpus": len(gpus)}
