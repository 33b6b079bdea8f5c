"""A label map per job: `run`/`submit --categories`, the map stored with the job in SQL, and every
view of the job (result JSON, stats, export, report, overlays) naming, flagging and colouring
classes by it; refusals before anything is recorded; the map in the nightly fingerprint; the
migration that brought the table (older jobs read as COCO).

The model is tests/twenty_classes.py's: 20 categories of its own, every query confident in id 15,
"water" (stuff) — where the COCO categories would say "bench", a thing.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import text

from scheduler import errors
from storage import db as storage_db
from storage.jobs import JobStore
from tests.test_cli import panoptic_batch
from tests.twenty_classes import CATEGORIES, VARIANT, WATER
from worker.labels import LabelMap, coco_label_map, job_label_map

SIZES = {"grey.png": (90, 60), "b/noise.jpg": (70, 50)}
MODEL = ["--model", VARIANT, "--min-size", "64", "--max-size", "96", "--threshold", "0.5", "--device", "cpu"]
REDIS_URL = "redis://127.0.0.1:6379/0"


def write_images(folder: Path) -> None:
    rng = np.random.default_rng(5)
    for key, (w, h) in SIZES.items():
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.full((h, w, 3), 128, np.uint8) if key == "grey.png" else rng.integers(0, 255, (h, w, 3), np.uint8)
        Image.fromarray(pixels).save(path)


def local_env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PANOPTIC_BROKER_URL"}
    env["PANOPTIC_DATABASE_URL"] = f"sqlite:///{root / 'jobs.db'}"
    env["TORCH_HOME"] = str(root / "torch-home")
    return env


@pytest.fixture(scope="module")
def custom_job(twenty_classes, tmp_path_factory):
    """`run --categories --overlays` with the 20-class checkpoint over two small images."""
    checkpoint, _, categories = twenty_classes
    root = tmp_path_factory.mktemp("custom-job")
    write_images(root / "in")
    env = local_env(root)
    result = panoptic_batch("run", "in", "--dest", "out", "--weights", str(checkpoint), "--categories",
                            str(categories), "--overlays", *MODEL, env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    return {"root": root, "env": env, "job": result.stdout.strip().splitlines()[-1],
            "sha256": LabelMap.load(categories).sha256}


def invoke(*args, env: dict):
    """The command line in this process (torch is loaded here already): exit_code, stdout, stderr."""
    from scheduler.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def cli_json(*args, job) -> object:
    result = invoke(*args, env=job["env"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_results_stats_and_overlays_use_the_jobs_categories(custom_job):
    root = custom_job["root"]
    for key, (w, h) in SIZES.items():
        document = json.loads((root / "out" / (key.rsplit(".", 1)[0] + ".json")).read_text())
        assert [(s["category_id"], s["category_name"], s["isthing"], s["area"]) for s in document["segments_info"]] \
            == [(WATER, "water", False, w * h)]
        assert document["model"]["label_map_sha256"] == custom_job["sha256"]
    assert cli_json("status", custom_job["job"], "--json", job=custom_job)["label_map_sha256"] == custom_job["sha256"]
    pixels = sum(w * h for w, h in SIZES.values())
    assert cli_json("stats", custom_job["job"], "--json", job=custom_job) == [{
        "category_id": WATER, "category_name": "water", "isthing": False, "segments": 2, "images": 2, "pixels": pixels}]
    # The worker's overlay paints the grey image in the map's colour for id 15 (stuff: unshaded).
    with Image.open(root / "out" / "grey.overlay.jpg") as overlay:
        corner = np.asarray(overlay.convert("RGB"), np.float64)[4:14, 4:14].reshape(-1, 3).mean(0)
    expected = 128 + 0.55 * (np.array(CATEGORIES[WATER - 1]["color"]) - 128)
    assert np.abs(corner - expected).max() < 8, (corner, expected)


def test_export_carries_the_label_map_and_loads_in_panopticapi(custom_job, tmp_path):
    from tests.test_export_evaluate import assert_same, derived_ground_truth, pq_compute

    out = tmp_path / "export.json"
    result = invoke("export", custom_job["job"], "--out", out, env=custom_job["env"])
    assert result.exit_code == 0, result.stderr
    assert "VOID" not in result.stderr            # id 15 is a category of the job's map, not an unknown one
    document = json.loads(out.read_text())
    assert document["categories"] == CATEGORIES
    assert document["info"]["label_map_sha256"] == custom_job["sha256"]
    assert [[s["category_id"] for s in a["segments_info"]] for a in document["annotations"]] == [[WATER], [WATER]]
    # panopticapi scores it against a ground truth with the same categories (the export, a box of
    # id 1 added): it accepts every category id, and takes "water" for stuff, as the map says.
    gt_json = derived_ground_truth(out, tmp_path / "export", tmp_path / "gt")
    scores = pq_compute(gt_json, out, tmp_path / "gt", tmp_path / "export")
    assert (scores["Stuff"]["n"], scores["Things"]["n"]) == (1, 1) and scores["per_class"][WATER]["pq"] > 0.5
    evaluated = invoke("evaluate", "--gt-json", gt_json, "--gt-folder", tmp_path / "gt", "--job", custom_job["job"],
                       "--json", env=custom_job["env"])
    assert evaluated.exit_code == 0, evaluated.stderr
    assert_same(json.loads(evaluated.stdout), scores)
    assert "label map" not in evaluated.stderr    # the ground truth has the job's categories: nothing to note


def test_report_names_and_colours_the_jobs_classes(custom_job, tmp_path):
    result = invoke("report", custom_job["job"], "--out", tmp_path / "r", env=custom_job["env"])
    assert result.exit_code == 0, result.stderr
    page = (tmp_path / "r" / "index.html").read_text()
    classes = page[page.index('<section id="classes">'):page.index('<section id="images"')]
    assert "water" in classes and "stuff" in classes and "bench" not in classes
    assert "#966907" in classes                   # [150, 105, 7]: the map's colour of id 15, in table and charts
    assert f"20 categories, SHA-256 {custom_job['sha256']}" in page


def test_evaluate_notes_a_ground_truth_with_other_categories(custom_job, tmp_path):
    out = tmp_path / "export.json"
    assert invoke("export", custom_job["job"], "--out", out, env=custom_job["env"]).exit_code == 0
    document = json.loads(out.read_text())
    document["categories"] = coco_label_map().as_coco()      # a COCO ground truth for a job of other classes
    gt = tmp_path / "coco-gt.json"
    gt.write_text(json.dumps(document))
    result = invoke("evaluate", "--gt-json", gt, "--gt-folder", tmp_path / "export", "--job", custom_job["job"],
                    "--json", env=custom_job["env"])
    assert result.exit_code == 0, result.stderr
    assert "categories are not the job's (e.g. id 1: 'person' (thing) in the ground truth, 'part-1' (thing)" \
        in result.stderr


def test_a_label_map_that_does_not_fit_is_refused_before_anything_is_recorded(twenty_classes, tmp_path,
                                                                             monkeypatch):
    """One line, exit code 8, no job, no DEST: at `run` (which loads the model) and at `submit`
    (which does not: it reads the head's size from the checkpoint file without torch)."""
    from safetensors.torch import save_file

    checkpoint, state, _ = twenty_classes
    write_images(tmp_path / "in")
    safetensors = tmp_path / "parts.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(safetensors))
    maps = {"beyond.json": CATEGORIES + [{"id": 30, "name": "extra", "isthing": 1}], "short.json": CATEGORIES[:10],
            "twice.json": CATEGORIES + [CATEGORIES[0]]}
    for name, categories in maps.items():
        (tmp_path / name).write_text(json.dumps(categories))
    env = dict(local_env(tmp_path), PANOPTIC_BROKER_URL=REDIS_URL)
    monkeypatch.chdir(tmp_path)
    cases = [
        (["run", "--weights", str(checkpoint)], ["predict category ids 0..20", "names id 200", "--categories"]),
        (["submit", "--weights", str(checkpoint)], ["predict category ids 0..20", "names id 200", "--categories"]),
        (["submit", "--weights", str(safetensors)], ["predict category ids 0..20", "--categories"]),
        (["submit", "--weights", str(checkpoint), "--categories", "beyond.json"], ["names id 30"]),
        (["submit", "--weights", str(safetensors), "--categories", "short.json"], ["ends at id 10"]),
        (["run", "--weights", "random", "--categories", "twice.json"], ["category id 1 appears more than once"]),
        (["submit", "--weights", "random", "--categories", "missing.json"], ["cannot read label map", "missing.json"]),
    ]
    for command, words in cases:
        result = invoke(command[0], "in", "--dest", "out", *command[1:], *MODEL, env=env)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == errors.EXIT_LABEL_MAP, (command, result.stderr)
        assert len(lines) == 1 and all(word in lines[0] for word in words), (command, result.stderr)
    assert JobStore(env["PANOPTIC_DATABASE_URL"]).jobs() == []
    assert not (tmp_path / "out").exists()


def test_a_nightly_run_with_another_label_map_reprocesses_the_images(tmp_path, monkeypatch):
    """Unchanged images are skipped by a re-run with the same label map (given in another file
    layout: the map's content counts), processed again with a changed one; the COCO map given
    explicitly is the default's fingerprint."""
    write_images(tmp_path / "in")
    for name, categories in {"a.json": CATEGORIES, "c.json": [dict(c, name="lake") if c["id"] == WATER else c
                                                             for c in CATEGORIES]}.items():
        (tmp_path / name).write_text(json.dumps(categories))
    (tmp_path / "a-as-coco-file.json").write_text(json.dumps({"categories": list(reversed(CATEGORIES)), "images": []}))
    (tmp_path / "coco.json").write_text(json.dumps(coco_label_map().as_coco()))
    monkeypatch.chdir(tmp_path)
    env = {"PANOPTIC_DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.db'}", "TORCH_HOME": str(tmp_path / "torch-home")}

    def run(*categories) -> tuple[int, int]:
        result = invoke("run", "in", "--dest", "out", "--weights", "random", *MODEL, *categories, env=env)
        assert result.exit_code == 0, result.output
        job = JobStore(env["PANOPTIC_DATABASE_URL"]).job(result.output.strip().splitlines()[-1])
        return job.total, job.config.get("skipped", 0)

    assert run("--categories", "a.json") == (2, 0)
    assert run("--categories", "a-as-coco-file.json") == (0, 2)
    assert run("--categories", "c.json") == (2, 0)
    assert run() == (2, 0)
    assert run("--categories", "coco.json") == (0, 2)


def _insert_job_at_revision_0002(engine) -> str:
    """A job with one succeeded image (one "person" segment) as a database of revision 0002 held it."""
    job_id = uuid.uuid4().hex[:12]
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO jobs (id, name, source, dest, model, weights, threshold, min_size, max_size, config, state, "
            "total, succeeded, failed, created_at) VALUES (:id, 'old', '/in', '/out', 'detr-r50', 'random', 0.85, "
            "800, 1333, '{}', 'succeeded', 1, 1, 0, CURRENT_TIMESTAMP)"), {"id": job_id})
        image_id = conn.execute(text(
            "INSERT INTO images (job_id, key, uri, state, attempts) VALUES (:id, 'a.jpg', '/in/a.jpg', 'succeeded', 1) "
            "RETURNING id"), {"id": job_id}).scalar()
        conn.execute(text("INSERT INTO image_classes (image_id, category_id, job_id, segments, pixels) "
                          "VALUES (:image, 1, :id, 1, 100)"), {"image": image_id, "id": job_id})
    return job_id


def test_migration_keeps_older_jobs_as_coco_and_stores_each_map_once(db_url):
    from scheduler.report import class_rows

    engine = storage_db.get_engine(db_url, migrate=False)
    storage_db.upgrade(engine, "0002")
    old = _insert_job_at_revision_0002(engine)
    storage_db.dispose_all()

    store = JobStore(db_url)                      # upgrades to head on first use
    job = store.job(old)
    assert job.label_map_sha256 is None and job_label_map(store, job) == coco_label_map()
    assert class_rows(store, old) == [{"category_id": 1, "segments": 1, "images": 1, "pixels": 100,
                                       "category_name": "person", "isthing": True, "color": (220, 20, 60)}]

    parts = LabelMap.from_categories(CATEGORIES)
    args = dict(name="new", source="/in", dest="/out", model="detr-r50", weights="random", threshold=0.85,
                min_size=800, max_size=1333, label_map=(parts.sha256, parts.as_coco()))
    first, second = store.create_job(**args), store.create_job(**args)
    assert store.job(first).label_map_sha256 == store.job(second).label_map_sha256 == parts.sha256
    assert job_label_map(store, store.job(second)).as_coco() == CATEGORIES
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM label_maps")).scalar() == 1
