"""What the CPU offers and what TensorFlow's math may use of it, read without importing TensorFlow
(the benchmarks' table header reads it too)."""

from __future__ import annotations

import os
from dataclasses import dataclass

# The vector extensions that decide CPU speed, weakest first.
ISA_LEVELS = ("other", "avx2", "avx512", "avx512_bf16", "amx")
# oneDNN's ONEDNN_MAX_CPU_ISA values (its documentation, "CPU dispatcher control") as those levels.
_ONEDNN_ISA_CAPS = {
    "SSE41": "other", "AVX": "other", "AVX2": "avx2", "AVX2_VNNI": "avx2", "AVX2_VNNI_2": "avx2",
    "AVX512_CORE": "avx512", "AVX512_CORE_VNNI": "avx512", "AVX512_CORE_BF16": "avx512_bf16",
    "AVX512_CORE_FP16": "avx512_bf16", "AVX10_1_512": "avx512_bf16", "AVX512_CORE_AMX": "amx",
    "AVX512_CORE_AMX_FP16": "amx", "AVX10_1_512_AMX": "amx", "AVX10_1_512_AMX_FP16": "amx", "DEFAULT": "amx",
    "ALL": "amx",
}


@dataclass(frozen=True)
class CpuMath:
    """What TensorFlow's CPU math runs on here, which decides the ``auto`` choices.

    ``onednn``: TensorFlow's oneDNN kernels are on. TensorFlow turns them on by itself only on CPUs
    with AVX-512 VNNI or BF16, AVX-VNNI or AMX; elsewhere (AMD EPYC before Zen 4, most laptops) its
    own kernels run unless ``TF_ENABLE_ONEDNN_OPTS=1``. ``isa_in_use``: the best extension oneDNN
    may use, the CPU's own (``cpu_isa``) unless ``ONEDNN_MAX_CPU_ISA`` holds it lower.
    """

    cpu_isa: str
    isa_in_use: str
    onednn: bool

    @property
    def bfloat16(self) -> bool:
        """bfloat16 instructions reach the math: oneDNN on, and AVX-512 BF16 or AMX in use."""
        return self.onednn and ISA_LEVELS.index(self.isa_in_use) >= ISA_LEVELS.index("avx512_bf16")


def cpu_isa(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The best of :data:`ISA_LEVELS` the CPU has, from the flags in /proc/cpuinfo."""
    flags = set(cpuinfo_field("flags", cpuinfo).split())
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else \
        "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


def isa_in_use(best: str) -> str:
    """``best``, or less where ``ONEDNN_MAX_CPU_ISA`` holds oneDNN to less (an unknown value holds nothing)."""
    cap = _ONEDNN_ISA_CAPS.get(os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper(), "amx")
    return min(best, cap, key=ISA_LEVELS.index)


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
