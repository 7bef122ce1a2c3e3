"""Numerics on a GPU machine that has no TensorFlow: ``python -m bench.gpu_numerics --backend jax``.

The numerics row (``bench/numerics.py``) runs the pipeline's own TensorFlow training. Some GPU
machines (the ones this project was lent to measure on) carry PyTorch and JAX but no TensorFlow,
and cannot fetch it. This probe builds the same two models with the same builders
(``pipeline.models``, which need only Keras) on another Keras 3 backend, so that the GPU dtype
policies can still be compared on the real architectures:

* speed: images per second of ``model.fit`` on in-memory uint8 images at the photo settings the
  README recommends (128x128x3, batch 64), epochs after the first (tracing, compilation) only;
* accuracy: the numerics row's fixed small task (sklearn digits at 32x32x1, stratified 80/20
  split, seed 0), so float32, ``mixed_bfloat16`` and ``mixed_float16`` can be compared.

Keras (and the timer in ``bench.tfwork``) is imported only after the backend is chosen.
The backend matters: JAX always compiles with XLA, the torch backend runs op by op (like
TensorFlow with ``jit_compile: false``). Results are printed as one JSON object per line and, with
``--out``, appended to a file. Nothing here runs in ``make bench``; it needs only Keras, NumPy,
scikit-learn and Pillow besides the backend.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
MODELS = ("custom", "resnet50")
SPEED_SHAPE = (128, 128, 3)
SPEED_BATCH = 64
ACCURACY_EPOCHS = {"custom": 6, "resnet50": 4}
MODEL_SIZES = {"custom": {"blocks": [64, 128], "dense_units": [128], "dropout": 0.3},
               "resnet50": {"dense_units": [], "dropout": 0.3}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_numerics", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("jax", "torch", "tensorflow"), required=True)
    parser.add_argument("--speed-images", type=int, default=2048, help="synthetic images per speed epoch")
    parser.add_argument("--speed-epochs", type=int, default=3, help="speed epochs (the first is the warm-up)")
    parser.add_argument("--accuracy-count", type=int, default=None, help="digits used (default: all 1,797)")
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="seconds after which no new measurement starts")
    parser.add_argument("--jit", action="store_true", help="compile with jit_compile=True (XLA on JAX)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes (a check of this script)")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per measurement here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    import keras

    started = time.perf_counter()
    context = {"backend": args.backend, "jit_compile": args.jit, "keras": keras.__version__,
               "machine": _machine(args.backend)}
    _emit({"kind": "context", **context}, args.out)
    sizes = {m: dict(s) for m, s in MODEL_SIZES.items()}
    if args.tiny:
        sizes["custom"].update(blocks=[8], dense_units=[16])
    digits = _digits(args.accuracy_count)
    plan = [("speed", m, p) for m in MODELS for p in POLICIES] + [("accuracy", m, p) for m in MODELS for p in POLICIES]
    if args.tiny:
        plan = [step for step in plan if step[1] == "custom"]
    for what, model_name, policy in plan:
        if time.perf_counter() - started > args.deadline:
            _emit({"kind": what, "model": model_name, "policy": policy, "skipped": "deadline"}, args.out)
            continue
        try:
            if what == "speed":
                result = _speed(model_name, policy, sizes[model_name], args)
            else:
                result = _accuracy(model_name, policy, sizes[model_name], digits, args)
        except Exception as error:  # noqa: BLE001 - one failed configuration must not cost the rest
            result = {"error": f"{type(error).__name__}: {str(error).strip()[:300]}"}
        _emit({"kind": what, "model": model_name, "policy": policy, "backend": args.backend,
               "jit_compile": args.jit, **result}, args.out)
    return 0


def _build(model_name: str, policy: str, size: dict, shape: tuple[int, int, int], num_classes: int, jit: bool):
    import keras

    from pipeline.models import build_custom_cnn, build_resnet50, compile_model

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(42)
    if model_name == "custom":
        model = build_custom_cnn(shape, num_classes, size["blocks"], size["dense_units"], size["dropout"])
    else:
        model, _ = build_resnet50(shape, num_classes, None, size["dense_units"], size["dropout"])
    compile_model(model, "adam", 0.001, "crossentropy", num_classes, jit_compile=jit)
    return model


def _speed(model_name: str, policy: str, size: dict, args: argparse.Namespace) -> dict:
    import numpy as np

    from bench.common import stats
    from bench.tfwork import EpochTimer, steady

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(args.speed_images, *SPEED_SHAPE), dtype=np.uint8).astype("float32")
    y = rng.integers(0, 2, size=(args.speed_images, 1)).astype("float32")
    model = _build(model_name, policy, size, SPEED_SHAPE, 2, args.jit)
    timer = EpochTimer()
    model.fit(x, y, batch_size=SPEED_BATCH, epochs=args.speed_epochs, verbose=0, callbacks=[timer])
    speeds = steady(timer.seconds, args.speed_images)
    return {"shape": list(SPEED_SHAPE), "batch_size": SPEED_BATCH, "epoch_seconds": timer.seconds,
            "steady_images_per_s": speeds, "median_images_per_s": stats(speeds)["median"]}


def _accuracy(model_name: str, policy: str, size: dict, digits, args: argparse.Namespace) -> dict:
    import numpy as np

    from bench.tfwork import EpochTimer

    x_train, x_test, y_train, y_test = digits
    model = _build(model_name, policy, size, x_train.shape[1:], 10, args.jit)
    timer = EpochTimer()
    model.fit(x_train, y_train, batch_size=32, epochs=ACCURACY_EPOCHS[model_name] if not args.tiny else 2,
              shuffle=True, verbose=0, callbacks=[timer])
    predicted = model.predict(x_test, batch_size=256, verbose=0)
    accuracy = float(np.mean(predicted.argmax(axis=1) == y_test.argmax(axis=1)))
    return {"train_images": len(x_train), "test_images": len(x_test), "epoch_seconds": timer.seconds,
            "test_accuracy": accuracy}


def _digits(count: int | None):
    """The numerics row's task: digits scaled to 0-255, resized to 32x32 (bilinear), 80/20 split."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images, labels = data.images, data.target
    if count:
        images, labels = images[:count], labels[:count]
    pixels = np.stack([
        np.asarray(Image.fromarray((image * (255.0 / 16.0)).astype(np.uint8)).resize((32, 32), Image.BILINEAR))
        for image in images]).astype("float32")[..., None]
    targets = np.eye(10, dtype="float32")[labels]
    return train_test_split(pixels, targets, test_size=0.2, random_state=0, stratify=labels)


def _machine(backend: str) -> dict:
    info = {"python": platform.python_version(), "cpu_cores": os.cpu_count()}
    try:
        if backend == "jax":
            import jax

            info.update(jax=jax.__version__, devices=[str(d) for d in jax.devices()])
        elif backend == "torch":
            import torch

            info.update(torch=torch.__version__, cuda=torch.cuda.is_available(),
                        devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
        else:
            import tensorflow as tf

            info.update(tensorflow=tf.__version__, devices=[d.name for d in tf.config.list_logical_devices()])
    except Exception as error:  # noqa: BLE001 - the context line must not stop the probe
        info["device_error"] = str(error)[:200]
    return info


def _emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with out.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
