"""``precision: auto`` and ``jit_compile: auto``: which Keras dtype policy each model trains in, and whether
with XLA, per device; what ran is recorded."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

from pipeline.cpu import CpuMath, cpuinfo_field
from pipeline.devices import (
    cpu_math,
    gpu_precision,
    machine_summary,
    resolve_jit_compile,
    resolve_precision,
    worker_share,
)
from pipeline.model_table import MODEL_NAMES

AVX2_CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
BF16_CPUINFO = ("processor\t: 0\nmodel name\t: AMD EPYC 9B14\n"
                "flags\t\t: fpu sse avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n")


@pytest.mark.parametrize(("capabilities", "policy"), [
    ([(9, 0)], "mixed_bfloat16"),                 # H100
    ([(8, 0), (8, 6)], "mixed_bfloat16"),         # A100 beside an RTX 30xx
    ([(7, 5)], "mixed_float16"),                  # T4: float16 tensor cores only
    ([(8, 0), (7, 0)], "mixed_float16"),          # a mixed machine trains in what every GPU has
    ([None], "mixed_float16"),                    # capability unknown: the policy every GPU runs
])
def test_gpu_precision_follows_bfloat16_tensor_cores(capabilities: list, policy: str) -> None:
    assert gpu_precision(capabilities) == policy


@pytest.mark.parametrize("setting", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_an_explicit_precision_is_used_as_it_is(setting: str) -> None:
    assert resolve_precision(setting, "custom") == resolve_precision(setting, "resnet50") == setting


def _no_gpu() -> None:
    import tensorflow as tf

    if tf.config.get_visible_devices("GPU"):
        pytest.skip("auto picks a GPU policy on this machine")


def test_auto_on_a_bfloat16_cpu_uses_bfloat16_for_the_cnn_only() -> None:
    _no_gpu()
    # The measured choice (docs/performance.md): bf16 pays for the custom CNN, not for ResNet50.
    assert resolve_precision("auto", "custom", cpu_bfloat16=True) == "mixed_bfloat16"
    assert resolve_precision("auto", "resnet50", cpu_bfloat16=True) == "float32"


def test_auto_without_bfloat16_instructions_stays_float32() -> None:
    _no_gpu()
    assert {resolve_precision("auto", name, cpu_bfloat16=False) for name in MODEL_NAMES} == {"float32"}


def test_the_cpu_math_is_read_from_the_cpu_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    (tmp_path / "avx2").write_text(AVX2_CPUINFO)
    (tmp_path / "bf16").write_text(BF16_CPUINFO)
    assert cpu_math(str(tmp_path / "avx2"), onednn=False) == CpuMath("avx2", "avx2", onednn=False)
    assert cpu_math(str(tmp_path / "bf16"), onednn=True) == CpuMath("avx512_bf16", "avx512_bf16", onednn=True)
    assert cpu_math(str(tmp_path / "absent"), onednn=False).cpu_isa == "other"
    assert not cpu_math(str(tmp_path / "avx2"), onednn=True).bfloat16
    assert cpu_math(str(tmp_path / "bf16"), onednn=True).bfloat16
    # bf16 instructions that TensorFlow's own kernels (oneDNN off) never use do not count.
    assert not cpu_math(str(tmp_path / "bf16"), onednn=False).bfloat16
    assert cpuinfo_field("model name", str(tmp_path / "bf16")) == "AMD EPYC 9B14"


@pytest.mark.parametrize(("cap", "in_use"), [("AVX2", "avx2"), ("avx512_core", "avx512"),
                                             ("AVX512_CORE_AMX", "avx512_bf16"), ("nonsense", "avx512_bf16")])
def test_onednn_max_cpu_isa_holds_the_isa_in_use_down(cap: str, in_use: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bf16").write_text(BF16_CPUINFO)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    math = cpu_math(str(tmp_path / "bf16"), onednn=True)
    assert (math.cpu_isa, math.isa_in_use) == ("avx512_bf16", in_use)
    assert math.bfloat16 == (in_use == "avx512_bf16")


def test_jit_compile_auto_is_on_for_resnet50_only_where_tensorflow_runs_without_onednn() -> None:
    _no_gpu()
    without, with_onednn = CpuMath("avx2", "avx2", onednn=False), CpuMath("amx", "amx", onednn=True)
    # Measured: ResNet50 gains from XLA there, the custom CNN does not.
    assert resolve_jit_compile("auto", "resnet50", without) is True
    assert resolve_jit_compile("auto", "custom", without) is False
    for name in MODEL_NAMES:
        assert resolve_jit_compile("auto", name, with_onednn) is False
        assert resolve_jit_compile(False, name, without) is False
        assert resolve_jit_compile(True, name, with_onednn) is True


def test_machine_summary_names_the_cpu_and_its_vector_extensions() -> None:
    summary = machine_summary()
    assert set(summary) == {"cpu", "cpu_cores", "cpu_isa", "isa_in_use", "onednn", "gpus"}
    assert summary["cpu_cores"] >= 1 and summary["cpu"]
    assert isinstance(summary["onednn"], bool)
    if Path("/proc/cpuinfo").exists():
        assert summary["cpu"] == cpuinfo_field("model name")
        assert summary["cpu_isa"] == cpu_math().cpu_isa


@pytest.mark.parametrize(("cluster", "share"), [
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}, (2, 1)),
    # A chief trains too: it is share 0, and worker i is share i + 1.
    ({"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {"type": "chief", "index": 0}}, (3, 0)),
    ({"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {"type": "worker", "index": 1}}, (3, 2)),
])
def test_each_process_of_a_cluster_reads_its_own_share(cluster: dict, share: tuple) -> None:
    assert worker_share(cluster) == share


@pytest.mark.parametrize(("augment", "deterministic", "xla"), [
    ({}, False, True),
    ({"horizontal_flip": True}, False, True),
    ({"horizontal_flip": True, "rotation": 0.1, "zoom": 0.1}, False, False),   # the photo preset's
    ({}, True, False),
])
def test_what_is_recorded_for_xla_is_what_keras_compiles_with(augment: dict, deterministic: bool,
                                                              xla: bool) -> None:
    """Keras switches XLA off (with only a warning) for layers without it and under op determinism: the
    run's record (jit_compile.in_effect) must say so, checked against the compiled model itself."""
    import dataclasses

    import keras

    from pipeline.model_table import model_spec
    from pipeline.models import build_custom_cnn, compile_model
    from pipeline.params import load_params
    from pipeline.training import resolve_setup
    from tests.conftest import REPO_ROOT

    params = load_params(REPO_ROOT / "params.yaml")
    base = dataclasses.replace(params.base, deterministic=deterministic, distribution="none")
    section = dataclasses.replace(params.train_custom, jit_compile=True, precision="float32")
    chosen = dataclasses.replace(params.augment, **augment)
    _, setup = resolve_setup(base, section, model_spec("custom"), chosen)
    assert setup.jit_compile is xla
    if deterministic:   # op determinism cannot be switched off again in this process: Keras's rule as read
        return
    model = build_custom_cnn((32, 32, 1), 3, [4], [], 0.0, augment=chosen)
    try:
        # Keras's only word when it switches XLA off is this warning.
        with pytest.warns(UserWarning, match="support `jit_compile=True`") if not xla else contextlib.nullcontext():
            compile_model(model, "adam", 0.001, "crossentropy", 3, jit_compile=True)
        model.fit(np.zeros((2, 32, 32, 1)), np.zeros((2, 3)), epochs=1, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.jit_compile is xla


def test_widths_off_onednns_bfloat16_channel_groups_are_named_only_in_bfloat16() -> None:
    from pipeline.devices import slow_bfloat16_widths

    assert slow_bfloat16_widths([24, 48, 24, 72, 256], "mixed_bfloat16") == [24, 72]
    assert slow_bfloat16_widths([32, 64, 128, 256], "mixed_bfloat16") == []
    assert slow_bfloat16_widths([24, 72], "float32") == [] and slow_bfloat16_widths([24], "mixed_float16") == []
