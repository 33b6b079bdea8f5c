"""Inference per image: the seed's path against ours, same images, weights and threshold.

    python -m bench.inference_bench [--model detr-r101] [--min-size 800] [--max-size 1333]
        [--images 3] [--kept 15] [--device cpu] [--precisions fp32] [--batch-sizes 1]
        [--seed-images N] [--interleave] [--json FILE]

On this 2-core CPU (BENCHMARKS.md), alternating the two paths image by image so that a busy
machine slows both alike:

    python -m bench.inference_bench --model detr-r101 --images 5 --kept 15 --interleave

On a GPU machine (the figures in BENCHMARKS.md):

    python -m bench.inference_bench --device cuda --images 64 --seed-images 16 \\
        --precisions fp32,bf16 --batch-sizes 1,8,16,32 --json gpu.json

- seed path: batch of one, fp32; ``model(images, mask)`` runs all 100 queries through the mask
  head on the device; then ``bench.postprocess_bench.plain_postprocess(on_device=True)``: the
  reference's placement, per-query upsampling and the argmax on the device, then PIL NEAREST
  resize of the id map, per-segment numpy loops and PNG on the host. (Before 2026-12-04 the
  seed's postprocessing ran wholly on the CPU: a strawman on a GPU, see BENCHMARKS.md.)
- ours: ``Predictor.predict`` at each precision and batch size: ``forward_kept`` (mask head only
  for the queries above the threshold), then ``postprocess_kept`` on the same device (PNG
  included; only the id map comes back to the host).
Both include preprocessing (the same resize and normalisation, on the device) and PNG encoding;
images are decoded beforehand (in the worker, decoding runs in prefetch threads).

Weights: seeded random weights collapse (all queries alike), so with them either nothing or
everything passes a threshold. Both paths therefore use the model tests' informative weights
(``bench.informative``), built once for the variant, and a threshold chosen from a detector pass
on the same images so that about ``--kept`` queries per image pass it (a COCO image keeps 10–30
at the default 0.85 with the published checkpoint); the kept counts are printed. Each
configuration's id maps are compared pixel for pixel with the seed path's on the images both ran.
Images: synthetic 640×480 JPEGs (smooth gradients, bench.pipeline_bench.gradient_jpeg). One
warm-up batch per configuration, not timed; on CUDA then one untimed pass over the timed batches
(the steady state of a long job, which meets its shapes again and again; the pass's time, cuDNN's
tuning of new shapes included when cudnn.benchmark is on, is reported as "first pass s").

Memory per configuration: peak GPU memory allocated by PyTorch (``max_memory_allocated``, reset
before each configuration) and the process's peak RSS during it (VmHWM after a reset to RSS).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

from bench.informative import save_informative_weights
from bench.memory import proc_status, reset_peak_rss
from bench.pipeline_bench import gradient_jpeg
from bench.postprocess_bench import plain_postprocess
from worker.batching import AspectBatcher
from worker.heap import keep_freed_memory
from worker.model import create_model
from worker.predictor import ModelConfig, Predictor, resolve_device
from worker.preprocess import decode_image, image_tensor, pad_batch, processed_size


# (width, height): common COCO image sizes, landscape and portrait.
MIXED_SIZES = [(640, 480), (480, 640), (640, 427), (500, 375), (640, 512), (612, 612), (640, 360), (427, 640)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_threshold(predictor: Predictor, images, kept: int) -> tuple[float, list[int]]:
    """Midway between the K-th and (K+1)-th best real-class score, median over the images."""
    cfg, model = predictor.config, predictor.model
    cuts, reals = [], []
    with torch.inference_mode():
        for im in images:
            size = processed_size(im.width, im.height, cfg.min_size, cfg.max_size)
            batch = pad_batch([image_tensor(im, size, predictor.device)])
            probs = model.detr(batch.images, batch.padding_mask).pred_logits[0].softmax(-1)
            scores, labels = probs.max(-1)
            real = scores[labels != probs.shape[-1] - 1].sort(descending=True).values.cpu()
            reals.append(real)
            k = min(kept, len(real) - 1)
            cuts.append(float(real[k - 1] + real[k]) / 2)
    threshold = statistics.median(cuts)
    return threshold, [int((real > threshold).sum()) for real in reals]


def seed_path(predictor: Predictor, seed_model, im, threshold: float) -> dict:
    """`seed_model`: the same weights as the predictor's, as loaded (no folding, NCHW)."""
    cfg = predictor.config
    if predictor.device.type == "cuda":                   # IEEE fp32, as the seed ran
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.inference_mode():
        size = processed_size(im.width, im.height, cfg.min_size, cfg.max_size)
        batch = pad_batch([image_tensor(im, size, predictor.device)])
        outputs = seed_model(batch.images, batch.padding_mask)
        # The reference's own placement: its postprocessing runs on the outputs' device (GPU) up
        # to the id map (BENCHMARKS.md: earlier GPU ratios were against CPU postprocessing).
        return plain_postprocess(outputs, [size], [(im.height, im.width)], threshold, on_device=True)[0]


class SeedProcess:
    """The seed path in a fresh process of its own (spawned): glibc's default heap settings, as
    the seed's worker ran, whatever this process's (``--keep-heap``)."""

    def __init__(self, model: str, weights: str, config: ModelConfig, device: torch.device):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_seed_server, args=(child, model, weights, config.as_dict(), str(device)),
                                        daemon=True)
        self._process.start()
        if self._conn.recv() != "ready":
            raise RuntimeError("the seed process did not start")

    def run(self, im, threshold: float) -> tuple[float, dict]:
        """Seconds for the seed path on `im` (timed in the seed process), and its result."""
        self._conn.send((im, threshold))
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(timeout=60)


def _seed_server(conn, model: str, weights: str, config: dict, device: str) -> None:
    torch.set_grad_enabled(False)
    here = SimpleNamespace(config=ModelConfig(**config), device=torch.device(device))
    seed_model = create_model(model, weights=weights).to(here.device)
    conn.send("ready")
    while (request := conn.recv()) is not None:
        im, threshold = request
        _sync(here.device)
        start = time.perf_counter()
        result = seed_path(here, seed_model, im, threshold)
        _sync(here.device)
        conn.send((time.perf_counter() - start, result))


def batches_in_order(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def batches_by_aspect(images, batch_size: int, min_size: int, max_size: int) -> list[list[int]]:
    """The worker's grouping (worker.pipeline.AspectBatcher), images fed in order."""
    batcher = AspectBatcher(batch_size, min_size, max_size)
    items = [SimpleNamespace(index=i, image=im) for i, im in enumerate(images)]
    batches = [b for b in (batcher.add(item) for item in items) if b] + batcher.flush()
    return [[item.index for item in b] for b in batches]


def run_ours(predictor: Predictor, images, batches: list[list[int]], overlap: bool = True) -> tuple[float, list[dict]]:
    """Seconds for all `images` in the given batches (lists of indices), and the results in order.
    `overlap`: as the worker runs them (on CUDA a batch's postprocessing overlaps the next
    batch's model); otherwise one batch entirely after the other."""
    _sync(predictor.device)
    start = time.perf_counter()
    results = [None] * len(images)
    run = predictor.predict_batches if overlap else lambda batches: map(predictor.predict_batch, batches)
    for batch, batch_results in zip(batches, run([images[i] for i in b] for b in batches)):
        for i, result in zip(batch, batch_results):
            results[i] = result
    _sync(predictor.device)
    return time.perf_counter() - start, results


def interleaved(predictor: Predictor, seed_model, warm_image, images, threshold: float, args,
                seed_process: SeedProcess | None = None) -> None:
    """Seed path and ours one after the other on each image (ours at batch 1, the first precision);
    the seed path in `seed_process` if given, else in this process."""
    device = predictor.device
    predictor.config = ModelConfig(**{**predictor.config.as_dict(), "precision": args.precisions.split(",")[0],
                                      "batch_size": 1})
    run_ours(predictor, [warm_image], [[0]])                                       # warm-up
    if seed_process is not None:
        seed_process.run(warm_image, threshold)                                    # warm-up
    rows = []
    for i, im in enumerate(images):
        if seed_process is not None:
            seed_s, seed = seed_process.run(im, threshold)
        else:
            _sync(device)
            t = time.perf_counter()
            seed = seed_path(predictor, seed_model, im, threshold)
            _sync(device)
            seed_s = time.perf_counter() - t
        ours_s, (ours,) = run_ours(predictor, [im], [[0]])
        rows.append({"image": i, "seed_s": seed_s, "ours_s": ours_s, "ratio": seed_s / ours_s,
                     "model_s": ours["model_ms"] / 1e3, "postprocess_s": ours["postprocess_ms"] / 1e3,
                     "segments": len(ours["segments_info"]),
                     "id_map_agreement": float(np.mean(seed["id_map"] == ours["id_map"]))})
        print(json.dumps(rows[-1]), flush=True)
    median = {k: statistics.median(r[k] for r in rows) for k in ("seed_s", "ours_s", "ratio", "model_s", "postprocess_s")}
    h, w = processed_size(images[0].width, images[0].height, args.min_size, args.max_size)
    print(f"\n{args.model}, input {h}x{w}, threshold {threshold:.3f}, {device}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; seed and ours alternated image by image; "
          f"seed path {'in a process of its own (glibc defaults)' if seed_process else 'in this process'}; "
          f"this process {'keeps freed memory (worker.heap)' if args.keep_heap else 'has glibc defaults'}")
    print("| image | seed s | ours s (model + postprocess) | speed-up | id maps = seed |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['image']} | {r['seed_s']:.2f} | {r['ours_s']:.2f} ({r['model_s']:.2f} + {r['postprocess_s']:.2f}) | "
              f"{r['ratio']:.2f}× | {r['id_map_agreement']:.1%} |")
    print(f"| median | {median['seed_s']:.2f} | {median['ours_s']:.2f} ({median['model_s']:.2f} + "
          f"{median['postprocess_s']:.2f}) | **{median['ratio']:.2f}×** | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "input": [h, w], "threshold": threshold, "torch": torch.__version__,
                       "rows": rows, "median": median}, f, indent=2)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="detr-r101")
    ap.add_argument("--min-size", type=int, default=800)
    ap.add_argument("--max-size", type=int, default=1333)
    ap.add_argument("--images", type=int, default=3, help="timed images per configuration")
    ap.add_argument("--seed-images", type=int, default=None, help="timed images on the seed path (default: --images)")
    ap.add_argument("--kept", type=int, default=15, help="aim: queries kept per image")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16, fp16 (CUDA only for the last two)")
    ap.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes for our path")
    ap.add_argument("--mixed-sizes", action="store_true",
                    help="images of eight COCO-like sizes (batches pad, shapes vary) instead of all 640x480")
    ap.add_argument("--group-by-aspect", action="store_true",
                    help="form batches as the worker does (similar aspect ratios together) instead of in order")
    ap.add_argument("--cudnn-benchmark", choices=("on", "off"), default=None,
                    help="CUDA: override the Predictor's cudnn.benchmark setting")
    ap.add_argument("--serial-postprocess-row", action="store_true",
                    help="CUDA: add a row (first precision, largest batch) with the images of a batch postprocessed one after another")
    ap.add_argument("--in-turn-rows", action="store_true",
                    help="CUDA: add a row per precision (largest batch) with each batch's postprocessing finished "
                         "before the next batch's model starts (the A/B of the overlap)")
    ap.add_argument("--nchw-rows", action="store_true",
                    help="CUDA: add a row per precision (largest batch) with the model in NCHW instead of channels_last")
    ap.add_argument("--interleave", action="store_true",
                    help="alternate the seed path and ours (batch 1, first precision) image by image, so that "
                         "a busy machine slows both alike; reports the median of the per-image ratios")
    ap.add_argument("--keep-heap", action="store_true",
                    help="this process keeps freed memory in its heap, as the worker's processes do (worker.heap)")
    ap.add_argument("--seed-process", action="store_true",
                    help="with --interleave: the seed path in a fresh process of its own (glibc's default heap "
                         "settings, as the seed ran); with --keep-heap, each path as it runs in its own worker")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    if args.keep_heap and not keep_freed_memory():
        ap.error("--keep-heap: not made (PANOPTIC_KEEP_HEAP=0, or not glibc)")
    precisions = args.precisions.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    seed_n = args.seed_images or args.images
    device = resolve_device(args.device)

    warm = max(batch_sizes)
    sizes = MIXED_SIZES if args.mixed_sizes else [(640, 480)]
    all_images = [decode_image(gradient_jpeg(100 + i, *sizes[i % len(sizes)])) for i in range(warm + args.images)]
    warmup, images = all_images[:warm], all_images[warm:]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        weights = save_informative_weights(args.model, os.path.join(tmp, "informative.pt"))
        build_s = time.perf_counter() - t
        base = ModelConfig(model=args.model, weights=str(weights), threshold=0.5, min_size=args.min_size,
                           max_size=args.max_size, device=str(device), batch_size=1)
        predictor = Predictor(base)
        seed_process = (SeedProcess(args.model, str(weights), base, device)
                        if args.interleave and args.seed_process else None)
        # Loaded here only when the seed path runs here: otherwise its weights and warm-up
        # activations would sit in this process's heap beside ours for nothing.
        seed_model = None if seed_process else create_model(args.model, weights=str(weights)).to(device)
    threshold, kept_queries = choose_threshold(predictor, images[:min(len(images), 8)], args.kept)
    base = ModelConfig(**{**base.as_dict(), "threshold": threshold})
    predictor.config = base

    if seed_model is not None:
        seed_path(predictor, seed_model, warmup[0], threshold)                    # warm-up
        _sync(device)
    if args.interleave:
        try:
            interleaved(predictor, seed_model, warmup[0], images, threshold, args, seed_process)
        finally:
            if seed_process is not None:
                seed_process.close()
        return
    seed_results, seed_t = [], []
    for im in images[:seed_n]:
        t = time.perf_counter()
        seed_results.append(seed_path(predictor, seed_model, im, threshold))
        _sync(device)
        seed_t.append(time.perf_counter() - t)
    seed_s = statistics.median(seed_t)
    print(f"seed path: {seed_s * 1e3:.1f} ms/image (median of {seed_n})", flush=True)

    configs = [(p, b, "threads") for p in precisions for b in batch_sizes]
    if args.serial_postprocess_row and device.type == "cuda":
        configs.append((precisions[0], max(batch_sizes), "serial"))
    if args.in_turn_rows and device.type == "cuda":
        configs += [(p, max(batch_sizes), "threads, in turn") for p in precisions]
    if args.nchw_rows and device.type == "cuda":
        configs += [(p, max(batch_sizes), "threads, NCHW") for p in precisions]
    pool = predictor._postprocess_pool
    rows = []
    for precision, batch_size, postprocess in configs:
        predictor._postprocess_pool = pool if postprocess.startswith("threads") else None
        overlap = postprocess != "threads, in turn"
        predictor.set_memory_format(torch.contiguous_format if postprocess == "threads, NCHW" else torch.channels_last)
        predictor.config = ModelConfig(**{**base.as_dict(), "precision": precision, "batch_size": batch_size})
        run_ours(predictor, warmup[:batch_size], [list(range(batch_size))])   # warm-up
        batches = (batches_by_aspect(images, batch_size, args.min_size, args.max_size) if args.group_by_aspect
                   else batches_in_order(len(images), batch_size))
        # On CUDA one untimed pass over the timed batches first: a long job meets each of its
        # shapes again and again, so the figure is the steady state; the pass's time is reported.
        first_pass_s = run_ours(predictor, images, batches, overlap)[0] if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss_reset = reset_peak_rss()
        seconds, results = run_ours(predictor, images, batches, overlap)
        agree = [float(np.mean(a["id_map"] == b["id_map"])) for a, b in zip(seed_results, results)]
        row = {
            "precision": precision, "batch_size": batch_size,
            "first_pass_s": first_pass_s,
            "postprocess": postprocess if device.type == "cuda" else "serial",
            "ms_per_image": seconds * 1e3 / len(images), "images_per_s": len(images) / seconds,
            "speedup_vs_seed": seed_s * len(images) / seconds,
            "model_ms": statistics.median(r["model_ms"] for r in results),
            "postprocess_ms": statistics.median(r["postprocess_ms"] for r in results),
            "segments_per_image": statistics.mean(len(r["segments_info"]) for r in results),
            "id_map_agreement_min": min(agree),
            "id_map_agreement_mean": statistics.mean(agree),
            "gpu_peak_allocated_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                                       if device.type == "cuda" else None),
            "host_peak_rss_mib": proc_status("VmHWM") / 1024 if rss_reset else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    h, w = processed_size(640, 480, args.min_size, args.max_size)
    images_are = "8 mixed COCO-like sizes" if args.mixed_sizes else "640x480 images"
    if args.group_by_aspect:
        images_are += ", batches grouped by aspect ratio"
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads, {platform.machine()}, {os.cpu_count()} cores")
    print(f"\n{args.model}, input {h}x{w} ({images_are}, --min-size {args.min_size} --max-size {args.max_size}), "
          f"informative seeded weights (built in {build_s:.1f} s), threshold {threshold:.3f} "
          f"(aim {args.kept} kept/image), {where}, torch {torch.__version__}, "
          f"cudnn.benchmark {torch.backends.cudnn.benchmark if device.type == 'cuda' else '–'}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"seed path (batch 1, fp32, all 100 queries, plain CPU postprocessing): {seed_s * 1e3:.1f} ms/image, "
          f"{1 / seed_s:.2f} images/s (median of {seed_n})")
    print("| precision | batch | postprocess | images/s | ms/image | × seed | model ms | "
          "postprocess ms | id maps = seed (worst image) | GPU peak MiB | host peak RSS MiB | first pass s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gpu = f"{r['gpu_peak_allocated_mib']:.0f}" if r["gpu_peak_allocated_mib"] is not None else "–"
        rss = f"{r['host_peak_rss_mib']:.0f}" if r["host_peak_rss_mib"] is not None else "–"
        first = f"{r['first_pass_s']:.2f}" if r["first_pass_s"] is not None else "–"
        print(f"| {r['precision']} | {r['batch_size']} | {r['postprocess']} | {r['images_per_s']:.2f} | {r['ms_per_image']:.1f} | "
              f"**{r['speedup_vs_seed']:.2f}×** | {r['model_ms']:.1f} | {r['postprocess_ms']:.1f} | "
              f"{r['id_map_agreement_min']:.4%} | {gpu} | {rss} | {first} |")
    print(f"queries kept per image (threshold pass): {kept_queries}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "device": where, "torch": torch.__version__,
                       "input": [h, w], "threshold": threshold, "seed_ms_per_image": seed_s * 1e3,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
