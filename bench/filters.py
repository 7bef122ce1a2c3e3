"""Row 14, filters: a training step of the photo preset's custom CNN with its first block's filters a
multiple of 16 or not, in each precision a CPU trains it in.

oneDNN's bfloat16 convolutions work on channels in groups of 16. Three networks, the same but for
their first block: the preset's 32 filters (the reference), 24 (fewer, and not a multiple of 16) and
48 (more, a multiple of 16); everything else as ``presets/photos.yaml`` says. In ``mixed_bfloat16``
(where ``precision: auto`` picks it: a CPU with AVX-512 BF16 or AMX) and in float32. All three built
in one process per precision, each step one ``train_on_batch`` of the same random batch, the
networks taking turns in rounds after two warm-up steps each (tracing). The figure is images per
second, median over a round's steps; the ratio is the network's against the preset's, round by round.
``pipeline.devices.slow_bfloat16_widths`` names such widths when a training stage starts.
"""

from __future__ import annotations

from bench.common import (Line, RowResult, fmt_stats, machine_info, paired_ratios, random_training_batch,
                          run_worker, stats, training_steps_in_rounds, worker_main)

# (image size, batch, steps per round, rounds) per mode.
SIZES = {"full": (64, 32, 8, 4), "quick": (64, 32, 3, 2), "tiny": (32, 4, 1, 1)}
FIRST_BLOCKS = {"preset": None, "24 filters first": 24, "48 filters first": 48}   # None: the preset's own


def run(mode: str) -> RowResult:
    row = RowResult("filters", "first block's filters a multiple of 16 or not, one training step")
    size, batch, steps, rounds = SIZES[mode]
    policies = ["mixed_bfloat16", "float32"] if machine_info()["bf16_hardware"] else ["float32"]
    if len(policies) == 1:
        row.notes.append("mixed_bfloat16 not measured: this CPU has no bf16 instructions (no AVX-512 BF16, no AMX)")
    for policy in policies:
        result = run_worker("bench.filters", {"policy": policy, "size": size, "batch": batch, "steps": steps,
                                               "rounds": rounds})
        reference = result["images_per_s"]["preset"]
        for name, speeds in result["images_per_s"].items():
            is_reference = name == "preset"
            row.lines.append(Line(f"{policy}, {name} ({result['blocks'][name]}): img/s",
                                  fmt_stats(stats(speeds), "img/s"),
                                  "-" if is_reference else fmt_stats(stats(reference), "img/s preset"),
                                  None if is_reference else paired_ratios(speeds, reference), "reported", None,
                                  {"policy": policy, "blocks": result["blocks"][name], "images_per_s": speeds}))
    row.notes.append(f"the photo preset's custom CNN at {size}x{size}x3, batches of {batch}, with its first block's "
                     "filters changed; ratio = network / preset, round by round (above 1: faster)")
    return row


def worker(spec: dict) -> dict:
    import keras

    from bench.photo_recipe import preset_cnn, preset_train_custom
    from pipeline.models import compile_model

    keras.mixed_precision.set_global_policy(spec["policy"])
    keras.utils.set_random_seed(0)
    shape = (spec["size"], spec["size"], 3)
    images, labels = random_training_batch(spec["batch"], shape)
    preset_blocks = list(preset_train_custom().blocks)
    blocks = {name: preset_blocks if first is None else [first, *preset_blocks[1:]]
              for name, first in FIRST_BLOCKS.items()}
    models = {name: preset_cnn(shape, blocks[name]) for name in blocks}
    for model in models.values():
        compile_model(model, "adam", 0.001, "crossentropy", 2)
    # Two warm-up steps each, the first of which traces.
    per_round = training_steps_in_rounds(models, images, labels, spec["steps"], spec["rounds"], warmup=2)
    return {"images_per_s": per_round, "blocks": {name: str(value) for name, value in blocks.items()}, "spec": spec}

if __name__ == "__main__":
    worker_main(worker)
