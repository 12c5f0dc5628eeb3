"""Does the scoring engine keep a device busy? The model stage is replaced by a simulated device.

The device costs a fixed X ms per image (a sleep, in an actor holding the one `sim_device`
resource), so the best possible rate is 1/X. In the same run on the same images:

  old design: one task per shard on the device, doing read, decode, model, mask encode and write
              one after another (what the pipeline did before Ray Data);
  new design: run_score's stream: decode tasks on the CPUs -> the device actor -> output tasks.

Prints images/s and the fraction of 1/X each reaches end to end (start-up included), and how busy
the device was from its first to its last batch; the headline (new design) is the last line.

    python benchmarks/pipeline_device_bound.py [--images 4000] [--device-ms 20] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import ray

from spade_batch.config import Settings
from spade_batch.engine.cpu_stages import object_column, passed_on, worker_columns
from spade_batch.engine.runtime import ModelStage, init_ray
from spade_batch.engine.score import run_score
from spade_batch.formats import storage
from spade_batch.formats.card import Thresholds
from spade_batch.formats.datasets import make_demo_data
from spade_batch.formats.images import Preprocessing, decode_image, resize_for_model
from spade_batch.formats.manifest import build_manifest
from spade_batch.method.detector import fit
from spade_batch.method.masks import mask_from_map, png_bytes

DEVICE = "sim_device"


class SimulatedDeviceStage:
    """The model stage's contract (columns in, columns out) at a fixed cost per image."""

    def __init__(self, model_uri: str, settings: Settings):
        self.seconds_per_image = float(os.environ["SIM_DEVICE_SECONDS"])
        self.log = os.environ["SIM_DEVICE_LOG"]
        self.size = settings.image_size
        self.k = settings.k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["id"])
        start = time.time()
        time.sleep(self.seconds_per_image * count)
        with open(self.log, "a") as log:
            log.write(f"{start} {time.time()}\n")
        kept = passed_on(batch)
        maps = np.random.default_rng(0).random((count, self.size, self.size), dtype=np.float32)
        return {**kept, "image_score": np.ones(count, np.float32), "neighbour_ids": object_column([["n"] * self.k] * count),
                "map": maps, **worker_columns(count, "sim", "sim", 0, 0)}


@ray.remote(num_cpus=1, resources={DEVICE: 1})
def old_design_shard(uris: list[str], out: str, seconds_per_image: float, size: int) -> int:
    """The old pipeline's shard task: everything for one image after the other, holding the device."""
    spec = Preprocessing(size=size)
    rng = np.random.default_rng(0)
    for index, uri in enumerate(uris):
        image = decode_image(storage.read_bytes(uri), uri)
        resize_for_model(image, spec)
        time.sleep(seconds_per_image)
        anomaly_map = rng.random((size, size), dtype=np.float32)
        mask = mask_from_map(anomaly_map, *image.shape[:2], Thresholds(pixel=0.5))
        storage.write_bytes(storage.join(out, f"{index}-{os.path.basename(uri)}"), png_bytes(mask))
    return len(uris)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000, help="archive images (a night's archive: start-up is a fixed cost)")
    parser.add_argument("--device-ms", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=256, help="side of the archive images, pixels")
    parser.add_argument("--shard-size", type=int, default=Settings.shard_size, help="images per decode task (default: the product's)")
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size, help="images per device call (default: the product's)")
    args = parser.parse_args()
    seconds = args.device_ms / 1000
    work = tempfile.mkdtemp(prefix="spade-device-bound-")
    device_log = os.path.join(work, "device.log")
    per_label = max(1, args.images // 4)
    root = make_demo_data(work, n_train=6, n_test_good=per_label, n_test_per_defect=per_label,
                          min_size=args.size, max_size=args.size)
    settings = Settings(backbone="resnet18", weights="random", image_size=64, k=3, calibration_fraction=0.0,
                        device="cpu", batch_size=args.batch_size, shard_size=args.shard_size)
    manifest = build_manifest(os.path.join(root, "test"))
    train = build_manifest(os.path.join(root, "train"))
    model_uri = os.path.join(work, "model")
    fit([decode_image(storage.read_bytes(u), u) for u in train.uris], settings).save(model_uri)
    print(f"config: {len(manifest)} images of {args.size} px, simulated device {args.device_ms} ms/image "
          f"(best {1 / seconds:.1f} img/s), {os.cpu_count()} CPUs, shard {args.shard_size}, device batch {args.batch_size}")

    ray.init(resources={DEVICE: 1}, include_dashboard=False, runtime_env={"env_vars": {"SIM_DEVICE_SECONDS": str(seconds), "SIM_DEVICE_LOG": device_log}})
    init_ray()
    ray.get(old_design_shard.remote([manifest.uris[0]], os.path.join(work, "warm"), 0.0, 64))  # worker start-up untimed
    start = time.perf_counter()
    shards = [list(manifest.uris[i : i + args.shard_size]) for i in range(0, len(manifest), args.shard_size)]
    done = sum(ray.get([old_design_shard.remote(s, os.path.join(work, "old"), seconds, 64) for s in shards]))
    old_rate = done / (time.perf_counter() - start)

    actors = ModelStage(1, {"num_cpus": 0, "resources": {DEVICE: 1}})
    start, wall_start = time.perf_counter(), time.time()
    summary = run_score(model_uri, os.path.join(root, "test"), os.path.join(work, "new"), settings,
                        stage=SimulatedDeviceStage, actors=actors)
    new_rate = summary.scored / (time.perf_counter() - start)
    wall_end = time.time()
    print(f"old design (sequential shard task on the device): {old_rate:7.2f} img/s = {old_rate * seconds:.2f} of 1/X")
    print(f"new design (Ray Data stream, device actor):         {new_rate:7.2f} img/s = {new_rate * seconds:.2f} of 1/X "
          f"(includes actor start-up; {summary.scored} scored)")
    spans = np.loadtxt(device_log, ndmin=2)
    busy = float((spans[:, 1] - spans[:, 0]).sum()) / float(spans[:, 1].max() - spans[:, 0].min())
    print(f"new / old: {new_rate / old_rate:.2f}")
    print(f"new design: first device batch {spans[:, 0].min() - wall_start:.1f} s after the start, "
          f"last one ended {wall_end - spans[:, 1].max():.1f} s before the end")
    print(f"new design, device busy from its first to its last batch (start-up excluded): {busy:.2f}")
    print(f"device utilisation, new design: {new_rate * seconds:.2f} of 1/X end to end, {busy:.2f} once running, at X = {args.device_ms} ms")


if __name__ == "__main__":
    main()
