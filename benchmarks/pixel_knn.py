"""Pixel-stage speed at the paper's defaults, as a fraction of this machine's own GEMM throughput.

One test image against K=50 retrieved normal images, wide_resnet50_2 layer shapes at 224 input
(layer1 256 x 56^2, layer2 512 x 28^2, layer3 1024 x 14^2), random features. The nominal work is
2 * HW * (K * HW) * C FLOPs per layer; effective GFLOP/s = nominal FLOPs / measured seconds.
Two baselines, measured in the same run with the same dtype: a plain torch GEMM of each layer's
full shape (HW x C times C x K*HW, whose large output makes it partly memory-bound), and the
machine's peak: a square 2048^3 GEMM. The headline ratio is against the peak.

    python benchmarks/pixel_knn.py [--device cuda] [--dtype bfloat16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from spade_batch import spade

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-mib", type=int, default=spade.DEFAULT_CHUNK_BYTES // 2**20)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    print(f"device={device} dtype={args.dtype} K={args.k} threads={torch.get_num_threads()} chunk={args.chunk_mib} MiB")

    square = torch.randn(2048, 2048, generator=generator).to(device, dtype)
    peak = 2.0 * 2048**3 / best_seconds(lambda: square @ square, args.repeats, device)
    print(f"peak GEMM (2048^3): {peak / 1e9:.1f} GFLOP/s")

    total_flops = total_spade = total_gemm = 0.0
    for name, (channels, side) in LAYERS.items():
        pixels = side * side
        query = torch.randn(channels, side, side, generator=generator).to(device, dtype)
        gallery = torch.randn(args.k * pixels, channels, generator=generator).to(device, dtype)
        flops = 2.0 * pixels * gallery.shape[0] * channels
        spade_s = best_seconds(
            lambda: spade.layer_score_map(query, gallery, 1, args.chunk_mib * 2**20), args.repeats, device
        )
        queries = query.reshape(channels, pixels).T.contiguous()
        gemm_s = best_seconds(lambda: queries @ gallery.T, args.repeats, device)
        total_flops += flops
        total_spade += spade_s
        total_gemm += gemm_s
        print(
            f"{name}: {flops / 1e9:8.1f} GFLOP  spade {flops / spade_s / 1e9:8.1f} GFLOP/s  "
            f"gemm {flops / gemm_s / 1e9:8.1f} GFLOP/s  ratio {gemm_s / spade_s:.2f}"
        )
    effective = total_flops / total_spade
    print(
        f"total: {total_flops / 1e9:.1f} GFLOP per image  spade {effective / 1e9:.1f} GFLOP/s  "
        f"gemm {total_flops / total_gemm / 1e9:.1f} GFLOP/s  ratio {total_gemm / total_spade:.2f}  "
        f"({total_spade:.2f} s per image)"
    )
    print(f"pixel stage / peak GEMM: {effective / peak:.2f}")
    if device.type == "cpu":
        channels, side = LAYERS["layer1"]
        query = torch.randn(channels, side, side, generator=generator)
        gallery = torch.randn(args.k * side * side, channels, generator=generator)
        queries = query.reshape(channels, -1).T.contiguous()
        chunked = peak_extra_rss(lambda: spade.layer_score_map(query, gallery, 1, args.chunk_mib * 2**20))
        full = peak_extra_rss(lambda: torch.cdist(queries, gallery).amin(dim=1))
        print(f"layer1 extra memory: chunked {chunked / 2**20:.0f} MiB  full distance matrix (cdist) "
              f"{full / 2**20:.0f} MiB  ratio {chunked / max(full, 1):.3f}")


if __name__ == "__main__":
    main()
