"""Row 12, training loop: the multi-worker custom step (``pipeline.training_loop.train_loop``) run in one
process against ``model.fit``, on the same model, batches and machine.

It decides whether one process should train through the loop as well (issue 29: one loop for all if
it keeps 0.95x of ``fit``'s images per second); below that, one process keeps ``model.fit`` and
``tests/test_multi_worker.py`` shows that the two give the same weights on the same batches.

Both sides: the stage's model (``bench.tfwork.build_model``: sizes, optimizer, precision and
``jit_compile`` from params.yaml, resolved as the stage resolves them; the loop runs without XLA as it
does on several workers), the pipeline's ``training_dataset`` with the last, smaller batch left out
(the loop's fixed steps), a validation pass every epoch, each side in its own process, the order of
the two alternating between repeats. The figure is images per second of the training set per epoch
(validation included on both sides), over the epochs after the first (tracing), paired epoch by epoch.
"""

from __future__ import annotations

from bench.common import Line, RowResult, fmt_stats, paired_ratios, run_worker, stats, worker_main
from bench.training_input import data_folder, model_spec

TARGET_RATIO = 0.95

# (data set, images (None: all), epochs including the warm-up epoch, repeats of the pair, model overrides).
VARIANTS = {
    "full": [("digits", None, 6, 2, {})],
    "quick": [("digits", 600, 4, 2, {})],
    "tiny": [("digits", 96, 3, 1, {"custom": {"blocks": [8], "dense_units": [16]}})],
}


def run(mode: str) -> RowResult:
    row = RowResult("loop", "multi-worker training loop in one process vs model.fit")
    for data, count, epochs, repeats, overrides in VARIANTS[mode]:
        folder = data_folder(data, count)
        spec = {**model_spec("custom", overrides), "folder": str(folder), "count": count, "epochs": epochs}
        results: dict[str, list[dict]] = {"loop": [], "fit": []}
        for repeat in range(repeats):
            # Alternate which side runs first, so a drift in the machine's load favours neither.
            for side in ("fit", "loop") if repeat % 2 == 0 else ("loop", "fit"):
                results[side].append(run_worker("bench.training_loop",
                                                {**spec, "side": side, "label": f"custom {data} {side}"}))
        loop = [value for result in results["loop"] for value in result["steady_images_per_s"]]
        fit = [value for result in results["fit"] for value in result["steady_images_per_s"]]
        ratio = paired_ratios(loop, fit)
        first = results["fit"][0]
        case = (f"custom, {data} {first['images']} imgs {spec['image_size']}x{spec['image_size']}x"
                f"{spec['channels']}, {first['policy']}, fit XLA {'on' if first['jit_compile'] else 'off'}")
        row.lines.append(Line(f"{case}: steady img/s", fmt_stats(stats(loop), "img/s loop"),
                              fmt_stats(stats(fit), "img/s fit"), ratio, f">= {TARGET_RATIO}",
                              ratio["median"] >= TARGET_RATIO if ratio else None,
                              {"spec": spec, "loop": results["loop"], "fit": results["fit"]}))
    row.notes.append("steady = epochs 2..N of each process, validation pass included on both sides, ratio "
                     "epoch by epoch; each side in its own process, order alternating between repeats; "
                     "below the target, one process keeps model.fit (pipeline.training.fit)")
    return row


def worker(spec: dict) -> dict:
    """One side: build, train ``epochs`` epochs with ``fit`` or the loop, time every epoch."""
    import time
    from pathlib import Path

    import keras

    from bench.synth import labelled_files
    from bench.tfwork import build_model, set_policy, steady
    from pipeline.dataset import training_dataset
    from pipeline.training_loop import train_loop

    class EpochEnds(keras.callbacks.Callback):
        """Seconds between epoch ends (the loop calls on_epoch_end only), from the start."""

        def __init__(self) -> None:
            super().__init__()
            self.last = time.perf_counter()
            self.seconds: list[float] = []

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

    policy = set_policy(spec)
    paths, labels, classes = labelled_files(Path(spec["folder"]), spec["count"], seed=spec["seed"])
    keras.utils.set_random_seed(spec["seed"])
    held_out = max(1, len(paths) // 10)
    train_paths, train_labels = paths[held_out:], labels[held_out:]
    size, channels, batch = spec["image_size"], spec["channels"], spec["batch_size"]
    common = {"image_size": size, "channels": channels, "batch_size": batch}
    train = training_dataset(train_paths, train_labels, len(classes), shuffle_seed=spec["seed"],
                             drop_remainder=True, **common)
    validation = training_dataset(paths[:held_out], labels[:held_out], len(classes), shuffle_seed=None, **common)
    steps = len(train_paths) // batch
    model = build_model(spec if spec["side"] == "fit" else {**spec, "jit": False}, len(classes))
    timer = EpochEnds()
    if spec["side"] == "fit":
        # The stage's own early stopping (best weights kept), as the loop keeps them too.
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=spec["epochs"], restore_best_weights=True)
        model.fit(train, validation_data=validation, epochs=spec["epochs"], verbose=0, shuffle=False,
                  callbacks=[stopper, timer])
    else:
        train_loop(model, train, validation, epochs=spec["epochs"], steps_per_epoch=steps,
                   global_batch_size=batch, patience=spec["epochs"], num_classes=len(classes), callbacks=[timer])
    images = steps * batch
    return {"images": images, "epoch_seconds": timer.seconds, "steady_images_per_s": steady(timer.seconds, images),
            "policy": policy, "jit_compile": bool(model.jit_compile) if spec["side"] == "fit" else False}


if __name__ == "__main__":
    worker_main(worker)
