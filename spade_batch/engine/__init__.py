"""The Ray engine: lists, extracts and scores images on a cluster, feeding the method's recipe and never re-spelling it.

May import: Ray, spade_batch.method, spade_batch.formats, spade_batch.config; never spade_batch.reports.
This file imports none of its modules: a CPU worker that unpickles a cpu_stages function must not pay for torch.
"""
