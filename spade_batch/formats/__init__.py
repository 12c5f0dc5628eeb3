"""What is stored, and where: storage (fsspec), manifests, feature and score part files, the model artifact,
run and model layouts, locks.

May import: numpy, pyarrow, fsspec, faiss, spade_batch.config; never torch at module level, never Ray,
never spade_batch.method, spade_batch.engine or spade_batch.reports.
"""
