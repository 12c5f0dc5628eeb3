"""Pixel-stage speed at the paper's defaults, as a fraction of this machine's own GEMM throughput.

B test images per kernel call, each against its own K=50 retrieved normal images, wide_resnet50_2 layer
shapes at 224 input (layer1 256 x 56^2, layer2 512 x 28^2, layer3 1024 x 14^2), random float32 features.
The nominal work is 2 * HW * (K * HW) * C FLOPs per layer per image; effective GFLOP/s = nominal FLOPs /
measured seconds. Per search precision (the ranking GEMM's: float32, tf32, bfloat16), two baselines in the
same run and precision: a plain torch GEMM of one image's full layer shape (HW x C times C x K*HW, whose
large output makes it partly memory-bound), and the machine's peak: a square 2048^3 GEMM. Each precision
prints its ratio against its own peak; the last line is the headline, the fastest precision's ratio.

    python benchmarks/pixel_knn.py [--device cuda] [--precision all] [--batch 8] [--repeats 3]

With --match-radius R (pixels at 224 px), it times instead the restricted search (each cell against the retrieved
images' cells within ceil(R * h / 224) cells: 2, 1, 1 cells at R = 8) against the full one, layer by layer on the
same features, and prints last `speed-up over the full search: N.Nx` (whole pixel stage, per image).
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from spade_batch.method import pixel_search, spade
from spade_batch.method.alignment import radius_cells

LAYERS = {"layer1": (256, 56), "layer2": (512, 28), "layer3": (1024, 14)}  # name -> (channels, side)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(function, repeats: int, device: torch.device) -> float:
    function()  # warm-up
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def peak_extra_rss(function) -> int:
    """Peak resident memory above the starting level while function() runs (sampled every 2 ms), bytes."""
    start, peak, running = rss_bytes(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss_bytes() - start)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        function()
    finally:
        running[0] = False
        sampler.join()
    return peak[0]


PEAK_SIDE = 2048


def gemm_dtype(precision: str) -> torch.dtype:
    """The dtype the precision's GEMM multiplies in (tf32 is float32 storage)."""
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def peak_flops(precision: str, device: torch.device, generator: torch.Generator, repeats: int) -> float:
    """FLOP/s of a square PEAK_SIDE^3 GEMM in the precision."""
    square = torch.randn(PEAK_SIDE, PEAK_SIDE, generator=generator).to(device, gemm_dtype(precision))
    with pixel_search.matmul_precision(precision, device):
        return 2.0 * PEAK_SIDE**3 / best_seconds(lambda: square @ square, repeats, device)


def measure_precision(args: argparse.Namespace, precision: str, device: torch.device) -> tuple[float, float]:
    """Prints one line per layer and a total for the precision; returns (effective FLOP/s, peak FLOP/s)."""
    generator = torch.Generator().manual_seed(0)
    peak = peak_flops(precision, device, generator, args.repeats)
    print(f"[{precision}] peak GEMM ({PEAK_SIDE}^3): {peak / 1e9:.1f} GFLOP/s")
    chunk_bytes = args.chunk_mib * 2**20
    total_flops = total_spade = total_gemm = 0.0
    for name, (channels, side) in LAYERS.items():
        pixels = side * side
        queries = torch.randn(args.batch, channels, side, side, generator=generator).to(device)
        galleries = torch.randn(args.batch, args.k * pixels, channels, generator=generator).to(device)
        flops = 2.0 * pixels * galleries.shape[1] * channels  # per image
        spade_s = best_seconds(
            lambda: spade.layer_score_maps(queries, galleries, 1, chunk_bytes, precision), args.repeats, device
        ) / args.batch
        image = queries[0].reshape(channels, pixels).T.contiguous().to(gemm_dtype(precision))
        gallery = galleries[0].to(gemm_dtype(precision))
        with pixel_search.matmul_precision(precision, device):
            gemm_s = best_seconds(lambda: image @ gallery.T, args.repeats, device)
        total_flops += flops
        total_spade += spade_s
        total_gemm += gemm_s
        print(
            f"[{precision}] {name}: {flops / 1e9:8.1f} GFLOP  spade {flops / spade_s / 1e9:8.1f} GFLOP/s  "
            f"gemm {flops / gemm_s / 1e9:8.1f} GFLOP/s  ratio {gemm_s / spade_s:.2f}"
        )
    effective = total_flops / total_spade
    print(
        f"[{precision}] total: {total_flops / 1e9:.1f} GFLOP per image  spade {effective / 1e9:.1f} GFLOP/s  "
        f"gemm {total_flops / total_gemm / 1e9:.1f} GFLOP/s  ratio {total_gemm / total_spade:.2f}  "
        f"({total_spade:.3f} s per image)"
    )
    return effective, peak


def measure_radius(args: argparse.Namespace, device: torch.device) -> float:
    """Prints per layer the full and the restricted search's seconds per image; returns the whole stage's speed-up."""
    generator = torch.Generator().manual_seed(2)
    chunk_bytes = args.chunk_mib * 2**20
    total_full = total_local = 0.0
    for name, (channels, side) in LAYERS.items():
        radius = radius_cells(args.match_radius, side, IMAGE_SIZE)
        queries = torch.randn(args.batch, channels, side, side, generator=generator).to(device)
        galleries = torch.randn(args.batch, args.k * side * side, channels, generator=generator).to(device)
        full_s = best_seconds(lambda: spade.layer_score_maps(queries, galleries, 1, chunk_bytes, args.precision), args.repeats, device)
        local_s = best_seconds(lambda: spade.layer_score_maps(queries, galleries, 1, chunk_bytes, args.precision, radius), args.repeats, device)
        total_full, total_local = total_full + full_s / args.batch, total_local + local_s / args.batch
        print(f"{name}: radius {radius} cells ({(2 * radius + 1) ** 2} of {side * side} cells per image)  "
              f"full {full_s / args.batch:.3f} s  restricted {local_s / args.batch:.4f} s per image  {full_s / local_s:.1f}x")
    print(f"pixel stage per image: full {total_full:.3f} s  restricted (match_radius {args.match_radius}) {total_local:.4f} s")
    return total_full / total_local


IMAGE_SIZE = 224
"""The working size the layer shapes are those of (LAYERS)."""


def print_memory(args: argparse.Namespace) -> None:
    """CPU only: layer1's extra resident memory, chunked search of one image versus a full cdist matrix."""
    generator = torch.Generator().manual_seed(1)
    channels, side = LAYERS["layer1"]
    query = torch.randn(channels, side, side, generator=generator)
    gallery = torch.randn(args.k * side * side, channels, generator=generator)
    queries = query.reshape(channels, -1).T.contiguous()
    chunked = peak_extra_rss(lambda: spade.layer_score_maps(query[None], gallery[None], 1, args.chunk_mib * 2**20))
    full = peak_extra_rss(lambda: torch.cdist(queries, gallery).amin(dim=1))
    print(f"layer1 extra memory: chunked {chunked / 2**20:.0f} MiB  full distance matrix (cdist) "
          f"{full / 2**20:.0f} MiB  ratio {chunked / max(full, 1):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32", choices=[*pixel_search.PRECISIONS, "all"])
    parser.add_argument("--batch", type=int, default=1, help="test images per kernel call")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-mib", type=int, help="distance-block bound (default: the product's for the device)")
    parser.add_argument("--match-radius", type=int, help="time the restricted search at this radius (pixels at 224 px) against the full one")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.chunk_mib = args.chunk_mib or pixel_search.chunk_bytes_for(device) // 2**20
    if args.match_radius is not None:
        if args.precision == "all":
            parser.error("--match-radius compares one precision: pass --precision float32, tf32 or bfloat16")
        print(f"device={device} batch={args.batch} K={args.k} threads={torch.get_num_threads()} precision={args.precision}")
        print(f"speed-up over the full search: {measure_radius(args, device):.1f}x")
        return
    precisions = pixel_search.PRECISIONS if args.precision == "all" else (args.precision,)
    print(
        f"device={device} batch={args.batch} K={args.k} threads={torch.get_num_threads()} "
        f"chunk={args.chunk_mib} MiB"
    )
    if device.type == "cpu":
        print_memory(args)
    ratios = {}
    for precision in precisions:
        effective, peak = measure_precision(args, precision, device)
        ratios[precision] = (effective / peak, effective)
        print(f"[{precision}] pixel stage / peak GEMM ({precision}): {effective / peak:.2f}")
    fastest = max(ratios, key=lambda precision: ratios[precision][1])
    print(f"pixel stage / peak GEMM: {ratios[fastest][0]:.2f} ({fastest}, batch {args.batch})")


if __name__ == "__main__":
    main()
