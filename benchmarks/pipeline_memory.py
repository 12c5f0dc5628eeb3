"""Memory of the Ray pipeline: driver RSS against archive and training-set size, worker RSS against gallery size.

Each measured run is a fresh Python process (this file re-invoked with --child), so no two runs
share a peak; every run starts its own local Ray. Figures:

  score driver: peak RSS of the driver of run_score for a small and a large archive of tiny PNGs
      (the claim: the driver holds only the manifest and counters, so the ratio stays < 1.10);
  fit driver:   peak RSS of the driver of run_fit for a training set and one 10x larger (< 1.10);
  score worker: peak RSS of the model actor (the real ScoreStage, wrapped only to record its
      /proc/self/status after each batch) scoring against a gallery of >= --gallery-gib, written
      directly with GalleryWriter + build_model from random features under the real card of
      resnet18 at --gallery-image-size (< 2 GiB). The gallery files are deleted at the end.

Peak RSS is ru_maxrss (= VmHWM). File-backed pages of the memory-mapped gallery count in RSS
(RssFile) once touched, so the worker's samples show whether RSS grows with the images scored.

    python benchmarks/pipeline_memory.py [--archive-small 1000] [--archive-large 20000] [--train-small 100]
        [--train-large 1000] [--gallery-gib 8] [--gallery-image-size 224] [--gallery-test-images 48]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20
GIB = 2**30


def proc_status() -> dict[str, int]:
    """This process's VmHWM, VmRSS, RssAnon, RssFile, RssShmem in bytes (Linux /proc)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def peak_rss() -> int:
    """ru_maxrss of this process, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_pngs(folder: str, count: int, side: int, seed: int) -> str:
    """count random side x side RGB PNGs under folder (in sub-folders of 1000)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        sub = os.path.join(folder, f"{i // 1000:03d}")
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(os.path.join(sub, f"{i:06d}.png"))
    return folder


# ---------------------------------------------------------------- the measured processes


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured run in this (fresh) process: fit, score, or score with the RSS-recording stage."""
    from spade_batch.config import Settings
    from spade_batch.engine.fit import run_fit
    from spade_batch.engine.runtime import init_ray
    from spade_batch.engine.score import run_score

    settings = Settings(**spec["settings"])
    init_ray(None)
    baseline = proc_status()["VmRSS"]  # imports + Ray joined, before any work
    started = time.perf_counter()
    if spec["kind"] == "fit":
        summary = run_fit(spec["source"], spec["model"], settings)
        images = summary.train_images
        extra = {"gallery_images": summary.gallery_images, "calibration_images": summary.calibration_images}
    else:
        stage = _measured_stage() if spec["kind"] == "score-measured" else None
        summary = run_score(spec["model"], spec["source"], spec["out"], settings, **({"stage": stage} if stage else {}))
        images = summary.images
        extra = {"scored": summary.scored, "failed": summary.failed, "workers": summary.workers}
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": seconds, "images_per_second": images / seconds,
            "baseline_rss": baseline, "peak_rss": peak_rss(), **extra}


def _measured_stage() -> type:
    """ScoreStage, recording the actor's memory after loading and after each batch into <model>/../worker-rss-<pid>.json."""
    from spade_batch.engine.stages import ScoreStage

    class MeasuredScoreStage(ScoreStage):
        def __init__(self, model_uri: str, settings: Any, card: dict[str, Any] | None = None):
            self.record = os.path.join(os.path.dirname(os.path.abspath(model_uri)), f"worker-rss-{os.getpid()}.json")
            self.samples = [{"images": 0, "when": "start", **proc_status()}]
            super().__init__(model_uri, settings, card)
            self.samples.append({"images": 0, "when": "loaded", **proc_status()})
            self.images = 0
            self._save()

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            result = super().__call__(batch)
            self.images += len(batch["id"])
            self.samples.append({"images": self.images, "when": "batch", **proc_status()})
            self._save()
            return result

        def _save(self) -> None:
            with open(self.record + ".tmp", "w") as f:
                json.dump({"gallery_bytes": self.model.gallery_bytes, "peak_rss": peak_rss(), "samples": self.samples}, f)
            os.replace(self.record + ".tmp", self.record)

    return MeasuredScoreStage


def measure(spec: dict[str, Any], log_path: str) -> dict[str, Any]:
    """Run spec in a fresh interpreter; its stderr (Ray, progress) goes to log_path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                              stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{spec['kind']} run failed (exit {done.returncode}); see {log_path}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the big gallery


def write_big_gallery(folder: str, settings: Any, target_bytes: int, chunk: int = 64) -> tuple[int, int]:
    """A model at folder whose pyramid files total >= target_bytes: real resnet18 card, random float16 rows.

    Returns (gallery images, gallery bytes). Memory stays at one chunk of rows plus N x D global features.
    """
    from spade_batch.formats.model import Centre
    from spade_batch.formats.model_build import GalleryWriter, build_model
    from spade_batch.method.extractor import Extractor
    from spade_batch.method.recipe import new_card

    extractor = Extractor(settings)
    shapes = extractor.layer_shapes
    row_bytes = sum(2 * s.height * s.width * s.channels for s in shapes)
    count = -(-target_bytes // row_bytes)
    ids = [f"g{i:07d}.png" for i in range(count)]
    card = new_card(extractor, settings, count, "synthetic", [])
    rng = np.random.default_rng(settings.seed)
    pool = [rng.standard_normal((chunk, s.height * s.width, s.channels), dtype=np.float32).astype(np.float16) for s in shapes]
    writer = GalleryWriter(folder, ids, shapes, extractor.global_dim, Centre.zero(extractor.global_dim, shapes))
    for start in range(0, count, chunk):
        piece = ids[start : start + chunk]
        shift = np.float16(start / count)  # rows differ between chunks; their content does not matter here
        writer.add(piece, rng.standard_normal((len(piece), extractor.global_dim), dtype=np.float32),
                   [bank[: len(piece)] + shift for bank in pool])
    model = build_model(writer, card, settings)
    model.write_card(folder)
    return count, model.gallery_bytes


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--archive-small", type=int, default=1000)
    parser.add_argument("--archive-large", type=int, default=20000)
    parser.add_argument("--train-small", type=int, default=100)
    parser.add_argument("--train-large", type=int, default=1000)
    parser.add_argument("--png-side", type=int, default=16, help="side of the generated PNGs")
    parser.add_argument("--image-size", type=int, default=32, help="working size of the driver runs")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--gallery-gib", type=float, default=8.0, help="gallery size of the worker run, GiB (0 skips it)")
    parser.add_argument("--gallery-image-size", type=int, default=224, help="working size of the worker run's resnet18 card")
    parser.add_argument("--gallery-test-images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temp folder, removed at the end)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    work = args.work or tempfile.mkdtemp(prefix="spade-memory-")
    os.makedirs(work, exist_ok=True)
    base = {"backbone": "resnet18", "weights": "random", "image_size": args.image_size, "k": args.k,
            "batch_size": args.batch_size, "log_level": "WARNING"}
    print(f"config: resnet18 (random) {args.image_size}px K={args.k}, {args.png_side}x{args.png_side} PNGs, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs, scratch {work}", flush=True)
    try:
        fit_ratio = _fit_runs(args, work, base)
        score_ratio = _score_runs(args, work, base)
        worker_mib, gallery_gib = _worker_run(args, work, {**base, "image_size": args.gallery_image_size, "batch_size": 8})
    finally:
        shutil.rmtree(os.path.join(work, "gallery"), ignore_errors=True)  # the big files go whatever happens
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    worker = f"worker RSS with {gallery_gib:.1f} GiB gallery: {worker_mib:.0f} MiB" if worker_mib else "worker run skipped"
    print(f"{worker}; driver RSS ratio {args.archive_large // 1000}k/{args.archive_small // 1000}k: {score_ratio:.3f}; "
          f"fit driver RSS ratio {args.train_large / args.train_small:g}x: {fit_ratio:.3f}")


def _report(label: str, result: dict[str, Any]) -> None:
    print(f"  {label}: peak RSS {result['peak_rss'] / MIB:7.0f} MiB (after imports + Ray {result['baseline_rss'] / MIB:.0f} MiB, "
          f"growth {(result['peak_rss'] - result['baseline_rss']) / MIB:.0f} MiB), {result['images']} images in "
          f"{result['seconds']:.0f} s = {result['images_per_second']:.1f} img/s", flush=True)


def _ratio_line(what: str, small: dict[str, Any], large: dict[str, Any], goal: float) -> float:
    ratio = large["peak_rss"] / small["peak_rss"]
    growth = (large["peak_rss"] - large["baseline_rss"]) / max(small["peak_rss"] - small["baseline_rss"], 1)
    verdict = "ok" if ratio < goal else "OVER"
    print(f"{what}: peak RSS ratio {ratio:.3f} (goal < {goal:.2f}: {verdict}); growth-over-baseline ratio {growth:.2f}", flush=True)
    return ratio


def _fit_runs(args: argparse.Namespace, work: str, base: dict[str, Any]) -> float:
    results = {}
    for count in (args.train_small, args.train_large):
        source = write_pngs(os.path.join(work, f"train-{count}"), count, args.png_side, seed=1)
        spec = {"kind": "fit", "source": source, "model": os.path.join(work, f"model-{count}"), "settings": base}
        results[count] = measure(spec, os.path.join(work, f"fit-{count}.log"))
        _report(f"fit driver, {count:6d} training images", results[count])
    return _ratio_line(f"fit driver {args.train_large}/{args.train_small} training images",
                       results[args.train_small], results[args.train_large], 1.10)


def _score_runs(args: argparse.Namespace, work: str, base: dict[str, Any]) -> float:
    results = {}
    model = os.path.join(work, f"model-{args.train_small}")
    for count in (args.archive_small, args.archive_large):
        source = write_pngs(os.path.join(work, f"archive-{count}"), count, args.png_side, seed=2)
        spec = {"kind": "score", "source": source, "model": model, "out": os.path.join(work, f"out-{count}"), "settings": base}
        results[count] = measure(spec, os.path.join(work, f"score-{count}.log"))
        _report(f"score driver, {count:6d} archive images", results[count])
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(spec["out"], ignore_errors=True)
    return _ratio_line(f"score driver {args.archive_large}/{args.archive_small} archive images",
                       results[args.archive_small], results[args.archive_large], 1.10)


def _worker_run(args: argparse.Namespace, work: str, values: dict[str, Any]) -> tuple[float, float]:
    """(worker peak RSS MiB, gallery GiB) of scoring against the big gallery; (0, 0) when skipped."""
    from spade_batch.config import Settings

    if args.gallery_gib <= 0:
        return 0.0, 0.0
    settings = Settings(**values)
    root = os.path.join(work, "gallery")
    model = os.path.join(root, "model")
    free = shutil.disk_usage(work).free
    if free < args.gallery_gib * GIB * 1.1:
        raise RuntimeError(f"{free / GIB:.1f} GiB free under {work}: too little for a {args.gallery_gib} GiB gallery")
    started = time.perf_counter()
    count, gallery_bytes = write_big_gallery(model, settings, int(args.gallery_gib * GIB))
    print(f"  gallery: {count} images x resnet18 {settings.image_size}px pyramid = {gallery_bytes / GIB:.2f} GiB float16, "
          f"written in {time.perf_counter() - started:.0f} s (writer process peak RSS {peak_rss() / MIB:.0f} MiB)", flush=True)
    source = write_pngs(os.path.join(root, "test"), args.gallery_test_images, args.png_side, seed=3)
    spec = {"kind": "score-measured", "source": source, "model": model, "out": os.path.join(root, "out"), "settings": values}
    result = measure(spec, os.path.join(work, "score-gallery.log"))
    _report(f"score driver, {args.gallery_test_images} images, {gallery_bytes / GIB:.1f} GiB gallery", result)
    records = [json.load(open(os.path.join(root, name))) for name in sorted(os.listdir(root)) if name.startswith("worker-rss-")]
    if not records:
        raise RuntimeError("the model actor left no RSS record")
    worst = max(records, key=lambda r: r["peak_rss"])
    samples = worst["samples"]
    loaded, last = next(s for s in samples if s["when"] == "loaded"), samples[-1]
    per_image = (last["VmRSS"] - loaded["VmRSS"]) / max(last["images"], 1)
    print(f"  worker ({len(records)} actor(s)): RSS at start {samples[0]['VmRSS'] / MIB:.0f} MiB, after loading the model "
          f"{loaded['VmRSS'] / MIB:.0f} MiB, after {last['images']} images {last['VmRSS'] / MIB:.0f} MiB "
          f"(file-backed {last['RssFile'] / MIB:.0f} MiB, anonymous {last['RssAnon'] / MIB:.0f} MiB); "
          f"growth {per_image / 1024:.0f} KiB/image after loading", flush=True)
    print("  worker RSS by images scored: " + ", ".join(f"{s['images']}:{s['VmRSS'] / MIB:.0f}" for s in samples if s["when"] == "batch"))
    peak_mib = worst["peak_rss"] / MIB
    print(f"score worker, {gallery_bytes / GIB:.2f} GiB gallery: peak RSS {peak_mib:.0f} MiB = "
          f"{worst['peak_rss'] / gallery_bytes:.3f} of the gallery (goal < 2048 MiB: {'ok' if peak_mib < 2048 else 'OVER'})", flush=True)
    return peak_mib, gallery_bytes / GIB


if __name__ == "__main__":
    main()
