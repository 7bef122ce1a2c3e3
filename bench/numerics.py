"""Row 3, numerics: float32 against Keras mixed precision ``mixed_bfloat16``, and XLA
(``model.compile(jit_compile=True)``) off and on, per model.

Each configuration runs in its own process (the dtype policy is global), on a fixed small task:
the sklearn digits at 32x32 (the pipeline's decode and resize), a stratified 80/20 split with a
fixed seed, the stage's model and compile settings, a fixed number of epochs. Measured: images per
second over the epochs after the first (the warm-up: tracing, XLA compilation), and the accuracy on
the held-out 20 %. Reference: float32 without XLA, the pipeline's setting.

``mixed_bfloat16`` is measured on a GPU or where the CPU has bf16 instructions (AVX-512 BF16 or
AMX); ``mixed_float16`` is a GPU feature and is reported as not measured when there is no GPU.
"""

from __future__ import annotations

from bench.common import Line, RowResult, fmt_stats, machine_info, paired_ratios, run_worker, stats, worker_main
from bench.training_input import model_spec

ACCURACY_TOLERANCE = 0.01        # "within ~1 point" of the float32 reference, or one test image if that is more

# images (None: all 1,797), epochs per model, model size overrides
SIZES = {
    "full": (None, {"custom": 6, "resnet50": 4}, {}),
    "quick": (400, {"custom": 3, "resnet50": 3}, {}),
    "tiny": (160, {"custom": 3}, {"custom": {"blocks": [8], "dense_units": [16]}}),
}
# Training seeds per model: one run's accuracy moves by a few points from seed to seed (custom CNN,
# float32, 6 epochs: 0.953-0.986 over ten seeds in one study), so the
# accuracy compared is the mean over seeds. Three seeds once put mixed_bfloat16 1.7 points below
# float32 by chance; ten put it 0.3 +- 0.5 points above.
SEEDS = {
    "full": {"custom": (42, 43, 44, 45, 46), "resnet50": (42,)},
    "quick": {"custom": (42,), "resnet50": (42,)},
    "tiny": {"custom": (42,)},
}
CONFIGS = [("float32", False), ("float32", True), ("mixed_bfloat16", False), ("mixed_bfloat16", True)]
GPU_CONFIGS = [("mixed_float16", False), ("mixed_float16", True)]


def run(mode: str) -> RowResult:
    from bench.synth import digits_folder

    row = RowResult("numerics", "float32 vs mixed_bfloat16, jit_compile off vs on")
    info = machine_info()
    count, epochs, overrides = SIZES[mode]
    folder = digits_folder()
    if info["gpu"]:      # TensorFlow trains on the GPU: every policy a GPU can run
        configs = CONFIGS + GPU_CONFIGS
    elif info["bf16_hardware"]:
        configs = CONFIGS
    else:
        configs = CONFIGS[:2]
        row.notes.append("mixed_bfloat16 not measured: this CPU has no bf16 instructions (no AVX-512 BF16, no AMX)")
    if mode == "tiny" and ("mixed_bfloat16", True) in configs:     # a smoke run: each kind of setting once
        configs = [config for config in configs if config != ("mixed_bfloat16", True)]
        row.notes.append("--tiny: mixed_bfloat16 with XLA left out (every combination runs at quick and full sizes)")
    for model, model_epochs in epochs.items():
        spec = {**model_spec(model, {**overrides, "image_size": 32, "channels": 1}), "folder": str(folder),
                "count": count, "epochs": model_epochs}
        results = {}
        for policy, jit in configs:
            label = f"{model} {policy} jit={'on' if jit else 'off'}"
            results[(policy, jit)] = _over_seeds([
                run_worker("bench.numerics", {**spec, "seed": seed, "policy": policy, "jit": jit,
                                              "label": f"{label} seed {seed}"})
                for seed in SEEDS[mode][model]])
        reference = results[("float32", False)]
        tolerance = max(ACCURACY_TOLERANCE, 1.0 / reference["test_images"]) + 1e-9
        best = None
        for (policy, jit), result in results.items():
            speed = result["steady_images_per_s"]
            ratio = paired_ratios(speed, reference["steady_images_per_s"])
            close = result["test_accuracy"] >= reference["test_accuracy"] - tolerance
            name = f"{policy} jit={'on' if jit else 'off'}"
            if close and (best is None or stats(speed)["median"] > best[1]):
                best = (name, stats(speed)["median"], ratio["median"] if ratio else 1.0)
            is_reference = (policy, jit) == ("float32", False)
            row.lines.append(Line(
                f"{model} {name}" + (" (reference)" if is_reference else ""),
                f"{fmt_stats(stats(speed), 'img/s')}, acc {result['test_accuracy']:.3f}",
                "-" if is_reference else f"acc {reference['test_accuracy']:.3f}", None if is_reference else ratio,
                "-", None, {"policy": policy, "jit_compile": jit, **result}))
        row.lines.append(Line(f"{model}: fastest, accuracy within {tolerance * 100:.1f} points", best[0], "-",
                              {"median": best[2], "min": best[2], "max": best[2], "n": 1, "values": [best[2]]},
                              "-", None, {"fastest": best[0]}))
        auto = reference.get("auto_policy")
        if auto:
            params_jit = spec.get("jit") is True or (spec.get("jit") == "auto" and reference.get("auto_jit_compile"))
            chosen = f"{auto} jit={'on' if params_jit else 'off'}"
            row.lines.append(Line(f"{model}: params (precision auto)", chosen,
                                  f"fastest: {best[0]}", None, "-", None,
                                  {"auto_policy": auto, "params_jit_compile": params_jit,
                                   "agrees_with_fastest": chosen == best[0]}))
        if not info["gpu"]:
            row.lines.append(Line(f"{model} mixed_float16", "not measured: no GPU", "-", None, "-", None))
    row.notes.append(f"task: sklearn digits at 32x32x1, stratified 80/20 split (seed 0), "
                     f"{', '.join(f'{m} {e} epochs' for m, e in epochs.items())}, first epoch excluded from "
                     "the speed (tracing / XLA compile); ratio = speed / float32 jit=off, epoch by epoch; "
                     "accuracy on the held-out 20 % (mean over training seeds "
                     f"{', '.join(f'{m} {len(s)}' for m, s in SEEDS[mode].items())}); "
                     "'within' = at most 1 point, or one test image when the test set "
                     "is under 100 images, below the float32 reference")
    return row


def _over_seeds(runs: list[dict]) -> dict:
    """One configuration's runs under several seeds as one result: the speeds of every steady
    epoch, the mean accuracy (each seed's kept beside it)."""
    merged = dict(runs[0])
    merged["steady_images_per_s"] = [speed for run in runs for speed in run["steady_images_per_s"]]
    merged["epoch_seconds"] = [run["epoch_seconds"] for run in runs]
    merged["seed_accuracies"] = [run["test_accuracy"] for run in runs]
    merged["test_accuracy"] = sum(merged["seed_accuracies"]) / len(runs)
    return merged


def worker(spec: dict) -> dict:
    """One configuration in a fresh process: set the policy, build, compile, fit, evaluate."""
    from pathlib import Path

    import keras
    import numpy as np
    from sklearn.model_selection import train_test_split

    from bench.synth import labelled_files
    from bench.tfwork import EpochTimer, build_model, dtype_counts, set_policy, steady
    from pipeline.dataset import encode_targets, load_images

    set_policy(spec)
    paths, labels, classes = labelled_files(Path(spec["folder"]), spec["count"], seed=0)
    x = load_images(paths, spec["image_size"], spec["channels"])
    y = encode_targets(labels, len(classes))
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=labels)
    keras.utils.set_random_seed(spec["seed"])
    model = build_model(spec, len(classes))
    timer = EpochTimer()
    model.fit(x_train, y_train, batch_size=spec["batch_size"], epochs=spec["epochs"], shuffle=True, verbose=0,
              callbacks=[timer])
    predicted = model.predict(x_test, batch_size=256, verbose=0)
    truth = y_test.argmax(axis=1) if y_test.shape[1] > 1 else y_test[:, 0].astype(int)
    guess = predicted.argmax(axis=1) if predicted.shape[1] > 1 else (predicted[:, 0] > 0.5).astype(int)
    return {"train_images": len(x_train), "test_images": len(x_test), "epoch_seconds": timer.seconds,
            "steady_images_per_s": steady(timer.seconds, len(x_train)),
            "test_accuracy": float(np.mean(truth == guess)),
            "compute_dtypes": dtype_counts(model), "policy_in_effect": model.dtype_policy.name,
            "jit_compile_in_effect": bool(model.jit_compile), "auto_policy": _auto_policy(spec["model"]),
            "auto_jit_compile": _auto_jit_compile(spec["model"])}


def _auto_policy(model: str) -> str | None:
    """What the stage's ``precision: auto`` picks for this model on this machine (None: no such setting)."""
    try:
        from pipeline.devices import resolve_precision
    except ImportError:
        return None
    return resolve_precision("auto", model)


def _auto_jit_compile(model: str) -> bool:
    """What the stage's ``jit_compile: auto`` picks for this model on this machine (False before it existed)."""
    try:
        from pipeline.devices import resolve_jit_compile
    except ImportError:
        return False
    return resolve_jit_compile("auto", model)


if __name__ == "__main__":
    worker_main(worker)
