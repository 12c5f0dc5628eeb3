"""The method: SPADE's math and the in-process API (backbone, pixel search, scoring rules, calibration, the fit recipe).

May import: numpy, torch, faiss, spade_batch.config and spade_batch.formats (the model artifact it builds);
never Ray, never spade_batch.engine or spade_batch.reports. This file imports nothing, so a CPU worker that
needs only images or masks does not pay for torch.
"""
