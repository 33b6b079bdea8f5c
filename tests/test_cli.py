"""The console script as a user runs it: help, predict outputs, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SUBCOMMANDS = ["predict", "submit", "worker", "run", "status", "stats", "cancel", "retry", "reap", "export",
               "evaluate", "report"]


def panoptic_batch(*args, env=None, cwd=None):
    exe = shutil.which("panoptic-batch", path=os.path.dirname(sys.executable)) or shutil.which("panoptic-batch")
    assert exe, "the panoptic-batch console script is not installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_help_lists_every_subcommand():
    result = panoptic_batch("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name):
    result = panoptic_batch(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def write_images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (w, h) in {"wide.jpg": (96, 64), "tall.png": (48, 80)}.items():
        path = folder / name
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_predict_writes_png_and_json_per_image(tmp_path):
    images = write_images(tmp_path / "in")
    out = tmp_path / "out"
    # threshold 0 keeps every confident-enough query, so the mask head and segments are exercised.
    result = panoptic_batch("predict", *map(str, images), "--out", str(out), "--model", "detr-r50",
                            "--weights", "random", "--min-size", "64", "--max-size", "128",
                            "--threshold", "0", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    for path in images:
        png, doc = out / f"{path.stem}.png", out / f"{path.stem}.json"
        decoded = Image.open(png)
        assert decoded.mode == "RGB" and decoded.size == Image.open(path).size
        document = json.loads(doc.read_text())
        assert document["file_name"] == png.name
        assert document["image"] == str(path)
        assert (document["height"], document["width"]) == (decoded.height, decoded.width)
        assert document["model"]["name"] == "detr-r50"
        assert len(document["model"]["weights_sha256"]) == 64
        assert document["model"]["threshold"] == 0.0
        rgb = np.asarray(decoded, dtype=np.uint32)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        assert sorted(s["id"] for s in document["segments_info"]) == sorted(set(np.unique(ids)) - {0})
        assert sum(s["area"] for s in document["segments_info"]) == int((ids != 0).sum())


def test_predict_bad_image_fails_alone(tmp_path):
    images = write_images(tmp_path / "in")
    bad = tmp_path / "in" / "broken.jpg"
    bad.write_text("this is not an image")
    out = tmp_path / "out"
    result = panoptic_batch("predict", str(bad), *map(str, images), "--out", str(out), "--model", "detr-r50",
                            "--weights", "random", "--min-size", "64", "--max-size", "128")
    assert result.returncode == 1
    assert "broken.jpg" in result.stderr and "cannot decode image" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["tall.json", "tall.png", "wide.json", "wide.png"]


def test_predict_defaults_to_official_weights_and_explains_when_offline(tmp_path):
    images = write_images(tmp_path / "in")
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), https_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9")
    result = panoptic_batch("predict", str(images[0]), "--out", str(tmp_path / "out"), "--model", "detr-r50",
                            env=env)
    assert result.returncode != 0
    assert "detr-r50-panoptic-00ce5173.pth" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "wide.png").exists()


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_batch_size_must_be_positive_or_auto(tmp_path, value):
    result = panoptic_batch("predict", str(tmp_path / "x.jpg"), "--out", str(tmp_path), "--batch-size", value)
    assert result.returncode == 2
    assert "neither a positive integer nor auto" in result.stderr


def test_auto_batch_size_follows_the_device():
    import torch

    from worker.predictor import resolve_batch_size
    assert resolve_batch_size("auto", torch.device("cpu")) == 1
    assert resolve_batch_size("auto", torch.device("cuda", 0)) == 16
    assert resolve_batch_size(4, torch.device("cuda", 0)) == 4
