"""Inference per image: the seed's path against ours, same images, weights and threshold.

    /work/venv/bin/python -m bench.inference_bench [--model detr-r101] [--min-size 800] [--max-size 1333]
        [--images 3] [--kept 15]

- seed path: batch of one; ``model(images, mask)`` runs all 100 queries through the mask head;
  then ``bench.postprocess_bench.plain_postprocess`` (per-image CPU postprocessing, per-query
  upsampling, PIL NEAREST resize of the id map, per-segment numpy loops, PNG).
- ours: ``Predictor.predict_batch`` (batch of one): ``forward_kept`` (mask head only for the
  queries above the threshold) then ``postprocess_kept`` (PNG included).
Both include preprocessing (the same resize and normalisation) and the PNG encoding.

Weights: seeded random weights collapse (all queries alike), so with them either nothing or
everything passes a threshold. Both paths therefore use the model tests' informative weights
(``bench.informative``), built once for the variant, and a threshold chosen from a detector pass
on the same images so that about ``--kept`` queries per image pass it (a COCO image keeps 10–30
at the default 0.85 with the published checkpoint); the kept counts are printed. The id maps of
the two paths are compared pixel for pixel. Images: synthetic 640×480 JPEGs (smooth gradients,
bench.pipeline_bench.gradient_jpeg). One warm-up image per path, not timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

from bench.informative import save_informative_weights
from bench.pipeline_bench import gradient_jpeg
from bench.postprocess_bench import plain_postprocess
from worker.predictor import ModelConfig, Predictor
from worker.preprocess import decode_image, image_tensor, pad_batch, processed_size


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="detr-r101")
    ap.add_argument("--min-size", type=int, default=800)
    ap.add_argument("--max-size", type=int, default=1333)
    ap.add_argument("--images", type=int, default=3, help="timed images per path")
    ap.add_argument("--kept", type=int, default=15, help="aim: queries kept per image")
    args = ap.parse_args(argv)

    images = [decode_image(gradient_jpeg(100 + i)) for i in range(args.images + 1)]   # [0]: warm-up
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        weights = save_informative_weights(args.model, os.path.join(tmp, "informative.pt"))
        build_s = time.perf_counter() - t
        base = ModelConfig(model=args.model, weights=str(weights), threshold=0.5, min_size=args.min_size,
                           max_size=args.max_size, device="cpu", batch_size=1)
        predictor = Predictor(base)
    model = predictor.model

    def inputs(im):
        size = processed_size(im.width, im.height, args.min_size, args.max_size)
        batch = pad_batch([image_tensor(im, size)])
        return batch, [size], [(im.height, im.width)]

    # Threshold: midway between the K-th and (K+1)-th best real-class score, median over images.
    with torch.inference_mode():
        cuts, reals = [], []
        for im in images[1:]:
            batch, _, _ = inputs(im)
            logits = model.detr(batch.images, batch.padding_mask).pred_logits[0].softmax(-1)
            scores, labels = logits.max(-1)
            real = scores[labels != logits.shape[-1] - 1].sort(descending=True).values
            reals.append(real)
            k = min(args.kept, len(real) - 1)
            cuts.append(float(real[k - 1] + real[k]) / 2)
    threshold = statistics.median(cuts)
    kept_queries = [int((real > threshold).sum()) for real in reals]
    predictor.config = ModelConfig(**{**base.as_dict(), "threshold": threshold})

    def seed_path(im):
        with torch.inference_mode():
            batch, sizes, targets = inputs(im)
            outputs = model(batch.images, batch.padding_mask)
            return plain_postprocess(outputs, sizes, targets, threshold)[0]

    def ours(im):
        return predictor.predict_batch([im])[0]

    seed_path(images[0]), ours(images[0])                      # warm-up
    seed_t, ours_t, kept, agree = [], [], [], []
    for im in images[1:]:
        t = time.perf_counter(); a = seed_path(im); seed_t.append(time.perf_counter() - t)
        t = time.perf_counter(); b = ours(im); ours_t.append(time.perf_counter() - t)
        kept.append(len(b["segments_info"]))
        agree.append(float(np.mean(a["id_map"] == b["id_map"])))
        print(f"image: seed {seed_t[-1]:.2f} s, ours {ours_t[-1]:.2f} s, segments {kept[-1]}, "
              f"id maps agree on {agree[-1]:.4%} of pixels", flush=True)
    h, w = processed_size(640, 480, args.min_size, args.max_size)
    seed_s, ours_s = statistics.median(seed_t), statistics.median(ours_t)
    print(f"\n{args.model}, input {h}x{w} (640x480 images, --min-size {args.min_size} --max-size {args.max_size}), "
          f"informative seeded weights (built in {build_s:.1f} s), threshold {threshold:.3f} "
          f"(aim {args.kept} kept/image), batch size 1, CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| path | seconds per image (median) |")
    print("|---|---|")
    print(f"| seed: 100 queries through the mask head + plain per-image postprocessing | {seed_s:.2f} |")
    print(f"| ours: forward_kept + postprocess_kept | {ours_s:.2f} |")
    print(f"| speed-up | **{seed_s / ours_s:.2f}×** |")
    print(f"queries kept per image: {kept_queries}; segments per image: {kept}; id maps agree on {min(agree):.4%} of pixels at worst")


if __name__ == "__main__":
    main()
