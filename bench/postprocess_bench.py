"""Benchmark: worker.postprocess against a plain per-image implementation of the same algorithm.

    /work/venv/bin/python -m bench.postprocess_bench [--batches N] [--images B] [--seed S] [--threads T]

`plain_postprocess` is the straightforward way to write the postprocessor (close to DETR's
reference): per query F.interpolate to the processed size, argmax over the full-size stack, PIL
NEAREST resize of the id map, per-segment numpy loops for areas and boxes, PNG at PIL's default
compression. The script checks that both give identical id maps and segments, then prints a
markdown table row with the times and the ratio.
"""

from __future__ import annotations

import argparse
import io
import math
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tests.synthetic_outputs import synthetic_batch
from worker import categories
from worker.output import id_to_rgb
from worker.postprocess import MIN_AREA, panoptic_postprocess


def plain_postprocess(outputs, processed_sizes, target_sizes, threshold=0.85, on_device=False):
    """The same algorithm as worker.postprocess, written plainly (per image, per segment).

    on_device=False: everything on the CPU (all 100 queries' masks copied to the host first).
    on_device=True: the placement of DETR's reference postprocessor, the honest seed baseline on a
    GPU: scores, thresholds, upsampling and the argmax on the outputs' device; only the small id
    map goes to the host, for the PIL resize, the per-segment loops and the PNG."""
    logits = outputs["pred_logits"].float()
    masks_all = outputs["pred_masks"].float()
    if not on_device:
        logits, masks_all = logits.cpu(), masks_all.cpu()
    results = []
    for b in range(logits.shape[0]):
        h, w = (int(v) for v in processed_sizes[b])
        H, W = (int(v) for v in target_sizes[b])
        scores, labels = logits[b].softmax(-1).max(-1)
        keep = (labels != logits.shape[-1] - 1) & (scores > threshold)
        queries = keep.nonzero().flatten().tolist()
        h4, w4 = math.ceil(h / 4), math.ceil(w / 4)
        up = {}
        for q in queries:  # upsampled once per image
            m = masks_all[b, q, :h4, :w4][None, None]
            up[q] = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        active = list(queries)
        while True:
            if not active:
                id_map = np.zeros((H, W), np.int32)
                segments = []
                break
            # group: one segment per thing query, one per stuff class, in order of first query
            seg_of, members, stuff = {}, [], {}
            for q in active:
                cat = int(labels[q])
                if cat > 90 and cat in stuff:
                    s = stuff[cat]
                    members[s - 1].append(q)
                else:
                    members.append([q])
                    s = len(members)
                    if cat > 90:
                        stuff[cat] = s
                seg_of[q] = s
            winner = torch.stack([up[q] for q in active]).argmax(0).cpu().numpy()
            lut = np.array([seg_of[q] for q in active], np.int32)
            small_map = lut[winner]
            id_map = np.asarray(Image.fromarray(small_map).resize((W, H), Image.NEAREST)).astype(np.int32)
            areas = [int((id_map == s).sum()) for s in range(1, len(members) + 1)]
            dropped = {s for s, a in enumerate(areas, start=1) if a <= MIN_AREA}
            if dropped:
                active = [q for q in active if seg_of[q] not in dropped]
                continue
            segments = []
            for s, qs in enumerate(members, start=1):
                ys, xs = np.nonzero(id_map == s)
                cat = int(labels[qs[0]])
                segments.append({
                    "id": s, "category_id": cat, "category_name": categories.category_name(cat),
                    "isthing": cat <= 90, "area": areas[s - 1],
                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                    "score": max(float(scores[q]) for q in qs), "iscrowd": 0,
                })
            break
        buf = io.BytesIO()
        Image.fromarray(id_to_rgb(id_map)).save(buf, format="PNG")
        results.append({"id_map": id_map, "png": buf.getvalue(), "segments_info": segments})
    return results


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=5, help="timed batches (each with fresh outputs)")
    ap.add_argument("--images", type=int, default=4, help="images per batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    processed, target = (800, 1066), (480, 640)
    rng = np.random.default_rng(args.seed)
    plain_t, ours_t = [], []
    for i in range(args.batches + 1):  # the first batch warms up and is not timed
        counts = rng.integers(10, 31, args.images).tolist()
        outputs, images = synthetic_batch(args.seed * 1000 + i, [processed] * args.images, counts)
        sizes, targets = [processed] * args.images, [target] * args.images
        tp, plain = _timed(plain_postprocess, outputs, sizes, targets)
        to, ours = _timed(panoptic_postprocess, outputs, sizes, targets)
        for a, b in zip(plain, ours):
            assert np.array_equal(a["id_map"], b["id_map"]), "id maps differ"
            assert a["segments_info"] == b["segments_info"], "segments differ"
        if i:
            plain_t.append(tp)
            ours_t.append(to)
    n = args.images
    plain_med, ours_med = statistics.median(plain_t) / n * 1e3, statistics.median(ours_t) / n * 1e3
    plain_min, ours_min = min(plain_t) / n * 1e3, min(ours_t) / n * 1e3
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.batches} batches of {n} images, "
          f"10–30 kept queries, processed {processed[0]}×{processed[1]} → {target[0]}×{target[1]}; "
          f"identical id maps and segments. Times per image, median (best) over the batches.")
    print("| postprocess | plain ms/image | ours ms/image | ratio |")
    print("|---|---|---|---|")
    print(f"| CPU ({torch.get_num_threads()} threads), B={n}, {processed[0]}×{processed[1]} → {target[0]}×{target[1]}, "
          f"10–30 kept | {plain_med:.1f} ({plain_min:.1f}) | {ours_med:.1f} ({ours_min:.1f}) "
          f"| {plain_med / ours_med:.1f}× ({plain_min / ours_min:.1f}×) |")

if __name__ == "__main__":
    main()
