"""The one table of models: what each is called, which stage trains it, where it is written.

Every place that loops over the models (``training``, ``evaluate``, ``gate``, ``devices``,
``bench``) reads :data:`MODELS`. Adding a third model is one entry here plus its builder in
:mod:`pipeline.models`, its params section in :mod:`pipeline.params`, its stage module and its
``dvc.yaml`` stage (which ``tests/test_dvc_yaml.py`` checks against this table).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """One trainable model of the pipeline."""

    name: str                # short name: metrics keys, deploy/model.json, the MLflow param "model"
    stage: str               # DVC stage and module pipeline/<stage>.py that trains it
    params_section: str      # the params.yaml section that stage reads
    builder: str             # the function of pipeline.models that builds it
    folder: str              # its output folder under models/
    cpu_bfloat16_precision: str  # what precision "auto" picks on a CPU with bfloat16 instructions
    cpu_xla_without_onednn: bool  # what jit_compile "auto" picks on a CPU where TensorFlow runs without oneDNN


# Measured with `make bench` (numerics row) on a 2-core AMD EPYC with AVX-512 BF16: mixed_bfloat16
# pays off for the custom CNN's large convolutions (1.7x, the same accuracy over ten seeds); for
# ResNet50 it does not. See docs/performance.md.
# XLA (jit_compile) against TensorFlow's own kernels, where it runs without oneDNN (float32, batch
# 32, 32x32): ResNet50 2.95x in bare Keras on a 2-core AMD EPYC without AVX-512 (issue 18); on a
# 2-core Xeon held to AVX2 with oneDNN off, 1.97x in bare Keras and 1.8x per steady epoch in the
# stage. The custom CNN: 1.0x on the EPYC, and in the stage on the held Xeon no faster per step and
# 18 s slower in all (compiling), so not for it. With oneDNN on, XLA is slower (ResNet50 0.80x on the
# Xeon with AMX, 0.43-0.48x on an EPYC with AVX-512 BF16), so auto leaves it off there.
MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("custom", "train_custom", "train_custom", "build_custom_cnn", "custom", "mixed_bfloat16", False),
    ModelSpec("resnet50", "train_resnet50", "train_resnet50", "build_resnet50", "resnet50", "float32", True),
)
MODEL_NAMES: tuple[str, ...] = tuple(spec.name for spec in MODELS)
TRAINING_STAGES: tuple[str, ...] = tuple(spec.stage for spec in MODELS)


def model_spec(name: str) -> ModelSpec:
    """The entry named ``name`` (a model name such as ``custom``, or its stage ``train_custom``)."""
    for spec in MODELS:
        if name in (spec.name, spec.stage):
            return spec
    raise KeyError(f"no model or training stage named {name!r} (known: {', '.join(MODEL_NAMES)})")
