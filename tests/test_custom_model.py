"""Checkpoints with their own classes: the class head's size from the checkpoint, safetensors files,
the label-map/head check, and `predict --categories` end to end with a 20-category model."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.test_cli import panoptic_batch
from worker.config import ModelConfig
from worker.labels import LabelMap, LabelMapError
from worker.model import WeightsError, create_model
from worker.predictor import Predictor

VARIANT = "detr-r50"
# Twenty categories with ids 1..20, as a dataset annotated from 1 would have them: DETR then
# builds num_classes = 21 (ids 0..20) and a class head of 22 rows (with "no object").
CATEGORIES = [{"id": i, "name": f"part-{i}", "isthing": int(i <= 12), "color": [10 * i, 255 - 10 * i, 7],
               "supercategory": "parts"} for i in range(1, 21)]
CATEGORIES[15 - 1].update(name="water", isthing=0)          # id 15: stuff
NUM_CLASSES = 21
WATER = 15


@pytest.fixture(autouse=True)
def private_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.fixture(scope="module")
def twenty(tmp_path_factory):
    """(checkpoint path, its state dict, label map path): a 21-id head whose every query is confident
    in id 15, so that the (collapsed) random model's output is known: one "water" segment."""
    folder = tmp_path_factory.mktemp("twenty")
    state = create_model(VARIANT, seed=2, num_classes=NUM_CLASSES).state_dict()
    assert state["detr.class_embed.weight"].shape == (NUM_CLASSES + 1, 256)
    state["detr.class_embed.weight"].mul_(0.01)
    state["detr.class_embed.bias"].zero_()
    state["detr.class_embed.bias"][WATER] = 12.0
    path = folder / "detr-r50-parts.pth"
    torch.save({"model": state}, path)
    categories = folder / "parts.json"
    categories.write_text(json.dumps({"info": {}, "images": [], "annotations": [], "categories": CATEGORIES}))
    return path, state, categories


def test_head_size_comes_from_the_checkpoint(twenty):
    path, state, _ = twenty
    model = create_model(VARIANT, weights=str(path))
    assert model.num_classes == NUM_CLASSES and model.label_map is None
    assert model.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out["pred_logits"].shape == (1, 100, NUM_CLASSES + 1)
    assert (out["pred_logits"].argmax(-1) == WATER).all()


def test_safetensors_checkpoint_loads_like_the_pth(twenty, tmp_path):
    _, state, _ = twenty
    path = tmp_path / "detr-r50-parts.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = create_model(VARIANT, weights=str(path))
    assert model.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    renamed = tmp_path / "weights.bin"           # recognised by content, not by name
    renamed.write_bytes(path.read_bytes())
    assert create_model(VARIANT, weights=str(renamed)).weights_sha256 == model.weights_sha256


def test_corrupt_safetensors_is_refused(twenty, tmp_path):
    _, state, _ = twenty
    path = tmp_path / "cut.safetensors"
    save_file({"detr.query_embed.weight": state["detr.query_embed.weight"]}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="not a loadable safetensors file"):
        create_model(VARIANT, weights=str(path))


def _config(path, categories=None) -> ModelConfig:
    return ModelConfig(model=VARIANT, weights=str(path), categories=categories and str(categories),
                       device="cpu", threshold=0.5, min_size=64, max_size=96)


def test_predictor_checks_the_label_map_against_the_head(twenty, tmp_path):
    path, _, categories = twenty
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


def test_predict_with_categories_end_to_end(twenty, tmp_path):
    path, _, categories = twenty
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


def test_predict_refuses_a_head_that_is_not_coco_without_categories(twenty, tmp_path):
    path, _, _ = twenty
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


def test_run_refuses_a_head_that_is_not_coco_with_the_reason(twenty, tmp_path):
    """Jobs use the COCO categories for now: `run` loads the model first and refuses another head,
    saying why, before recording anything."""
    path, _, _ = twenty
    (tmp_path / "in").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "in" / "scene.png")
    env = {k: v for k, v in os.environ.items() if k != "PANOPTIC_DATABASE_URL"}
    result = panoptic_batch("run", "in", "--dest", "out", "--model", VARIANT, "--weights", str(path),
                            "--min-size", "64", "--max-size", "96", env=env, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "predict category ids 0..20" in result.stderr and "--categories" in result.stderr
    assert not (tmp_path / "out" / "scene.json").exists()
    listed = panoptic_batch("status", "--json", env=env, cwd=tmp_path)
    assert json.loads(listed.stdout) == []
