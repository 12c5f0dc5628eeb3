"""spade_batch.method.backbone's weights from a file on the S3 test server (the rest is in tests/unit/method/test_backbone.py)."""

from __future__ import annotations

from pathlib import Path

import fsspec
import torch
import torchvision

from spade_batch.method.backbone import load_backbone, state_dict_sha256


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_saved_state_dict_loads_from_local_file_and_s3(tmp_path: Path, s3, s3_bucket: str) -> None:
    torch.manual_seed(3)
    state_dict = torchvision.models.resnet18().state_dict()
    local = tmp_path / "resnet18.pt"
    torch.save(state_dict, local)
    remote = f"{s3_bucket}/weights/resnet18.pt"
    fsspec.filesystem("s3", **s3.storage_options).pipe(remote, local.read_bytes())

    in_memory, memory_id = load_backbone("resnet18", "random", seed=3)
    from_file, file_id = load_backbone("resnet18", str(local))
    from_s3, s3_id = load_backbone("resnet18", remote, storage_options=s3.storage_options)

    assert memory_id == file_id == s3_id == "sha256:" + state_dict_sha256(state_dict)
    images = _images(2, 32, 48)
    want_global, want_layers = in_memory(images)
    for pyramid in (from_file, from_s3):
        got_global, got_layers = pyramid(images)
        assert torch.equal(got_global, want_global)
        assert all(torch.equal(g, w) for g, w in zip(got_layers, want_layers))
