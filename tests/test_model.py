"""The DETR panoptic model against the official checkpoint layout and an independent reference.

`tests/reference_detr.py` recomputes the original forward pass functionally from a state dict.
Seeded random weights are nearly useless for such a comparison (every query decodes to almost the
same output, so a bug that mixes queries up would go unnoticed), so each variant first gets
*informative* weights, deterministically: frozen batch norms calibrated on the test images so the
backbone keeps spatial structure, randomised layer/group norm affines and biases, and a sharper,
louder, centred query attention in the mask branch (see `informative_weights`). They are loaded,
strictly, as a dict laid out like the official checkpoint.

Every variant is built once (module-scoped fixture) and the shared forward passes are cached.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image

from tests import reference_detr as R
from tests.paths import TEST_DATA
from worker.model import create_model, kept_queries

LAYOUTS = TEST_DATA / "checkpoint-layouts"

DILATION = {"detr-r50": False, "detr-r50-dc5": True, "detr-r101": False}
NO_OBJECT = 250

# A padded batch: image 0 is 96x128, image 1 is 64x96 padded (zeros) to 96x128, so its padding
# reaches every stage, including the stride-32 (and stride-16 DC5) memory the transformer sees.
SIZE = (96, 128)
SMALL = (64, 96)


def _images(seed: int, n: int, size=SIZE) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = _images(10, 2)
    mask = torch.zeros(2, *SIZE, dtype=torch.bool)
    mask[1, SMALL[0]:, :] = True
    mask[1, :, SMALL[1]:] = True
    images[1][:, mask[1]] = 0.0
    return images, mask


def read_layout(variant: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key → (dtype name, shape) from tests/data/checkpoint-layouts/<variant>-panoptic.state_dict.tsv."""
    path = LAYOUTS / f"{variant}-panoptic.state_dict.tsv"
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["key", "dtype", "shape"]
    layout = {}
    for line in lines[1:]:
        key, dtype, shape = line.split("\t")
        layout[key] = (dtype, tuple(int(d) for d in shape.split("x")) if shape else ())
    return layout


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def informative_weights(seeded: dict[str, torch.Tensor], dilation: bool, seed: int = 1234,
                        mask_gain: float = 100.0, attention_gain: float = 5.0) -> dict[str, torch.Tensor]:
    """Deterministic perturbation of seeded weights so that outputs differ across queries.

    Random perturbations first; then calibration on the padded test batch, with the reference's
    own functions: frozen BN statistics set to those of their inputs (a trained BN removes each
    channel's mean, so the backbone keeps spatial structure instead of collapsing to biases),
    the mask attention's query bias set to centre q over the queries (so the attention maps show
    what differs between queries rather than what they share), and the "no object" bias set so
    that it is the best class for about half of the queries.
    """
    g = torch.Generator().manual_seed(seed)

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    def normal(shape, std):
        return std * torch.randn(shape, generator=g)

    sd = {k: v.detach().clone() for k, v in seeded.items()}
    for key, value in sd.items():
        if key.startswith("detr.backbone."):
            continue  # calibrated below
        if key.startswith("mask_head.gn") or (key.startswith("detr.transformer.") and ".norm" in key):
            sd[key] = uniform(value.shape, 0.5, 1.5) if key.endswith(".weight") else normal(value.shape, 0.2)
        elif key.endswith(".bias"):
            sd[key] = value + normal(value.shape, 0.05)
        if key.startswith("detr.transformer.decoder.") and key.endswith("multihead_attn.in_proj_weight"):
            sd[key][:512] *= 3                           # queries attend to distinct places
    sd["detr.query_embed.weight"] *= 3
    sd["detr.class_embed.weight"] *= 10                  # confident, varied class probabilities
    sd["bbox_attention.q_linear.weight"] *= attention_gain
    sd["bbox_attention.k_linear.weight"] *= attention_gain
    sd["mask_head.lay1.weight"][:, 256:] *= mask_gain    # the attention maps weigh in the mask head
    for adapter in ("adapter1", "adapter2", "adapter3"):
        sd[f"mask_head.{adapter}.weight"] *= 0.1

    def calibrating_norm(x, _sd, prefix):
        """Frozen BN whose statistics are those of its input (like a trained BN), random affine."""
        channels = x.shape[1]
        sd[prefix + ".running_mean"] = x.mean((0, 2, 3))
        sd[prefix + ".running_var"] = x.var((0, 2, 3))
        residual_branch_end = prefix.endswith((".bn3", ".downsample.1"))
        sd[prefix + ".weight"] = uniform((channels,), 0.5, 1.5) * (0.5 if residual_branch_end else 1.0)
        sd[prefix + ".bias"] = normal((channels,), 0.1)
        return R.frozen_batch_norm(x, sd, prefix)

    with torch.no_grad():
        images, pixel_mask = padded_batch()
        stages = R.resnet_stages(sd, images, dilation, norm=calibrating_norm)
        mask = R.downsample_mask(pixel_mask, stages[-1].shape[-2:])
        src = torch.nn.functional.conv2d(stages[-1], sd["detr.input_proj.weight"], sd["detr.input_proj.bias"])
        hs, _ = R.transformer(sd, src, mask, R.sine_positions(mask, src.dtype))
        q = R.linear(hs, sd, "bbox_attention.q_linear")
        sd["bbox_attention.q_linear.bias"] -= q.mean((0, 1))
        logits = R.linear(hs, sd, "detr.class_embed")
        margin = logits[..., :NO_OBJECT].max(-1).values - logits[..., NO_OBJECT]
        sd["detr.class_embed.bias"][NO_OBJECT] += margin.flatten().median()
    return sd


@dataclass
class Variant:
    name: str
    dilation: bool
    model: torch.nn.Module
    weights: dict[str, torch.Tensor]         # informative weights, loaded into `model`
    layout: dict[str, tuple[str, tuple[int, ...]]]
    cache: dict = field(default_factory=dict)

    def forward(self, images, mask):
        with torch.no_grad():
            return self.model(images, mask)

    def double_model(self) -> torch.nn.Module:
        """A float64 copy of the model (the contract: `.double()` works with float64 inputs)."""
        if "double" not in self.cache:
            self.cache["double"] = copy.deepcopy(self.model).double()
        return self.cache["double"]

    def padded_outputs(self):
        """(model, reference) outputs on the padded batch, computed once."""
        if "padded" not in self.cache:
            images, mask = padded_batch()
            self.cache["padded"] = (self.forward(images, mask),
                                    R.panoptic_forward(self.weights, images, mask, self.dilation))
        return self.cache["padded"]


@pytest.fixture(scope="module", params=list(DILATION))
def variant(request) -> Variant:
    name = request.param
    model = create_model(name)
    layout = read_layout(name)
    weights = informative_weights(model.state_dict(), DILATION[name])
    # Load the weights strictly, as a dict laid out like the official checkpoint (its key order).
    checkpoint = {key: weights[key] for key in layout if key in weights}
    model.load_state_dict(checkpoint, strict=True)
    return Variant(name, DILATION[name], model, weights, layout)


def _scale(t: torch.Tensor) -> float:
    return max(t.abs().max().item(), 1e-6)


def assert_outputs_close(actual: dict, expected: dict, rel: float, keys=("pred_logits", "pred_boxes", "pred_masks")):
    for key in keys:
        a, e = actual[key], expected[key]
        assert a.shape == e.shape, key
        diff = (a - e).abs().max().item()
        assert diff <= rel * _scale(e), f"{key}: max abs diff {diff:.3g} (output scale {_scale(e):.3g})"


# --------------------------------------------------------------------------- 1. layout

def test_state_dict_layout_matches_official_checkpoint(variant: Variant):
    actual = {k: (_dtype_name(v), tuple(v.shape)) for k, v in variant.model.state_dict().items()}
    expected = variant.layout
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    misfit = sorted(k for k in set(actual) & set(expected) if actual[k] != expected[k])
    assert not missing and not unexpected and not misfit, (
        f"missing {missing[:5]}, unexpected {unexpected[:5]}, "
        f"wrong dtype/shape {[(k, actual[k], expected[k]) for k in misfit[:5]]}")
    # A dict with exactly the official keys, dtypes and shapes loads strictly…
    checkpoint = {key: torch.zeros(shape, dtype=getattr(torch, dtype)) for key, (dtype, shape) in expected.items()}
    probe = copy.deepcopy(variant.model)
    result = probe.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    del probe
    # …and the fixture's strict load really put the informative weights in place.
    state = variant.model.state_dict()
    assert all(torch.equal(state[k], variant.weights[k]) for k in expected)


def test_strict_load_rejects_other_layouts(variant: Variant):
    probe = copy.deepcopy(variant.model)
    broken = dict(variant.weights)
    broken.pop("detr.query_embed.weight")
    with pytest.raises(RuntimeError, match="query_embed"):
        probe.load_state_dict(broken, strict=True)


# --------------------------------------------------------------------------- 2. reference

def test_informative_weights_make_queries_differ(variant: Variant):
    out, _ = variant.padded_outputs()
    for b in range(2):
        assert out["pred_masks"][b].std(dim=0).mean().item() > 5e-3, "masks barely depend on the query"
        assert out["pred_logits"][b].std(dim=0).mean().item() > 1e-2
        assert out["pred_boxes"][b].std(dim=0).mean().item() > 1e-4
    labels = out["pred_logits"].argmax(-1)
    assert (labels == NO_OBJECT).any() and (labels != NO_OBJECT).any()


def test_matches_reference_on_padded_batch_float32(variant: Variant):
    out, ref = variant.padded_outputs()
    assert out["pred_masks"].shape == (2, 100, SIZE[0] // 4, SIZE[1] // 4)
    assert out["pred_logits"].shape == (2, 100, 251) and out["pred_boxes"].shape == (2, 100, 4)
    assert_outputs_close(out, ref, rel=1e-4)


def test_matches_reference_on_odd_sized_padded_batch(variant: Variant):
    """Sizes that are not multiples of 32: rounding of every stage's size, nearest resizing of the
    mask and of the mask head's FPN steps (not exact doublings here)."""
    images = _images(40, 2, (75, 101))
    mask = torch.zeros(2, 75, 101, dtype=torch.bool)
    mask[0, 61:, :] = True
    mask[0, :, 83:] = True
    images[0][:, mask[0]] = 0.0
    out = variant.forward(images, mask)
    assert out["pred_masks"].shape == (2, 100, 19, 26)                 # ceil(H/4), ceil(W/4)
    assert_outputs_close(out, R.panoptic_forward(variant.weights, images, mask, variant.dilation), rel=1e-4)


def test_matches_reference_float64(variant: Variant):
    images, mask = padded_batch()
    with torch.no_grad():
        out = variant.double_model()(images.double(), mask)
    assert out["pred_masks"].dtype == torch.float64
    weights = {k: v.double() for k, v in variant.weights.items()}
    ref = R.panoptic_forward(weights, images.double(), mask, variant.dilation)
    assert_outputs_close(out, ref, rel=1e-10)


# --------------------------------------------------------------------------- 3. batching

def test_same_size_batch_equals_each_image_alone(variant: Variant):
    """Batching changes nothing but rounding. In float32 that rounding is not small: convolutions
    pick other kernels for another batch size, and the reference shows the same ~1e-4 relative
    batch-vs-alone differences; so float32 gets a loose bound and float64 the tight one."""
    images = _images(20, 2)
    no_padding = torch.zeros(2, *SIZE, dtype=torch.bool)
    for model, dtype, rel in ((variant.model, torch.float32, 1e-3), (variant.double_model(), torch.float64, 1e-10)):
        x = images.to(dtype)
        with torch.no_grad():
            together = model(x, no_padding)
            for b in range(2):
                alone = model(x[b:b + 1], no_padding[b:b + 1])
                assert_outputs_close({k: v[b:b + 1] for k, v in together.items()}, alone, rel=rel)


# --------------------------------------------------------------------------- 4. pruning

def _threshold_between(probabilities: torch.Tensor) -> float:
    """A threshold strictly between the middle two of the (real-class) probabilities, with margin."""
    values = probabilities.flatten().sort().values
    gaps = values[1:] - values[:-1]
    # the widest gap among the middle half, so that some but not all queries pass
    lo = len(values) // 4
    hi = max(len(values) * 3 // 4, lo + 1)
    i = lo + int(gaps[lo:hi].argmax())
    assert gaps[i] > 1e-5, "probabilities too close to split"
    return float((values[i] + values[i + 1]) / 2)


@pytest.mark.parametrize("chunk", [32, 2])   # chunks spanning both images; chunks of one image each
def test_forward_kept_gives_the_full_pass_masks_of_kept_queries(variant: Variant, chunk: int, monkeypatch):
    import worker.model.segmentation as segmentation
    monkeypatch.setattr(segmentation, "MASK_HEAD_CHUNK", chunk)
    images, mask = padded_batch()
    full, _ = variant.padded_outputs()
    probs, labels = full["pred_logits"].softmax(-1).max(-1)
    real = labels != NO_OBJECT
    threshold = _threshold_between(probs[real])
    with torch.no_grad():
        pruned = variant.model.forward_kept(images, mask, threshold)

    rule = real & (probs > threshold)
    assert 0 < int(rule.sum()) < int(real.sum())                       # some but not all kept
    assert (labels == NO_OBJECT).any()                                  # and "no object" ones exist
    assert torch.equal(pruned["keep"], rule)
    assert torch.equal(pruned["keep"], kept_queries(full["pred_logits"], threshold))
    assert torch.equal(pruned["pred_logits"], full["pred_logits"])
    assert torch.equal(pruned["pred_boxes"], full["pred_boxes"])
    kept = pruned["kept_masks"]
    assert kept.shape == (int(rule.sum()), SIZE[0] // 4, SIZE[1] // 4)
    expected = full["pred_masks"][rule]                                 # (image, query) order
    diff = (kept - expected).abs().max().item()
    assert diff <= 1e-5 * _scale(expected), f"max abs diff {diff:.3g}"


def test_forward_kept_with_nothing_kept(variant: Variant):
    images, mask = padded_batch()
    with torch.no_grad():
        pruned = variant.model.forward_kept(images, mask, 1.0)
    assert not pruned["keep"].any()
    assert pruned["kept_masks"].shape == (0, SIZE[0] // 4, SIZE[1] // 4)


def test_a_detector_that_cannot_be_captured_runs_eagerly_with_the_same_results(variant: Variant, caplog):
    """worker.cuda_graphs' fallback: a shape whose capture fails (here: no CUDA at all) is run
    eagerly, gives `detect`'s results, is tried once and then never again (one warning)."""
    import contextlib

    from worker.cuda_graphs import DetectorGraphs
    images, mask = padded_batch()
    graphs = DetectorGraphs(variant.model, contextlib.nullcontext)
    with torch.no_grad():
        expected = variant.model.detect(images, mask, 0.5)
        passes = [graphs(images, mask, 0.5) for _ in range(3)]        # the 2nd would capture
    assert graphs.captures == 0 and len(graphs) == 0
    assert sum("CUDA graph capture failed" in r.getMessage() for r in caplog.records) == 1
    for got in passes:
        assert torch.equal(got.keep, expected.keep)
        assert torch.equal(got.pred_logits, expected.pred_logits)
        assert torch.equal(got.attention, expected.attention)
        assert all(torch.equal(a, b) for a, b in zip(got.laterals, expected.laterals))


def test_a_shape_refused_for_short_device_memory_is_tried_again_later(caplog, monkeypatch):
    """worker.cuda_graphs: a capture refused because the card's memory is short is not given up
    for good (unlike a capture that fails): the shape is tried again when it repeats, and the
    refusal is logged once. The count of shapes remembered stays bounded. (The policy does not
    depend on the model: a stand-in detector whose passes are counted.)"""
    import contextlib
    import logging

    from worker import cuda_graphs

    class CountedDetector:
        passes = 0

        def detect(self, images, padding_mask, threshold):
            self.passes += 1
            return images.sum()

    images, mask = torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool)
    free = {"bytes": 1}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 100))
    detector = CountedDetector()
    graphs = cuda_graphs.DetectorGraphs(detector, contextlib.nullcontext)
    caplog.set_level(logging.INFO, logger=cuda_graphs.__name__)
    for _ in range(3):                                  # seen twice and thrice: refused, no capture tried
        graphs(images, mask, 0.5)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("not capturing a CUDA graph" in m for m in messages) == 1
    assert not any("capture failed" in m for m in messages) and detector.passes == 3
    free["bytes"] = 100                                 # memory freed: the next repeat tries (and, on
    graphs(images, mask, 0.5)                           # the CPU, fails: then never again)
    graphs(images, mask, 0.5)
    assert sum("CUDA graph capture failed" in r.getMessage() for r in caplog.records) == 1
    assert graphs.captures == 0 and detector.passes == 5

    monkeypatch.setattr(cuda_graphs, "MAX_SEEN_SHAPES", 2)
    graphs = cuda_graphs.DetectorGraphs(detector, contextlib.nullcontext)
    for threshold in (0.1, 0.2, 0.3, 0.4):              # the threshold is part of a shape's key
        graphs(images, mask, threshold)
    assert len(graphs._seen) == 2


# --------------------------------------------------------------------------- 5. no padding mask

def test_padding_mask_none_equals_all_false(variant: Variant):
    images = _images(30, 2, SMALL)
    without = variant.forward(images, None)
    with_mask = variant.forward(images, torch.zeros(2, *SMALL, dtype=torch.bool))
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert torch.equal(without[key], with_mask[key]), key


def test_folded_batchnorm_gives_the_same_outputs():
    # The Predictor folds the frozen batch norms into the convolutions (and uses NHWC); the
    # outputs must stay those of the model as loaded, up to float rounding.
    model = create_model("detr-r50", seed=3)
    sd = model.state_dict()
    for key in sd:                           # non-trivial BN statistics, so folding matters
        if key.endswith("running_var"):
            sd[key] = torch.rand_like(sd[key]) + 0.5
        elif key.endswith("running_mean"):
            sd[key] = torch.randn_like(sd[key]) * 0.1
    model.load_state_dict(sd)
    folded = copy.deepcopy(model)
    folded.detr.backbone[0].body.fold_batchnorm()
    folded = folded.to(memory_format=torch.channels_last)
    assert not any(k.endswith("running_var") for k in folded.state_dict())
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True
    with torch.inference_mode():
        expected = model(images, mask)
        actual = folded(images.contiguous(memory_format=torch.channels_last), mask)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-4 * float(expected[key].abs().max()))


def test_the_next_batch_starts_while_the_previous_one_is_postprocessed():
    """Predictor.start_batch returns once the model pass is done; with a postprocessing pool (CUDA
    workers have one) the next batch's model runs while the previous batch is postprocessed, and
    the results are those of one batch at a time."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from worker.predictor import ModelConfig, Predictor

    class HeldPool:
        """Runs nothing until released."""
        def __init__(self):
            self.pool, self.release = ThreadPoolExecutor(2), threading.Event()

        def submit(self, fn, *args):
            return self.pool.submit(lambda: self.release.wait(60) and fn(*args))

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(4)]
    predictor = Predictor(ModelConfig(model="detr-r50", weights="random", threshold=0.0, min_size=64,
                                      max_size=96, device="cpu", batch_size=2))
    expected = [predictor.predict_batch(images[:2]), predictor.predict_batch(images[2:])]
    held = predictor._postprocess_pool = HeldPool()
    first = predictor.start_batch(images[:2])
    second = predictor.start_batch(images[2:])             # the first is still waiting for the pool
    assert not any(f.done() for f in first._futures + second._futures)
    held.release.set()
    for pending, want in zip((first, second), expected):
        got = pending.results()
        assert [r["segments_info"] for r in got] == [r["segments_info"] for r in want]
        assert all(np.array_equal(g["id_map"], w["id_map"]) and g["png"] == w["png"] for g, w in zip(got, want))
    predictor._postprocess_pool = ThreadPoolExecutor(2)
    assert [len(r) for r in predictor.predict_batches([images[:2], images[2:3], images[3:]])] == [2, 1, 1]
    held.pool.shutdown()
    predictor.close()


def test_batch_schedule_hands_back_batches_in_order_and_failures_when_collected():
    """The one batch schedule (worker, run, predict, benchmarks): with a pool, a batch is handed
    back only once the next one has started; a batch whose model pass raised comes back in its
    turn, its results raising that error, and does not stop the batches after it."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.predictor import BatchSchedule, ModelConfig, Predictor

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(3)]
    predictor = Predictor(ModelConfig(model="detr-r50", weights="random", threshold=0.0, min_size=64,
                                      max_size=96, device="cpu", batch_size=2))
    expected = predictor.predict_batch(images[:1])
    schedule = BatchSchedule(predictor)
    assert [tag for tag, _ in schedule.start(images[:1], "a")] == ["a"]      # CPU: done in line
    predictor._postprocess_pool = ThreadPoolExecutor(2)
    ready = schedule.start(images[:1], "b")
    ready += schedule.start([], "broken")             # an empty batch: the model pass raises
    ready += schedule.start(images[1:], "c")
    ready += schedule.drain()
    assert [tag for tag, _ in ready] == ["b", "broken", "c"]
    assert [r["segments_info"] for r in ready[0][1].results()] == [r["segments_info"] for r in expected]
    with pytest.raises(Exception):
        ready[1][1].results()
    assert len(ready[2][1].results()) == 2
    assert schedule.drain() == []
    predictor.close()


def test_pipeline_settings_are_checked(monkeypatch):
    from worker.predictor import batches_in_flight, postprocess_threads

    monkeypatch.delenv("PANOPTIC_BATCHES_IN_FLIGHT", raising=False)
    monkeypatch.delenv("PANOPTIC_POSTPROCESS_THREADS", raising=False)
    assert (batches_in_flight(), postprocess_threads()) == (1, 8)
    monkeypatch.setenv("PANOPTIC_BATCHES_IN_FLIGHT", "3")
    monkeypatch.setenv("PANOPTIC_POSTPROCESS_THREADS", "16")
    assert (batches_in_flight(), postprocess_threads()) == (3, 16)
    for name, read in (("PANOPTIC_BATCHES_IN_FLIGHT", batches_in_flight),
                       ("PANOPTIC_POSTPROCESS_THREADS", postprocess_threads)):
        for bad in ("0", "two", ""):
            monkeypatch.setenv(name, bad)
            with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
                read()


def test_cpu_results_time_the_model_and_the_postprocessing_apart(monkeypatch):
    """Each result's model_ms and postprocess_ms (the JSON's timings, the worker's metrics) are
    the two stages' own times: postprocessing in line on the CPU is not counted as model time."""
    import time as clock

    from worker import postprocess
    from worker.predictor import ModelConfig, Predictor

    slow = postprocess._postprocess_image

    def slower(*args):
        clock.sleep(0.3)
        return slow(*args)

    monkeypatch.setattr(postprocess, "_postprocess_image", slower)
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    predictor = Predictor(ModelConfig(model="detr-r50", weights="random", threshold=0.0, min_size=64,
                                      max_size=96, device="cpu"))
    (result,) = predictor.predict_batch([image])
    assert result["postprocess_ms"] >= 290 and result["model_ms"] > 0
    predictor.close()


def test_batch_schedule_hands_back_its_oldest_batch_early():
    """The worker frees a batch's decoded pixels early (pixel budget) by collecting the oldest
    batch in flight before its turn: take_oldest hands it back once, whole."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from worker.predictor import BatchSchedule, ModelConfig, Predictor

    class HeldPool:
        def __init__(self):
            self.pool, self.release = ThreadPoolExecutor(2), threading.Event()

        def submit(self, fn, *args):
            return self.pool.submit(lambda: self.release.wait(60) and fn(*args))

    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(2)]
    predictor = Predictor(ModelConfig(model="detr-r50", weights="random", threshold=0.0, min_size=64,
                                      max_size=96, device="cpu", batch_size=2))
    held = predictor._postprocess_pool = HeldPool()
    schedule = BatchSchedule(predictor)
    assert schedule.start(images, "x") == []                 # still being postprocessed
    tag, pending = schedule.take_oldest()
    assert tag == "x" and schedule.take_oldest() is None and schedule.drain() == []
    held.release.set()
    assert len(pending.results()) == 2
    held.pool.shutdown()
