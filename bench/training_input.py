"""Row 2, training input: the pipeline's own input pipeline feeding ``model.fit`` against bare
``model.fit`` on the same images already in memory.

Measured: ``pipeline.dataset.training_dataset`` over the files on disk (decode with the pipeline's
rules, resize, cache, shuffle with the seed, batch, prefetch), exactly as ``make_fit_data`` builds
it for a training stage, passed to ``model.fit``.

Reference: ``model.fit(x, y, batch_size, shuffle=True)`` with the same images decoded beforehand
(``pipeline.dataset.load_images``, the same pixels) as a uint8 NumPy array.

Both on the same model (``pipeline.models.build_custom_cnn`` / ``build_resnet50`` with the sizes of
params.yaml, ``compile_model``), each configuration in its own process. Epoch 1 is the warm-up
(tracing, and for the pipeline the decoding that fills the cache) and is reported on its own; the
figure is images per second over the later, steady-state epochs, each epoch one repeat, the ratio
taken epoch by epoch.
"""

from __future__ import annotations

import copy

import yaml

from bench.common import (
    REPO_ROOT,
    Line,
    RowResult,
    fmt_number,
    fmt_stats,
    paired_ratios,
    run_worker,
    stats,
    worker_main,
)
from pipeline import model_table

TARGET_RATIO = 0.95

# (data set, images (None: all), epochs including the warm-up epoch, overrides of the models' sizes, models).
# ResNet50 alone takes ~30 s to trace on two cores: the smoke test's tiny sizes leave it out.
VARIANTS = {
    # Many steady epochs: on the reference VM one epoch's speed can differ 2x from the next (see the
    # README), so a few epochs per side cannot tell the feeds apart.
    "full": [("digits", None, 10, {}, ("custom",)),
             ("digits", None, 6, {}, ("resnet50",)),
             ("jpeg64", 600, 10, {"image_size": 64, "channels": 3}, ("custom",))],
    "quick": [("digits", 384, 4, {}, model_table.MODEL_NAMES)],
    "tiny": [("digits", 96, 3, {"custom": {"blocks": [8], "dense_units": [16]}}, ("custom",))],
}


def model_spec(model: str, overrides: dict) -> dict:
    """Sizes, optimizer and loss of one trainer, from the project's params.yaml."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    section = raw[model_table.model_spec(model).params_section]
    spec = {
        "model": model,
        "image_size": overrides.get("image_size", raw["base"]["image_size"]),
        "channels": overrides.get("channels", raw["base"]["channels"]),
        "seed": raw["base"]["seed"],
        "dense_units": list(section["dense_units"]),
        "dropout": section["dropout"],
        "batch_size": section["batch_size"],
        "learning_rate": section["learning_rate"],
        "optimizer": section["optimizer"],
        "loss": section["loss"],
        "precision": section.get("precision", "float32"),     # as the stage resolves it
        "jit": section.get("jit_compile", False),                 # true | false | auto, as the stage resolves it
    }
    if model == "custom":
        spec["blocks"] = list(section["blocks"])
    spec.update(copy.deepcopy(overrides.get(model, {})))
    return spec


def data_folder(name: str, count: int | None):
    from bench.synth import digits_folder, jpeg_folder

    return digits_folder() if name == "digits" else jpeg_folder(max(count or 0, 500))


def run(mode: str) -> RowResult:
    row = RowResult("input", "pipeline input (training_dataset) vs model.fit on in-memory NumPy arrays")
    for data, count, epochs, overrides, models in VARIANTS[mode]:
        folder = data_folder(data, count)
        for model in models:
            spec = {**model_spec(model, overrides), "folder": str(folder), "count": count, "epochs": epochs}
            results = {}
            # Alternate which runs first, so a drift in the machine's load does not favour one side.
            order = ("numpy", "pipeline") if model == "custom" else ("pipeline", "numpy")
            for feed in order:
                results[feed] = run_worker("bench.training_input",
                                           {**spec, "feed": feed, "label": f"{model} {data} {feed}"})
            pipeline, numpy = results["pipeline"], results["numpy"]
            images = pipeline["images"]
            ratio = paired_ratios(pipeline["steady_images_per_s"], numpy["steady_images_per_s"])
            size = f"{spec['image_size']}x{spec['image_size']}x{spec['channels']}"
            case = f"{model}, {data} {images} imgs {size}, {pipeline['policy']}"
            row.lines.append(Line(
                f"{case}: steady img/s", fmt_stats(stats(pipeline["steady_images_per_s"]), "img/s"),
                fmt_stats(stats(numpy["steady_images_per_s"]), "img/s numpy"), ratio, f">= {TARGET_RATIO}",
                ratio["median"] >= TARGET_RATIO if ratio else None,
                {"spec": spec, "pipeline": pipeline, "numpy": numpy}))
            delivered = stats(pipeline["input_only_images_per_s"])
            headroom = delivered["median"] / stats(numpy["steady_images_per_s"])["max"]
            row.lines.append(Line(
                f"{case}: input alone", fmt_stats(delivered, "img/s"), "the fastest numpy epoch",
                {"median": headroom, "min": headroom, "max": headroom, "n": 1, "values": [headroom]}, "-", None,
                {"note": "the cached training_dataset iterated with no model: how much more the input can "
                         "deliver than the model consumes"}))
            row.lines.append(Line(
                f"{case}: first epoch", f"{fmt_number(pipeline['epoch_seconds'][0])} s (decode + trace)",
                f"{fmt_number(numpy['epoch_seconds'][0])} s trace + {fmt_number(numpy['load_seconds'])} s "
                "load_images", None, "-", None))
    row.notes.append("steady = epochs 2..N (one repeat each, ratio epoch by epoch); input alone = the cached "
                     "dataset iterated 3 times without a model, over the fastest numpy epoch; batch sizes, optimizer, "
                     "model sizes, precision and jit_compile from params.yaml, precision resolved as the stage "
                     "resolves it; digits = the 1,797 sklearn digits as the 8x8 PNGs ingest "
                     "writes, resized to base.image_size; jpeg64 = generated 350-500 px JPEGs at 64x64x3 (full "
                     "sizes, custom CNN only: decode-heavy first epoch); each configuration in its own process")
    if mode == "tiny":
        row.notes.append("--tiny: custom CNN only (ResNet50 takes ~30 s to trace)")
    return row


def worker(spec: dict) -> dict:
    """One configuration: build, fit ``epochs`` epochs, time every epoch."""
    import time
    from pathlib import Path

    import keras

    from bench.synth import labelled_files
    from bench.tfwork import EpochTimer, build_model, dtype_counts, set_policy, steady
    from pipeline.dataset import encode_targets, load_images, training_dataset

    policy = set_policy(spec)
    paths, labels, classes = labelled_files(Path(spec["folder"]), spec["count"], seed=spec["seed"])
    keras.utils.set_random_seed(spec["seed"])
    load_seconds = None
    size, channels, batch = spec["image_size"], spec["channels"], spec["batch_size"]
    if spec["feed"] == "numpy":
        started = time.perf_counter()
        x = load_images(paths, size, channels)
        y = encode_targets(labels, len(classes))
        load_seconds = time.perf_counter() - started
    model = build_model(spec, len(classes))
    timer = EpochTimer()
    if spec["feed"] == "pipeline":
        dataset = training_dataset(paths, labels, len(classes), image_size=size, channels=channels,
                                   batch_size=batch, shuffle_seed=spec["seed"])
        history = model.fit(dataset, epochs=spec["epochs"], verbose=0, shuffle=False, callbacks=[timer])
        input_only = []
        for _ in range(3):      # the cache is full: what the input alone delivers, with no model to feed
            started = time.perf_counter()
            for _batch in dataset:
                pass
            input_only.append(len(paths) / (time.perf_counter() - started))
    else:
        history = model.fit(x, y, batch_size=batch, epochs=spec["epochs"], shuffle=True, verbose=0,
                            callbacks=[timer])
    return {"images": len(paths), "classes": len(classes), "epoch_seconds": timer.seconds,
            "steady_images_per_s": steady(timer.seconds, len(paths)), "load_seconds": load_seconds,
            "final_accuracy": float(history.history["accuracy"][-1]), "policy": policy,
            "jit_compile": bool(model.jit_compile), "compute_dtypes": dtype_counts(model),
            "input_only_images_per_s": input_only if spec["feed"] == "pipeline" else None}


if __name__ == "__main__":
    worker_main(worker)
