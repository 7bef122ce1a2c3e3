"""Row 11, utilisation: each model's training step against the physical limit of the CPU.

Measured: images per second of bare ``model.fit`` (the pipeline's model builders and compile
settings, with what ``precision: auto`` and ``jit_compile: auto`` choose on this machine), over the
epochs after the first, times the floating-point operations one training image costs.

FLOPs: TensorFlow's own profiler (``tf.compat.v1.profiler``, float operations) counts the forward
pass of one image on the frozen inference graph; a training step costs about three forward passes
(the backward pass computes the gradients of the inputs and of the weights, each about one forward
pass), the usual estimate.

Peak: cores x clock x FLOPs per cycle per core. In float32: 2 (a fused multiply-add is two) x 2 FMA
units x the vector lanes of the widest extension in use (16 for AVX-512, 8 for AVX2). A step in
``mixed_bfloat16`` is measured against the bfloat16 units in use instead (AVX-512 BF16: twice the
float32 rate; AMX: 1,024 per cycle). The clock is the one /proc/cpuinfo reports (turbo not
counted); cores are the logical CPUs the OS shows, which on a VM may be hyperthreads of fewer
physical cores.

Row 2 (input) gives the other ratio: the pipeline's own input against this bare ``model.fit``.
"""

from __future__ import annotations

from bench.common import Line, RowResult, fmt_number, run_worker, stats, worker_main
from bench.training_input import model_spec

# images, epochs (the first is the warm-up: tracing, XLA compilation), model size overrides
SIZES = {
    "full": {"custom": (1_440, 5, {}), "resnet50": (640, 4, {})},
    "quick": {"custom": (640, 3, {}), "resnet50": (320, 3, {})},
    "tiny": {"custom": (96, 2, {"blocks": [8], "dense_units": [16]})},
}
LANES = {"amx": 16, "avx512_bf16": 16, "avx512": 16, "avx2": 8}   # float32 lanes per vector register
FMA_UNITS = 2
CLASSES = 10


# bfloat16 FLOPs per cycle per core: AVX-512 BF16's dot products take two bf16 pairs per float32
# lane (so twice float32's rate); an AMX tile multiply unit does 1,024 (Intel's figure for Sapphire Rapids).
BF16_FLOPS_PER_CYCLE = {"amx": 1024, "avx512_bf16": 2 * 2 * FMA_UNITS * 16}


def flops_per_cycle(isa: str, policy: str) -> int:
    """What one core can do per cycle at most: float32 FMAs on the widest vectors in use, or the
    bfloat16 units when the policy computes in bfloat16 and they are in use."""
    if policy == "mixed_bfloat16" and isa in BF16_FLOPS_PER_CYCLE:
        return BF16_FLOPS_PER_CYCLE[isa]
    return 2 * FMA_UNITS * LANES.get(isa, 4)


def peak_flops(cores: int, clock_hz: float, isa: str, policy: str = "float32") -> float:
    """FLOP/s the CPU can do at most with the extension ``isa`` in the precision of ``policy``."""
    return cores * clock_hz * flops_per_cycle(isa, policy)


def run(mode: str) -> RowResult:
    row = RowResult("utilisation", "training step FLOP/s against the CPU's float32 peak")
    for model, (count, epochs, overrides) in SIZES[mode].items():
        spec = {**model_spec(model, {model: overrides, "image_size": 32, "channels": 1}), "count": count,
                "epochs": epochs, "precision": "auto", "label": f"{model} utilisation"}
        result = run_worker("bench.utilisation", spec)
        speeds = result["steady_images_per_s"]
        train_flops = 3 * result["forward_flops"]
        peak = peak_flops(result["cores"], result["clock_hz"], result["isa_in_use"], result["policy"])
        achieved = [speed * train_flops for speed in speeds]
        ratios = [value / peak for value in achieved]
        summary = stats([value / 1e9 for value in achieved])
        row.lines.append(Line(
            f"{model} ({result['policy']}, XLA {'on' if result['jit_compile'] else 'off'})",
            f"{fmt_number(summary['median'], 3)} GFLOP/s ({fmt_number(stats(speeds)['median'], 3)} img/s x "
            f"{fmt_number(train_flops / 1e9, 3)} GFLOP)",
            f"peak {fmt_number(peak / 1e9, 3)} GFLOP/s ({result['cores']} x {result['clock_hz'] / 1e9:.2f} GHz x "
            f"{flops_per_cycle(result['isa_in_use'], result['policy'])}, {result['isa_in_use']})",
            stats(ratios), "-", None,
            {**result, "train_flops_per_image": train_flops, "peak_flops": peak, "achieved_flops": achieved}))
        if result["isa_in_use"] != result["cpu_isa"] and not any("holds the CPU" in note for note in row.notes):
            row.notes.append(f"ONEDNN_MAX_CPU_ISA holds the CPU ({result['cpu_isa']}) to {result['isa_in_use']}: "
                             "the peak is that of the extension in use")
    row.notes.append("ratio = achieved / peak, epoch by epoch; achieved = bare model.fit images/s (batch of "
                     "params.yaml, 32x32x1, first epoch excluded) x 3 forward FLOPs per image (TensorFlow's "
                     "profiler on the inference graph); row 2 gives the pipeline's ratio to this bare model.fit")
    return row


def forward_flops(model) -> int:
    """Float operations of one image through ``model`` (inference), by TensorFlow's profiler."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    shape = [1, *model.input_shape[1:]]
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(tf.TensorSpec(shape, tf.float32))
    frozen = convert_variables_to_constants_v2(concrete)
    options = tf.compat.v1.profiler.ProfileOptionBuilder(
        tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()).with_empty_output().build()
    return int(tf.compat.v1.profiler.profile(graph=frozen.graph, options=options).total_float_ops)


def worker(spec: dict) -> dict:
    """One model in a fresh process: resolve the auto settings, count FLOPs, time ``model.fit``."""
    import os

    import numpy as np

    from bench.tfwork import EpochTimer, build_model, set_policy, steady
    from pipeline.cpu import cpuinfo_field
    from pipeline.devices import cpu_math, resolve_jit_compile

    policy = set_policy(spec)
    jit = resolve_jit_compile("auto", spec["model"])
    model = build_model({**spec, "jit": jit}, CLASSES)
    flops = forward_flops(model)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(spec["count"], spec["image_size"], spec["image_size"], spec["channels"]))
    y = np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, size=spec["count"])]
    timer = EpochTimer()
    model.fit(x.astype(np.float32), y, batch_size=spec["batch_size"], epochs=spec["epochs"], shuffle=True,
              verbose=0, callbacks=[timer])
    math = cpu_math()
    return {"policy": policy, "jit_compile": jit, "forward_flops": flops, "epoch_seconds": timer.seconds,
            "steady_images_per_s": steady(timer.seconds, spec["count"]), "cores": os.cpu_count() or 1,
            "clock_hz": float(cpuinfo_field("cpu MHz") or 0) * 1e6, "cpu_isa": math.cpu_isa,
            "isa_in_use": math.isa_in_use, "onednn": math.onednn}


if __name__ == "__main__":
    worker_main(worker)
