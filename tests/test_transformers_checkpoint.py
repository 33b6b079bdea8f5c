"""transformers `DetrForSegmentation` checkpoints, with transformers itself as the oracle.

A randomly initialised DetrForSegmentation (no hub access: use_pretrained_backbone=False) gets
informative weights (a random DETR collapses: every query alike, see CONTRACTS.md), is saved with
`save_pretrained`, loaded through `--weights FOLDER`, and must give transformers' own class logits,
boxes and mask logits on the same padded batch. transformers and timm are test dependencies only.
"""

from __future__ import annotations

import json
import os
import shutil

import boto3
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DetrConfig, DetrForSegmentation, ResNetConfig

from tests.test_cli import panoptic_batch
from worker.config import ModelConfig
from worker.labels import coco_label_map
from worker.model import WeightsError, create_model
from worker.model.transformers_checkpoint import CheckpointError, architecture, label_map
from worker.predictor import Predictor
from worker.weights_source import WeightsUnavailable, describe_weights

SIZE = (96, 128)
SMALL = (64, 96)          # the second image, padded to SIZE: padding reaches every stage
CUSTOM = {i: f"part-{i}" for i in range(20)}


def _informative(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights under which queries, heads and layers differ (so that a mix-up of any two shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            backbone = ".backbone." in name
            if leaf == "running_mean":
                value = torch.randn(tensor.shape, generator=g) * 0.1
            elif leaf == "running_var":
                value = torch.rand(tensor.shape, generator=g) + 0.5
            elif tensor.dim() == 1 and leaf == "weight":       # batch, layer and group norm scales
                value = torch.rand(tensor.shape, generator=g) + 0.5
            elif leaf == "bias":
                value = torch.randn(tensor.shape, generator=g) * 0.1
            elif backbone:
                continue                                       # the backbone's own (He) initialisation
            else:
                fan_in = tensor[0].numel() if tensor.dim() > 1 else 1
                value = torch.randn(tensor.shape, generator=g) * (1.0 if "query_position" in name else fan_in ** -0.5)
            tensor.copy_(value)
        state = model.state_dict()
        for name, tensor in state.items():                           # queries attend to distinct places
            if ".decoder." in name and ("encoder_attn.q_proj.weight" in name or "encoder_attn.k_proj.weight" in name):
                tensor.mul_(3)
        state["detr.model.query_position_embeddings.weight"].mul_(3)
        state["detr.class_labels_classifier.weight"].mul_(10)       # confident, varied class probabilities
        for name in ("q_proj", "k_proj"):                            # a sharp query attention in the mask branch
            state[f"bbox_attention.{name}.weight"].mul_(5)
        state["mask_head.conv1.conv.weight"][:, 256:] *= 100        # whose maps weigh in the mask head
        for stage in range(3):
            state[f"mask_head.fpn_stages.{stage}.fpn_adapter.weight"].mul_(0.1)


def _calibrate_batch_norms(model: DetrForSegmentation) -> None:
    """Set every frozen batch norm's statistics to those of its input on the test batch, as a
    trained one's: else the random backbone's features lose their spatial structure, the decoder's
    cross-attention sees the same everywhere and every query decodes alike."""
    def calibrate(module, args):
        module.running_mean.copy_(args[0].mean((0, 2, 3)))
        module.running_var.copy_(args[0].var((0, 2, 3)))

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules()
             if type(m).__name__ == "DetrFrozenBatchNorm2d"]
    images, mask = _padded_batch()
    with torch.no_grad():
        model(pixel_values=images, pixel_mask=(~mask).long())
    for hook in hooks:
        hook.remove()


def _save(folder, config: DetrConfig, seed: int, safe: bool = True) -> DetrForSegmentation:
    torch.manual_seed(seed)
    model = DetrForSegmentation(config).eval()
    _informative(model, seed)
    _calibrate_batch_norms(model)
    model.save_pretrained(folder, safe_serialization=safe)
    return model


def _resnet_config(**settings) -> DetrConfig:
    backbone = ResNetConfig(depths=[3, 4, 6, 3], layer_type="bottleneck", hidden_sizes=[256, 512, 1024, 2048],
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    return DetrConfig(use_timm_backbone=False, backbone_config=backbone, **settings)


CASES = {
    # transformers' own ResNet-50, 20 classes of its own, model.safetensors
    "resnet50": ("detr-r50", lambda: _resnet_config(num_labels=20, id2label=CUSTOM), True),
    # timm's ResNet-50 with dilation (DC5), as the converted official checkpoints; pytorch_model.bin
    "timm-resnet50-dc5": ("detr-r50-dc5", lambda: DetrConfig(use_timm_backbone=True, backbone="resnet50",
                                                             dilation=True, num_labels=250), False),
}


_BUILT: dict[str, tuple] = {}


def _case(name: str, tmp_path_factory) -> tuple[str, object, DetrForSegmentation]:
    """(variant, checkpoint folder, transformers' model) of a case, built once per session."""
    if name not in _BUILT:
        variant, make_config, safe = CASES[name]
        folder = tmp_path_factory.mktemp(name)
        _BUILT[name] = (variant, folder, _save(folder, make_config(), seed=len(name), safe=safe))
    return _BUILT[name]


@pytest.fixture(params=list(CASES))
def saved(request, tmp_path_factory):
    return _case(request.param, tmp_path_factory)


@pytest.fixture
def own_categories(tmp_path_factory):
    return _case("resnet50", tmp_path_factory)


def _padded_batch():
    images = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, *SIZE, dtype=torch.bool)
    mask[1, SMALL[0]:, :] = True
    mask[1, :, SMALL[1]:] = True
    images[1][:, mask[1]] = 0.0
    return images, mask


def test_outputs_equal_transformers_forward(saved):
    variant, folder, theirs = saved
    ours = create_model(variant, weights=str(folder))
    images, mask = _padded_batch()
    with torch.no_grad():
        expected = theirs(pixel_values=images, pixel_mask=(~mask).long())
        actual = ours(images, mask)
    pairs = {"pred_logits": expected.logits, "pred_boxes": expected.pred_boxes, "pred_masks": expected.pred_masks}
    for key, e in pairs.items():
        a = actual[key]
        assert a.shape == e.shape, key
        scale = e.abs().max().item()
        assert torch.isfinite(e).all() and scale > 0
        assert (a - e).abs().max().item() <= 1e-4 * scale, key
    # the comparison is informative: queries differ far above the tolerance (a mix-up would show)
    assert expected.pred_masks[0].std(dim=0).mean() > 1e-3 * expected.pred_masks.abs().max()
    assert expected.logits[0].std(dim=0).mean() > 0.1


def test_label_map_comes_from_id2label(saved):
    variant, folder, theirs = saved
    predictor = Predictor(ModelConfig(model=variant, weights=str(folder), device="cpu"))
    names = theirs.config.id2label
    assert len(predictor.label_map) == len(names) and predictor.model.num_classes == len(names)
    assert all(predictor.label_map.name(i) == name and predictor.label_map.isthing(i) for i, name in names.items())
    assert predictor.model_info["label_map_sha256"] == predictor.label_map.sha256 != coco_label_map().sha256


def test_s3_prefix_loads_like_the_folder(own_categories, s3_bucket):
    variant, folder, _ = own_categories
    s3 = boto3.client("s3")
    for path in folder.iterdir():
        s3.upload_file(str(path), s3_bucket, f"models/parts/{path.name}")
    local = create_model(variant, weights=str(folder))
    for prefix in (f"s3://{s3_bucket}/models/parts", f"s3://{s3_bucket}/models/parts/"):
        remote = create_model(variant, weights=prefix)
        assert remote.weights_sha256 == local.weights_sha256
        assert remote.label_map.sha256 == local.label_map.sha256
        assert all(torch.equal(v, local.state_dict()[k]) for k, v in remote.state_dict().items())
        # what `submit` sees without torch: the same label map, the files' hashes
        described = describe_weights(prefix, variant)
        assert described.label_map == local.label_map and described.num_classes == local.num_classes
        assert described.identity.startswith(f"sha256:{local.weights_sha256}+config:")
    with pytest.raises(WeightsError, match="models/nothing.*(no such|NoSuchKey|404)"):
        create_model(variant, weights=f"s3://{s3_bucket}/models/nothing")
    with pytest.raises(WeightsUnavailable, match="cannot read --weights .*models/nothing"):
        describe_weights(f"s3://{s3_bucket}/models/nothing", variant)
    with pytest.raises(WeightsError, match="has no config.json"):
        create_model(variant, weights=f"s3://{s3_bucket}/models/nothing/")


def test_other_model_option_is_refused_with_the_right_one(saved):
    variant, folder, _ = saved
    other = "detr-r101"
    with pytest.raises(WeightsError, match=f"is a {variant} checkpoint.*pass --model {variant}"):
        create_model(other, weights=str(folder))


def test_id2label_of_the_coco_categories_is_the_coco_label_map():
    id2label = {str(i): "N/A" for i in range(250)}
    id2label.update({str(c.id): c.name for c in coco_label_map().categories})
    assert label_map({"id2label": id2label}, "config.json") is coco_label_map()
    own = label_map({"id2label": {"0": "N/A", "1": "crate", "2": "road"}}, "config.json")
    assert [(c.id, c.name, c.isthing) for c in own.categories] == [(1, "crate", True), (2, "road", True)]
    assert label_map({}, "config.json") is None


@pytest.mark.parametrize("change, message", [
    ({"position_embedding_type": "learned"}, "position_embedding_type = 'learned' is not supported"),
    ({"d_model": 512}, "d_model = 512 is not supported"),
    ({"architectures": ["DetrForObjectDetection"]}, "needs DetrForSegmentation"),
    ({"model_type": "conditional_detr"}, "not a DETR checkpoint"),
    ({"backbone_config": None, "use_timm_backbone": True, "backbone": "resnet18"}, "timm backbone 'resnet18'"),
    ({"backbone_config": None, "use_timm_backbone": True, "backbone": "resnet101", "dilation": True},
     "dilated \\(DC5\\) ResNet-101 is not supported"),
    ({"backbone_config": {"model_type": "resnet", "depths": [2, 2, 2, 2]}}, "ResNet depths \\[2, 2, 2, 2\\]"),
    ({"backbone_config": {"model_type": "resnet", "depths": [3, 4, 6, 3], "downsample_in_bottleneck": True}},
     "downsample_in_bottleneck = True is not supported"),
    ({"backbone_config": {"model_type": "resnet", "depths": [3, 4, 6, 3]}, "dilation": True},
     "dilation \\(DC5\\) with transformers' own ResNet is not supported"),
    ({"backbone_config": {"model_type": "swin"}}, "backbone 'swin' is not supported"),
    ({"use_timm_backbone": False}, "backbone \\(no backbone_config\\) is not supported"),
])
def test_unsupported_configurations_are_refused_with_the_setting(change, message):
    config = {"model_type": "detr", "architectures": ["DetrForSegmentation"], "use_timm_backbone": True,
              "backbone": "resnet50", **change}
    with pytest.raises(CheckpointError, match=message):
        architecture(config, "config.json")
    # the supported ones
    assert architecture({"model_type": "detr", "backbone": "resnet101"}, "c").depth == 101
    assert architecture({"model_type": "detr", "backbone_config": {"model_type": "timm_backbone",
                                                                   "backbone": "resnet50", "output_stride": 16}},
                        "c").dilation


def test_folder_problems_are_explained(saved, tmp_path):
    variant, folder, _ = saved
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="has no config.json"):
        create_model(variant, weights=str(empty))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(folder / "config.json", no_weights)
    with pytest.raises(WeightsError, match="has no model.safetensors or pytorch_model.bin"):
        create_model(variant, weights=str(no_weights))
    learned = tmp_path / "learned"
    shutil.copytree(folder, learned)
    config = json.loads((learned / "config.json").read_text())
    (learned / "config.json").write_text(json.dumps(dict(config, position_embedding_type="learned")))
    with pytest.raises(WeightsError, match="learned"):
        create_model(variant, weights=str(learned))


def test_predict_and_jobs_use_the_checkpoints_categories(own_categories, tmp_path):
    variant, folder, _ = own_categories
    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(tmp_path / "in" / "a.png")
    options = ["--model", variant, "--weights", str(folder), "--min-size", "64", "--max-size", "96", "--threshold", "0"]
    result = panoptic_batch("predict", str(tmp_path / "in" / "a.png"), "--out", str(tmp_path / "pred"), *options)
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "pred" / "a.json").read_text())
    assert document["segments_info"], "threshold 0 keeps queries"
    for segment in document["segments_info"]:
        assert 0 <= segment["category_id"] < 20
        assert segment["category_name"] == CUSTOM[segment["category_id"]] and segment["isthing"] is True
    # a job of the folder records its id2label as the job's label map: the same result, the same names in stats
    env = {k: v for k, v in os.environ.items() if k != "PANOPTIC_DATABASE_URL"}
    result = panoptic_batch("run", "in", "--dest", "out", *options, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "a.json").read_text())["segments_info"] == document["segments_info"]
    stats = panoptic_batch("stats", result.stdout.strip().splitlines()[-1], "--json", env=env, cwd=tmp_path)
    assert {(r["category_id"], r["category_name"]) for r in json.loads(stats.stdout)} == \
        {(s["category_id"], s["category_name"]) for s in document["segments_info"]}


@pytest.mark.parametrize("timm", [True, False], ids=["timm", "transformers-resnet"])
def test_resnet101_checkpoints_load_strictly(tmp_path, timm):
    """ResNet-101 (23 blocks in stage 3) of either kind: every parameter lands in detr-r101."""
    if timm:
        config = DetrConfig(use_timm_backbone=True, backbone="resnet101", num_labels=250)
    else:
        config = _resnet_config(num_labels=250)
        config.backbone_config.depths = [3, 4, 23, 3]
    torch.manual_seed(0)
    theirs = DetrForSegmentation(config).eval()
    theirs.save_pretrained(tmp_path)
    ours = create_model("detr-r101", weights=str(tmp_path)).state_dict()
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in theirs.state_dict().values()
                                                         if v.is_floating_point())
    prefix = "detr.model.backbone.model." + ("layer3.22.conv2" if timm else "encoder.stages.2.layers.22.layer.1.convolution")
    assert torch.equal(ours["detr.backbone.0.body.layer3.22.conv2.weight"], theirs.state_dict()[prefix + ".weight"])


def test_same_panoptic_result_as_transformers_where_the_postprocessors_agree():
    """transformers' post_process_panoptic_segmentation differs from DETR's (it resizes score-weighted
    mask probabilities to the target size and drops segments by overlap, not by area), but on masks
    that split the image into blocks with clear margins, at the processed size, both must give the
    same partition and classes, with the label map's stuff fused (label_ids_to_fuse)."""
    from transformers import DetrImageProcessor
    from transformers.models.detr.modeling_detr import DetrSegmentationOutput

    from worker.labels import LabelMap
    from worker.postprocess import panoptic_postprocess

    label_map = LabelMap.from_categories([{"id": i, "name": f"c{i}", "isthing": int(i % 3 != 0)} for i in range(20)])
    stuff = {c.id for c in label_map.categories if not c.isthing}
    # six 10×10 blocks of the 20×30 mask grid: (query, class) per block; 3 and 9 are stuff
    blocks = [(0, 1), (2, 3), (5, 3), (6, 1), (7, 9), (8, 4)]
    logits = torch.zeros(1, 10, 21)
    logits[0, :, 20] = 12.0                                   # "no object" unless chosen below
    masks = torch.full((1, 10, 20, 30), -20.0)
    for position, (query, category) in enumerate(blocks):
        logits[0, query] = 0.0
        logits[0, query, category] = 12.0 + 0.1 * position
        row, col = divmod(position, 3)
        masks[0, query, row * 10:(row + 1) * 10, col * 10:(col + 1) * 10] = 20.0
    size = (80, 120)
    ours = panoptic_postprocess({"pred_logits": logits, "pred_boxes": torch.zeros(1, 10, 4), "pred_masks": masks},
                                [size], [size], threshold=0.85, label_map=label_map)[0]
    theirs = DetrImageProcessor().post_process_panoptic_segmentation(
        DetrSegmentationOutput(logits=logits, pred_masks=masks), threshold=0.85, label_ids_to_fuse=stuff,
        target_sizes=[size])[0]
    segmentation = theirs["segmentation"].numpy()
    pairs = np.unique(np.stack([ours["id_map"].ravel(), segmentation.ravel()], 1), axis=0)
    assert len(pairs) == len(set(pairs[:, 0])) == len(set(pairs[:, 1])) == 5    # 6 blocks, stuff 3 fused
    their_labels = {s["id"]: s["label_id"] for s in theirs["segments_info"]}
    our_segments = {s["id"]: s for s in ours["segments_info"]}
    for our_id, their_id in pairs.tolist():
        assert our_segments[our_id]["category_id"] == their_labels[their_id]
        assert our_segments[our_id]["isthing"] is (their_labels[their_id] not in stuff)
