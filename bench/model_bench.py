"""Forward time per image with and without mask-head pruning (one run, same weights and input).

    python -m bench.model_bench [--model detr-r101] [--size 800 1199] [--kept 15] [--repeats 3]

"full" runs all 100 queries through the mask head (what `model(images, mask)` returns);
"pruned" is `forward_kept` for K kept queries: the detector once, then the mask head for K.
Random weights collapse (all queries alike), so K kept queries are chosen by index; the mask
head's cost depends only on how many queries it runs.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from worker.model import create_model


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="detr-r101")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1199), metavar=("H", "W"))
    parser.add_argument("--kept", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = create_model(args.model)
    images = torch.randn(1, 3, *args.size, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, *args.size, dtype=torch.bool)
    kept = torch.arange(args.kept)

    def pruned():
        features = model.detr(images, mask)
        return model._masks(features, torch.zeros_like(kept), kept)

    with torch.inference_mode():
        model(images, mask)                           # warm-up
        full_s = best_of(args.repeats, lambda: model(images, mask))
        pruned_s = best_of(args.repeats, pruned)
        detector_s = best_of(args.repeats, lambda: model.detr(images, mask))
    print(f"{args.model}, input {args.size[0]}x{args.size[1]}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("| path | seconds per image |")
    print("|---|---|")
    print(f"| full: 100 queries through the mask head | {full_s:.2f} |")
    print(f"| pruned: {args.kept} kept queries | {pruned_s:.2f} |")
    print(f"| detector alone (no mask head) | {detector_s:.2f} |")
    print(f"| ratio full / pruned | {full_s / pruned_s:.2f}x |")


if __name__ == "__main__":
    main()
