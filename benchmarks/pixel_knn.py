"""Pixel-stage speed at the paper's defaults, as a fraction of this machine's own GEMM throughput.

One test image against K=50 retrieved normal images, wide_resnet50_2 layer shapes at 224 input
(layer1 256 x 56^2, layer2 512 x 28^2, layer3 1024 x 14^2), random features. The nominal work is
2 * HW * (K * HW) * C FLOPs per layer; effective GFLOP/s = nominal FLOPs / measured seconds.
The baseline is a plain float32 torch GEMM of the same shapes measured in the same run.

    python benchmarks/pixel_knn.py [--device cuda] [--dtype bfloat16] [--repeats 3]
"""

from __future__ import annotations

import argparse
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
    print(
        f"total: {total_flops / 1e9:.1f} GFLOP per image  spade {total_flops / total_spade / 1e9:.1f} GFLOP/s  "
        f"gemm {total_flops / total_gemm / 1e9:.1f} GFLOP/s  ratio {total_gemm / total_spade:.2f}  "
        f"({total_spade:.2f} s per image)"
    )


if __name__ == "__main__":
    main()
