"""Checkpoints with their own classes: the class head's size from the checkpoint, safetensors files,
the label-map/head check, and `predict --categories` end to end with a 20-category model (jobs with
such a model: tests/test_job_label_maps.py)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.test_cli import panoptic_batch
from tests.twenty_classes import CATEGORIES, NUM_CLASSES, VARIANT, WATER
from worker.config import ModelConfig
from worker.labels import LabelMap, LabelMapError
from worker.model import WeightsError, create_model
from worker.predictor import Predictor


@pytest.fixture(autouse=True)
def private_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def test_head_size_comes_from_the_checkpoint(twenty_classes):
    path, state, _ = twenty_classes
    model = create_model(VARIANT, weights=str(path))
    assert model.num_classes == NUM_CLASSES and model.label_map is None
    assert model.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out["pred_logits"].shape == (1, 100, NUM_CLASSES + 1)
    assert (out["pred_logits"].argmax(-1) == WATER).all()


def test_safetensors_checkpoint_loads_like_the_pth(twenty_classes, tmp_path):
    _, state, _ = twenty_classes
    path = tmp_path / "detr-r50-parts.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = create_model(VARIANT, weights=str(path))
    assert model.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    renamed = tmp_path / "weights.bin"           # recognised by content, not by name
    renamed.write_bytes(path.read_bytes())
    assert create_model(VARIANT, weights=str(renamed)).weights_sha256 == model.weights_sha256


def test_corrupt_safetensors_is_refused(twenty_classes, tmp_path):
    _, state, _ = twenty_classes
    path = tmp_path / "cut.safetensors"
    save_file({"detr.query_embed.weight": state["detr.query_embed.weight"]}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="not a loadable safetensors file"):
        create_model(VARIANT, weights=str(path))


def _config(path, categories=None) -> ModelConfig:
    return ModelConfig(model=VARIANT, weights=str(path), categories=categories and str(categories),
                       device="cpu", threshold=0.5, min_size=64, max_size=96)


def test_predictor_checks_the_label_map_against_the_head(twenty_classes, tmp_path):
    path, _, categories = twenty_classes
    with pytest.raises(LabelMapError, match=r"predict category ids 0\.\.20, but the label map .*names id 200"
                                            r".*--categories"):
        Predictor(_config(path))                                     # the COCO default does not fit
    beyond = tmp_path / "beyond.json"
    beyond.write_text(json.dumps(CATEGORIES + [{"id": 30, "name": "extra", "isthing": 1}]))
    with pytest.raises(LabelMapError, match="names id 30"):
        Predictor(_config(path, beyond))
    short = tmp_path / "short.json"
    short.write_text(json.dumps(CATEGORIES[:10]))
    with pytest.raises(LabelMapError, match="ends at id 10"):
        Predictor(_config(path, short))
    predictor = Predictor(_config(path, categories))
    assert predictor.label_map.sha256 == LabelMap.load(categories).sha256
    assert predictor.model_info["label_map_sha256"] == predictor.label_map.sha256


def test_predict_with_categories_end_to_end(twenty_classes, tmp_path):
    path, _, categories = twenty_classes
    image = tmp_path / "in" / "scene.jpg"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    result = panoptic_batch("predict", str(image), "--out", str(out), "--model", VARIANT, "--weights", str(path),
                            "--categories", str(categories), "--min-size", "64", "--max-size", "96",
                            "--threshold", "0.5")
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "scene.json").read_text())
    # every query predicts id 15, "water", stuff in this map: its queries form one segment
    assert [(s["category_id"], s["category_name"], s["isthing"], s["area"]) for s in document["segments_info"]] \
        == [(WATER, "water", False, 60 * 90)]
    assert document["model"]["label_map_sha256"] == LabelMap.load(categories).sha256
    assert document["model"]["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_predict_refuses_a_head_that_is_not_coco_without_categories(twenty_classes, tmp_path):
    path, _, _ = twenty_classes
    image = tmp_path / "scene.png"
    Image.new("RGB", (40, 30)).save(image)
    result = panoptic_batch("predict", str(image), "--out", str(tmp_path / "out"), "--model", VARIANT,
                            "--weights", str(path), "--min-size", "64", "--max-size", "96")
    assert result.returncode != 0
    assert "--categories" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "scene.json").exists()


def test_predict_refuses_a_bad_label_map_before_loading_the_model(tmp_path):
    bad = tmp_path / "cats.json"
    bad.write_text(json.dumps([{"id": 1, "name": "a", "isthing": 1}, {"id": 1, "name": "b", "isthing": 0}]))
    image = tmp_path / "scene.png"
    Image.new("RGB", (40, 30)).save(image)
    result = panoptic_batch("predict", str(image), "--out", str(tmp_path / "out"), "--weights", "official",
                            "--categories", str(bad))           # official: would need a download
    assert result.returncode != 0
    assert "category id 1 appears more than once" in result.stderr and "Traceback" not in result.stderr
