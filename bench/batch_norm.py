"""Row 13, batch_norm: a training step with the fused batch normalization the pipeline trains with
(``pipeline.fused_batch_norm``) against Keras's own BatchNormalization, on the same network, weights,
batch and process.

Two networks: the photo preset's custom CNN (its blocks, normalization and pooling read from
``presets/photos.yaml``) in each precision a CPU trains it in (``mixed_bfloat16``
where ``precision: auto`` picks it, float32 everywhere, as on a CPU without AVX-512 BF16), and
ResNet50 from scratch in float32 (what ``auto`` picks for it on a CPU). Each pair runs in its own
process: the fused network is built by the pipeline's builder, Keras's from the same configuration
with the layer made Keras's own (``as_plain_config``) and the same weights; both compiled alike,
each step one ``train_on_batch`` of the same random batch, the two sides alternating in rounds after
a warm-up step each (tracing). The figure is images per second, median over the rounds' steps.
"""

from __future__ import annotations

from bench.common import (Line, RowResult, fmt_stats, paired_ratios, random_training_batch, run_worker, stats,
                          training_steps_in_rounds, worker_main)

# (image size, batch, steps per round, rounds) per mode.
SIZES = {"full": (64, 32, 10, 4), "quick": (64, 32, 4, 2), "tiny": (32, 4, 1, 1)}   # ResNet50 takes 32x32 and up
# (network, policy): the custom CNN in both precisions, ResNet50 in float32.
CASES = [("custom", "mixed_bfloat16"), ("custom", "float32"), ("resnet50", "float32")]


def run(mode: str) -> RowResult:
    row = RowResult("batch_norm", "fused batch normalization vs Keras's, one training step")
    size, batch, steps, rounds = SIZES[mode]
    for network, policy in CASES:
        result = run_worker("bench.batch_norm", {"network": network, "policy": policy, "size": size, "batch": batch,
                                                  "steps": steps, "rounds": rounds})
        fused, plain = result["fused_images_per_s"], result["keras_images_per_s"]
        ratio = paired_ratios(fused, plain)
        row.lines.append(Line(f"{network} {size}x{size}x3, batch {batch}, {policy}: img/s",
                              fmt_stats(stats(fused), "img/s fused"), fmt_stats(stats(plain), "img/s Keras"),
                              ratio, "reported", None, result))
    row.notes.append("one train_on_batch per step, the same random batch and weights on both sides, sides "
                     "alternating in rounds after a warm-up step each; ratio round by round (fused / Keras)")
    return row


def worker(spec: dict) -> dict:
    import keras

    from bench.photo_recipe import preset_cnn
    from pipeline.fused_batch_norm import as_plain_config, uses_fused
    from pipeline.models import build_resnet50, compile_model

    keras.mixed_precision.set_global_policy(spec["policy"])
    keras.utils.set_random_seed(0)
    shape = (spec["size"], spec["size"], 3)
    if spec["network"] == "custom":   # the photo preset's network, as presets/photos.yaml says it today
        fused = preset_cnn(shape)
    else:
        fused, _ = build_resnet50(shape, 2, None, dense_units=[], dropout=0.0)
    plain = keras.Model.from_config(as_plain_config(fused.get_config()))
    plain.set_weights(fused.get_weights())
    assert uses_fused(fused) and not uses_fused(plain)
    images, labels = random_training_batch(spec["batch"], shape)
    sides = {"fused": fused, "keras": plain}
    for model in sides.values():
        compile_model(model, "adam", 0.001, "crossentropy", 2)
    per_round = training_steps_in_rounds(sides, images, labels, spec["steps"], spec["rounds"])
    return {"fused_images_per_s": per_round["fused"], "keras_images_per_s": per_round["keras"], "spec": spec}


if __name__ == "__main__":
    worker_main(worker)
