"""The worker's CUDA path gives the CPU's results (run on a lent GPU machine: pytest -m cuda).

Deselected by default (pyproject's addopts); on a GPU machine `pytest -m cuda tests/` runs them.
Seeded random weights collapse (every query alike), so these use the model tests' informative
weights, saved as a checkpoint file and loaded the way a user's --weights PATH is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.informative import save_informative_weights
from bench.pipeline_bench import gradient_jpeg
from worker.output import decode_id_png
from worker.predictor import ModelConfig, Predictor
from worker.preprocess import (PinnedStaging, RGBImage, decode_image, image_tensor, pad_batch, prepare_batch,
                               processed_size)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SIZES = dict(min_size=256, max_size=384)
# Informative weights make the kept set depend on tiny score differences; at 0 every query whose
# best class is a real one is kept, so CPU and GPU keep the same queries.
THRESHOLD = 0.0


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    return save_informative_weights("detr-r50", tmp_path_factory.mktemp("cuda") / "informative.pt")


@pytest.fixture(scope="module")
def images():
    # Two sizes, so that a batch pads one of them.
    return [decode_image(gradient_jpeg(7)), decode_image(gradient_jpeg(8, width=480, height=400)),
            decode_image(gradient_jpeg(9))]


def predictor(weights_file, device, precision="fp32", batch_size=1) -> Predictor:
    return Predictor(ModelConfig(model="detr-r50", weights=str(weights_file), threshold=THRESHOLD, device=device,
                                 precision=precision, batch_size=batch_size, **SIZES))


def check_result(result, image):
    """A well-formed result: the PNG holds the id map; segments cover exactly its non-zero ids."""
    assert result["id_map"].shape == (image.height, image.width)
    assert np.array_equal(decode_id_png(result["png"]), result["id_map"])
    ids, counts = np.unique(result["id_map"], return_counts=True)
    areas = {int(i): int(c) for i, c in zip(ids, counts) if i != 0}
    assert {s["id"]: s["area"] for s in result["segments_info"]} == areas


def agreement(a, b) -> float:
    return float(np.mean(a["id_map"] == b["id_map"]))


def test_fp32_on_cuda_gives_the_cpu_results(weights_file, images):
    cpu = predictor(weights_file, "cpu").predict(images)
    gpu = predictor(weights_file, "cuda").predict(images)
    for image, c, g in zip(images, cpu, gpu):
        check_result(g, image)
        assert len(g["segments_info"]) > 3                   # informative weights: real work
        print(f"fp32 CUDA vs CPU: {agreement(c, g):.4%} of pixels agree, "
              f"{len(g['segments_info'])} vs {len(c['segments_info'])} segments")
        # cuDNN's convolutions (TF32 on Ampere and later, PyTorch's default) differ from the
        # CPU's in the low bits: a few border pixels may flip, a tiny segment may come or go.
        assert agreement(c, g) > 0.99
        assert abs(len(g["segments_info"]) - len(c["segments_info"])) <= 2


def test_batches_on_cuda_give_the_cpu_batch_results(weights_file, images):
    # Mixed sizes: the batch pads the smaller image, and padding changes DETR's features near
    # the border (on any device), so the reference is the same batch on the CPU.
    cpu = predictor(weights_file, "cpu", batch_size=3).predict(images)
    gpu = predictor(weights_file, "cuda", batch_size=3).predict(images)
    for image, c, g in zip(images, cpu, gpu):
        check_result(g, image)
        print(f"batch of 3, CUDA vs CPU: {agreement(c, g):.4%} of pixels agree")
        assert agreement(c, g) > 0.99


@pytest.mark.parametrize("batch_size", [3, 1])
def test_threaded_postprocessing_gives_the_serial_results(weights_file, images, batch_size):
    """Threads on streams of their own; at batch size 1 each batch's postprocessing also overlaps
    the next batch's model (Predictor.predict_batches)."""
    p = predictor(weights_file, "cuda", batch_size=batch_size)
    assert p._postprocess_pool is not None
    threaded = p.predict(images)
    p._postprocess_pool = None
    serial = p.predict(images)
    for t, s in zip(threaded, serial):
        assert np.array_equal(t["id_map"], s["id_map"])
        assert t["png"] == s["png"]
        assert t["segments_info"] == s["segments_info"]


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_reduced_precisions_give_wellformed_results(weights_file, images, precision):
    results = predictor(weights_file, "cuda", precision=precision, batch_size=3).predict(images)
    for image, r in zip(images, results):
        check_result(r, image)
        assert r["segments_info"], f"{precision} lost every segment"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_outputs_are_close_to_fp32(precision):
    # Informative weights amplify rounding by design (their partitions are chaotic under bf16),
    # so this compares numbers, on seeded weights: a broken autocast path is off by ~100%.
    p = Predictor(ModelConfig(model="detr-r50", weights="random", device="cuda", **SIZES))
    im = decode_image(gradient_jpeg(11))
    size = processed_size(im.width, im.height, SIZES["min_size"], SIZES["max_size"])
    batch = pad_batch([image_tensor(im, size, p.device)])
    with torch.inference_mode():
        with p._autocast():                               # fp32: sets TF32 off
            exact = p.model(batch.images, batch.padding_mask)
        with torch.autocast("cuda", dtype=getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[precision])):
            reduced = p.model(batch.images, batch.padding_mask)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        a, b = exact[key].float(), reduced[key].float()
        error = float((a - b).norm() / a.norm())
        print(f"{precision} {key}: relative L2 error {error:.2e}")
        assert error < 0.05, key


def test_pruned_masks_on_cuda_equal_the_full_pass(weights_file, images):
    p = predictor(weights_file, "cuda")
    im = images[0]
    size = processed_size(im.width, im.height, SIZES["min_size"], SIZES["max_size"])
    batch = pad_batch([image_tensor(im, size, p.device)])
    with torch.inference_mode():
        full = p.model(batch.images, batch.padding_mask)
        kept = p.model.forward_kept(batch.images, batch.padding_mask, 0.5)
    q = kept["keep"][0].nonzero().flatten()
    assert q.numel() > 0
    expected = full["pred_masks"][0, q]
    # The head runs on 100 pairs in one pass and on the kept ones in the other, so cuDNN may pick
    # different (TF32) kernels: equal up to their rounding, not bit for bit. Another query's mask
    # would differ everywhere.
    torch.testing.assert_close(kept["kept_masks"], expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


def test_gpu_memory_gauges():
    """The worker's Prometheus gauges follow the CUDA allocator (tests/test_metrics_logs.py covers
    the rest of the metrics; this part needs a GPU)."""
    from prometheus_client import REGISTRY

    from worker import metrics

    def sample(name):
        return REGISTRY.get_sample_value(name, {"device": f"cuda:{torch.cuda.current_device()}"})

    block = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    metrics.batch_done(2, torch.device("cuda"))          # no index: named after the current device
    allocated, peak = sample("panoptic_gpu_memory_allocated_bytes"), sample("panoptic_gpu_memory_peak_bytes")
    assert allocated >= 256 << 20 and peak >= allocated
    assert sample("panoptic_gpu_memory_reserved_bytes") >= allocated
    del block
    metrics.batch_done(1, torch.device(f"cuda:{torch.cuda.current_device()}"))
    assert sample("panoptic_gpu_memory_allocated_bytes") <= allocated - (256 << 20)
    assert sample("panoptic_gpu_memory_peak_bytes") == peak


def test_batched_preprocessing_on_cuda_matches_the_cpu(images):
    """prepare_batch on the GPU (pixels staged as uint8, resized per size group there) gives the
    CPU's batch up to float rounding of the antialiased resize, and the same padding."""
    sizes = [processed_size(im.width, im.height, SIZES["min_size"], SIZES["max_size"]) for im in images]
    rgb = [RGBImage.from_pil(im) for im in images]
    cpu = prepare_batch(rgb, sizes, torch.device("cpu"))
    gpu = prepare_batch(rgb, sizes, torch.device("cuda"), PinnedStaging(torch.device("cuda")))
    torch.testing.assert_close(gpu.images.cpu(), cpu.images, rtol=0, atol=1e-3)
    assert torch.equal(gpu.padding_mask.cpu(), cpu.padding_mask) and gpu.sizes == cpu.sizes


def test_pinned_staging_reuses_its_buffers():
    """A page-locked buffer per slot, allocated once (and again only to grow), never one per image
    or per batch; what arrives on the device is what was staged, even when a slot is rewritten
    while earlier batches' copies may still be queued."""
    device = torch.device("cuda")
    staging = PinnedStaging(device, count=2)
    rng = np.random.default_rng(5)
    batches = [[torch.from_numpy(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(4)]
               for _ in range(6)]
    on_device = [staging.to_device(batch) for batch in batches]
    assert staging.allocations == 2
    assert all(b is not None and b.is_pinned() for b in staging._buffers)
    torch.cuda.synchronize()
    # Each batch's device copy was made before its slot was written again: results are intact.
    for batch, moved in zip(batches, on_device):
        for host, dev in zip(batch, moved):
            assert torch.equal(dev.cpu(), host)
    staging.to_device([torch.zeros((200, 300, 3), dtype=torch.uint8)])     # larger: grows its slot
    assert staging.allocations == 3


def test_start_batch_synchronises_once_per_batch_not_per_image(weights_file, images):
    """The model thread's host round trips (the kept-query count) do not grow with the batch:
    no per-image sync, no whole-stream sync after a batch (counted with PyTorch's sync debug
    mode while the postprocessing waits, so that only the model thread's calls count)."""
    import threading
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    class HeldPool:
        def __init__(self):
            self.pool, self.release = ThreadPoolExecutor(2), threading.Event()

        def submit(self, fn, *args):
            return self.pool.submit(lambda: self.release.wait(60) and fn(*args))

    p = predictor(weights_file, "cuda", batch_size=3)
    same_size = [images[0], images[2], images[0]]
    # Warm-up: cached constants, cuDNN plans, and every staging buffer allocated and used once
    # (a buffer's first use allocates page-locked memory; a later one waits for its last copy).
    for _ in range(3):
        p.predict(same_size)
    counts = {}
    for n in (1, 3):
        held = p._postprocess_pool = HeldPool()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                pending = p.start_batch(same_size[:n])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[n] = sum("synchroniz" in str(w.message) for w in caught)
        held.release.set()
        results = pending.results()
        assert len(results) == n and all(r["model_ms"] > 0 for r in results)
        held.pool.shutdown()
    print(f"synchronising calls in start_batch: {counts}")
    # A per-image round trip would add one per extra image; a batch of one may cost one more
    # (seen on an H200: 3 for one image, 2 for three), never a batch of three.
    assert counts[3] <= counts[1] and counts[3] <= 3


def test_model_time_comes_from_cuda_events(weights_file, images):
    """On CUDA the batch's model time is the device time between two events (the model thread
    no longer waits for the model), and the results are those of the serial path."""
    p = predictor(weights_file, "cuda", batch_size=3)
    pending = p.start_batch(images)
    assert pending._device_timing is not None
    results = pending.results()
    assert all(r["model_ms"] > 0 and r["postprocess_ms"] >= 0 for r in results)
    p._postprocess_pool = None
    serial = p.predict_batch(images)
    for r, s in zip(results, serial):
        assert np.array_equal(r["id_map"], s["id_map"]) and r["segments_info"] == s["segments_info"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_detector_cuda_graphs_give_the_eager_results(weights_file, images, precision, monkeypatch):
    """A shape seen twice is captured as a CUDA graph and replayed from then on (with the
    postprocessing threads running beside the capture); the replays give the eager pass's
    results, batch after batch (the graph's buffers are reused, never read stale)."""
    monkeypatch.setenv("PANOPTIC_CUDA_GRAPHS", "0")
    eager = predictor(weights_file, "cuda", precision, batch_size=2)
    assert eager._graphs is None
    monkeypatch.setenv("PANOPTIC_CUDA_GRAPHS", "1")
    graphed = predictor(weights_file, "cuda", precision, batch_size=2)
    # Four batches of one shape (images 0 and 2 are both 640×480), each different from the last.
    a, b = images[0], images[2]
    batches = [[a, b], [b, a], [a, a], [b, b]]
    expected = [r for b in batches for r in eager.predict(b)]
    got = [r for results in graphed.predict_batches(batches) for r in results]
    assert graphed._graphs.captures == 1 and graphed._graphs.replays >= 2
    for e, g in zip(expected, got):
        print(f"{precision} graph vs eager: {agreement(e, g):.4%} of pixels agree")
        assert agreement(e, g) > 0.999
        assert len(g["segments_info"]) == len(e["segments_info"])
    graphed.close()
    assert len(graphed._graphs) == 0
