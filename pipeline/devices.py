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
    """``auto``: several machines if ``TF_CONFIG`` names them, else every GPU if there are several,
    else one device. ``mirrored``: every GPU, or every logical CPU when there is no GPU.
    ``multi_worker``: ``MultiWorkerMirroredStrategy`` (needs ``TF_CONFIG``). ``none``: one device.
    """
    cluster = _tf_config()
    # Before anything that starts TensorFlow's runtime (listing devices does): collective ops can
    # only be configured at program start.
    if setting == "multi_worker" or (setting == "auto" and cluster):
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


def _tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        from pipeline.errors import PipelineError

        raise PipelineError("TF_CONFIG is not valid JSON (see the tf.distribute multi-worker guide)") from None


# GPUs with bfloat16 tensor cores: compute capability 8.0 and up (A100, L4, H100, ...). On an H100
# (a probe through Keras's JAX and torch backends, 2026-11-28; README, Performance) mixed_bfloat16 trained both models at least as fast as
# mixed_float16, and it needs no loss scaling; older GPUs have float16 tensor cores only.
_GPU_BF16_CAPABILITY = (8, 0)


def resolve_precision(setting: str, model_name: str, cpu_bfloat16: bool | None = None) -> str:
    """The Keras dtype policy for ``precision: auto``: mixed precision on a GPU (see
    :func:`gpu_precision`), the measured best on a CPU with bfloat16 instructions, float32
    elsewhere. Any other setting is used as it is. ``cpu_bfloat16`` overrides what
    :func:`cpu_has_bfloat16` reads (for tests and benchmarks)."""
    if setting != "auto":
        return setting
    # The GPUs this process may use (after any tf.config.set_visible_devices), the ones
    # choose_placement trains on; physical devices, as get_device_details needs.
    gpus = tf.config.get_visible_devices("GPU")
    if gpus:
        return gpu_precision([tf.config.experimental.get_device_details(gpu).get("compute_capability")
                              for gpu in gpus])
    if cpu_has_bfloat16() if cpu_bfloat16 is None else cpu_bfloat16:
        return model_spec(model_name).cpu_bfloat16_precision
    return "float32"


def gpu_precision(compute_capabilities: list[tuple[int, int] | None]) -> str:
    """``mixed_bfloat16`` when every GPU has bfloat16 tensor cores, else ``mixed_float16``."""
    if compute_capabilities and all(c is not None and tuple(c) >= _GPU_BF16_CAPABILITY
                                    for c in compute_capabilities):
        return "mixed_bfloat16"
    return "mixed_float16"


def cpu_has_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True on CPUs with AVX-512 BF16 or AMX (read from /proc/cpuinfo; False where it is absent)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpuinfo_field("flags", cpuinfo).split()))


def machine_summary() -> dict[str, Any]:
    """The facts that decide speed and the ``auto`` choices: CPU model, cores, vector extensions, GPUs."""
    flags = set(cpuinfo_field("flags").split())
    isa = "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else \
        "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    gpus = tf.config.get_visible_devices("GPU")
    return {"cpu": cpuinfo_field("model name") or platform.machine(), "cpu_cores": os.cpu_count() or 0, "cpu_isa": isa,
            "gpus": len(gpus)}


def cpuinfo_field(name: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The value of the first ``name : value`` line of /proc/cpuinfo ("" where there is none, as off Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""
