"""The tiny model the tests fit: resnet18 with random weights (no download) at 64 px, K = 3, on the CPU, in batches
of 4. A test states only what it changes: SETTINGS.replace(...), and flags(settings) for the command line."""

from __future__ import annotations

from spade_batch.config import Settings

SETTINGS = Settings(backbone="resnet18", weights="random", k=3, image_size=64, batch_size=4, shard_size=4, device="cpu")


def flags(settings: Settings = SETTINGS) -> list[str]:
    """The command-line flags that give settings: one `--key=value` per setting that is not the default."""
    default = Settings().to_dict()
    return [f"--{key.replace('_', '-')}={value}" for key, value in settings.to_dict().items()
            if value != default[key] and key != "storage_options"]
