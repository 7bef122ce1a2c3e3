"""``precision: auto``: which Keras dtype policy each model trains in, per device."""

from __future__ import annotations

import pytest

from pipeline.devices import cpu_has_bfloat16, gpu_precision, resolve_precision


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


def test_auto_on_this_cpu_follows_the_measured_table() -> None:
    import tensorflow as tf

    if tf.config.get_visible_devices("GPU"):
        pytest.skip("this machine has a GPU")
    expected = {"custom": "mixed_bfloat16", "resnet50": "float32"} if cpu_has_bfloat16() else \
        {"custom": "float32", "resnet50": "float32"}
    assert {model: resolve_precision("auto", model) for model in expected} == expected
