"""JPEG decoding to uint8 RGB tensors: the worker's CPU path in threads against nvJPEG on the GPU.

    python -m bench.decode_bench --images 256 --threads 8,16 --gpu-batches 16,64   # a lent GPU
    python -m bench.decode_bench --images 32 --threads 2 --gpu-batches 0             # the CPU only

CPU: `RGBImage.from_pil(decode_image(bytes))` (what the worker's io threads do) in a thread
pool of each size. GPU: `torchvision.io.decode_jpeg(list, device="cuda")` on batches of each size,
results on the device (what a GPU-decoding worker would hand its preprocessing), timed until the
device is done. The same COCO-like JPEGs as bench.e2e_gpu (mostly 640×480). Images/s, best of
--repeats. Decides whether the worker decodes on the GPU (issue 14): one run, ratios only.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench.e2e_gpu import coco_like_jpeg, image_sizes


def best_rate(n: int, repeats: int, fn) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", default="8,16")
    parser.add_argument("--gpu-batches", default="16,64", help="0: no GPU rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from worker.preprocess import RGBImage, decode_image

    blobs = [coco_like_jpeg(2000 + i, *size) for i, size in enumerate(image_sizes(args.images))]
    report = {"images": len(blobs), "torch": torch.__version__, "cpu": {}, "gpu": {}}
    for threads in (int(t) for t in args.threads.split(",")):
        with ThreadPoolExecutor(threads) as pool:
            def cpu():
                list(pool.map(lambda b: RGBImage.from_pil(decode_image(b)), blobs))
            cpu()
            report["cpu"][threads] = best_rate(len(blobs), args.repeats, cpu)
        print(f"CPU, {threads} threads: {report['cpu'][threads]:.0f} images/s", flush=True)
    batches = [int(b) for b in args.gpu_batches.split(",") if int(b) > 0]
    if batches and torch.cuda.is_available():
        from torchvision.io import decode_jpeg
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        report["gpu_name"] = torch.cuda.get_device_name()
        for size in batches:
            def gpu():
                for start in range(0, len(data), size):
                    decode_jpeg(data[start:start + size], device="cuda")
                torch.cuda.synchronize()
            gpu()
            report["gpu"][size] = best_rate(len(blobs), args.repeats, gpu)
            print(f"GPU nvJPEG, batches of {size}: {report['gpu'][size]:.0f} images/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
