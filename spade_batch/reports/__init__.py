"""What people read: evaluation and its metrics, the run report, drift, `show` summaries, figures and HTML pages.

May import: spade_batch.formats, spade_batch.config, spade_batch.method's torch-free modules (masks, image_threshold, alignment)
and spade_batch.engine only to run a scoring job (evaluate); never Ray directly.
"""
