"""The benchmark suite: ``python -m bench`` (``make bench``) measures its rows, each a ratio
against its own reference measured in the same run on the same data, prints one table and writes
the same figures as JSON.

Rows (``--rows`` takes these keys):

- ``ingest``: the real ``python -m pipeline.ingest`` on generated photo-sized JPEGs, against a
  plain Pillow decode + sha256 loop on every core; peak memory of the whole process tree.
- ``input``: ``pipeline.dataset.training_dataset`` feeding ``model.fit``, against ``model.fit`` on
  the same images already in memory as NumPy arrays, for both models.
- ``numerics``: float32 against ``mixed_bfloat16`` and XLA (``jit_compile``) on and off, per model:
  speed and the accuracy reached on a fixed small task.
- ``orchestration``: a no-op ``dvc repro`` against ``dvc status``; a gate-threshold change reruns
  the gate alone, without TensorFlow.
- ``e2e``: ``dvc repro`` on the default data (sklearn digits) in a fresh project copy.
- ``photos``: the same on real cat and dog photos, when ``/work/shared/data/catsdogs-small`` exists.
- ``sweep``: the same queued DVC experiments run by ``dvc queue start -j 1``, ``-j 2`` and ``-j 3``:
  experiments per minute and the speedup against one worker.
- ``utilisation``: each model's training step in FLOP/s against the CPU's peak for the vector
  extension (and precision) in use.
- ``loop``: the multi-worker training loop (``pipeline.training_loop``) run in one process, against
  ``model.fit`` on the same model and batches: whether one process could train through the loop too.

Sizes: the default (full) sizes are for a quiet machine; ``--quick`` uses small sizes for
development; ``--tiny`` is for the smoke test (seconds per row, the long rows skipped).
"""
