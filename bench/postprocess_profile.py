"""Where a batch's postprocessing time goes (Python functions and torch operators), on any device.

    python -m bench.postprocess_profile [--device cuda] [--model detr-r101] [--batch-size 16]
        [--precision fp32] [--kept 15] [--rows 25]

One batch of 640×480 synthetic images through the Predictor's model step (informative weights,
threshold for about --kept queries per image, as bench.inference_bench chooses it), then the
batch's ``postprocess_kept`` timed three ways: serial (no executor), on the Predictor's threads,
and serial under cProfile and torch.profiler (tables printed); and the batch's PNG encoding alone,
ours against Pillow's encoder. Not a benchmark of record: a guide
to what to make faster.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import tempfile
import time

import torch
from PIL import Image

from bench.inference_bench import _sync, choose_threshold
from bench.informative import save_informative_weights
from bench.pipeline_bench import gradient_jpeg
from worker.output import encode_id_png, id_to_rgb
from worker.postprocess import postprocess_kept
from worker.predictor import ModelConfig, Predictor, resolve_device
from worker.preprocess import decode_image, image_tensor, pad_batch, processed_size


def model_outputs(predictor: Predictor, images) -> tuple[dict, list, list]:
    cfg = predictor.config
    sizes = [processed_size(im.width, im.height, cfg.min_size, cfg.max_size) for im in images]
    with torch.inference_mode(), predictor._autocast():
        batch = pad_batch([image_tensor(im, size, predictor.device) for im, size in zip(images, sizes)])
        pixels = batch.images.contiguous(memory_format=torch.channels_last)
        outputs = predictor.model.forward_kept(pixels, batch.padding_mask, cfg.threshold)
    outputs = {k: (v.float() if v.is_floating_point() else v) for k, v in outputs.items()}
    _sync(predictor.device)
    return outputs, batch.sizes, [(im.height, im.width) for im in images]


def _pillow_png(id_map) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(id_to_rgb(id_map), "RGB").save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def timed(device, fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="detr-r101")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--kept", type=int, default=15)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    images = [decode_image(gradient_jpeg(100 + i)) for i in range(args.batch_size)]
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_informative_weights(args.model, os.path.join(tmp, "informative.pt"))
        predictor = Predictor(ModelConfig(model=args.model, weights=str(weights), device=str(device),
                                          precision=args.precision, batch_size=args.batch_size))
    threshold, kept = choose_threshold(predictor, images[:8], args.kept)
    predictor.config = ModelConfig(**{**predictor.config.as_dict(), "threshold": threshold})
    predictor.predict_batch(images)                                            # warm-up
    outputs, sizes, targets = model_outputs(predictor, images)
    n = len(images)

    def serial():
        return postprocess_kept(outputs, sizes, targets)

    def threads():
        return postprocess_kept(outputs, sizes, targets, executor=predictor._postprocess_pool)

    serial()
    print(f"{args.model} {args.precision}, batch {n}, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch {torch.__version__}, "
          f"kept per image {kept}")
    print(f"postprocess serial: {timed(device, serial) * 1e3 / n:.2f} ms/image")
    if predictor._postprocess_pool is not None:
        threads()
        print(f"postprocess on {predictor._postprocess_pool._max_workers} threads: "
              f"{timed(device, threads) * 1e3 / n:.2f} ms/image")
    predict_s = timed(device, lambda: predictor.predict_batch(images), repeats=3)
    print(f"predict_batch: {predict_s * 1e3 / n:.2f} ms/image")
    id_maps = [r["id_map"] for r in serial()]
    ours_s = timed(device, lambda: [encode_id_png(m) for m in id_maps])
    pillow_s = timed(device, lambda: [_pillow_png(m) for m in id_maps])
    print(f"PNG encoding alone, one thread: ours {ours_s * 1e3 / n:.2f} ms/image, "
          f"Pillow (compress_level 1) {pillow_s * 1e3 / n:.2f} ms/image")

    profile = cProfile.Profile()
    profile.enable()
    serial()
    _sync(device)
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.rows)
    print(out.getvalue())
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        serial()
        _sync(device)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
