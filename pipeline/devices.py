"""Which devices train: one, several GPUs on one machine, or several machines.

Nothing here is ours to invent: it picks one of TensorFlow's own ``tf.distribute`` strategies
from ``base.distribution`` and what the machine has.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import tensorflow as tf

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
    gpus = tf.config.list_logical_devices("GPU")
    cluster = _tf_config()
    if setting == "multi_worker" or (setting == "auto" and cluster):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        workers = len(cluster.get("cluster", {}).get("worker", [])) or 1
        index = int(cluster.get("task", {}).get("index", 0))
        return Placement(strategy, "multi_worker", strategy.num_replicas_in_sync, workers, index)
    if setting == "mirrored" or (setting == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
        return Placement(strategy, "mirrored", strategy.num_replicas_in_sync)
    return Placement(tf.distribute.get_strategy(), "none", 1)


def _tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        from pipeline.errors import PipelineError

        raise PipelineError("TF_CONFIG is not valid JSON (see the tf.distribute multi-worker guide)") from None


# Measured with `make bench` (numerics row) on a 2-core AMD EPYC with AVX-512 BF16: see the README's
# Performance section. bfloat16 pays off for the custom CNN's large convolutions (1.7x per core, the
# same accuracy over ten seeds: bench/results-precision-custom.json); for ResNet50 it does not.
_CPU_BF16_PRECISION = {"custom": "mixed_bfloat16", "resnet50": "float32"}

# GPUs with bfloat16 tensor cores: compute capability 8.0 and up (A100, L4, H100, ...). On an H100
# (bench/results-gpu-h100.json) mixed_bfloat16 trained both models at least as fast as
# mixed_float16, and it needs no loss scaling; older GPUs have float16 tensor cores only.
_GPU_BF16_CAPABILITY = (8, 0)


def resolve_precision(setting: str, model_name: str) -> str:
    """The Keras dtype policy for ``precision: auto``: mixed precision on a GPU (see
    :func:`gpu_precision`), the measured best on a CPU with bfloat16 instructions, float32
    elsewhere. Any other setting is used as it is."""
    if setting != "auto":
        return setting
    # The GPUs this process may use (after any tf.config.set_visible_devices), the ones
    # choose_placement trains on; physical devices, as get_device_details needs.
    gpus = tf.config.get_visible_devices("GPU")
    if gpus:
        return gpu_precision([tf.config.experimental.get_device_details(gpu).get("compute_capability")
                              for gpu in gpus])
    if cpu_has_bfloat16():
        return _CPU_BF16_PRECISION.get(model_name, "float32")
    return "float32"


def gpu_precision(compute_capabilities: list[tuple[int, int] | None]) -> str:
    """``mixed_bfloat16`` when every GPU has bfloat16 tensor cores, else ``mixed_float16``."""
    if compute_capabilities and all(c is not None and tuple(c) >= _GPU_BF16_CAPABILITY
                                    for c in compute_capabilities):
        return "mixed_bfloat16"
    return "mixed_float16"


def cpu_has_bfloat16() -> bool:
    """True on CPUs with AVX-512 BF16 or AMX (read from /proc/cpuinfo; False where it is absent)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))
