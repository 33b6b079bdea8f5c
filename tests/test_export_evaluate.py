"""Using the results: `export` (a job as a COCO panoptic file + PNG folder) and `evaluate` (PQ/SQ/RQ).

`evaluate` must give panopticapi's numbers: every case here is also scored by panopticapi's own
`pq_compute` on the same files, on two COCO images' ground truth (tests/data/panoptic-maps) with
predictions made from it by eroding, shifting, relabelling, dropping, merging and adding segments
and by covering crowd regions. An exported job must be a file that `pq_compute` accepts, and
`evaluate --job` must agree with `evaluate --pred-json` on the export.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import boto3
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests.paths import COCO_GT, SAMPLES, SAMPLES_GT
from tests.test_pipeline import MODEL_ARGS, exe

TOL = 1e-9


# ---------------------------------------------------------------------------------------------
# helpers


def read_ids(path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def write_ids(path: Path, ids: np.ndarray) -> None:
    ids = ids.astype(np.uint32)
    rgb = np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], -1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, "RGB").save(path)


def segments_of(ids: np.ndarray, categories: dict[int, int]) -> list[dict]:
    """segments_info for an id map: every non-VOID id, with its category, area and bbox."""
    segments = []
    for seg_id in sorted(set(np.unique(ids).tolist()) - {0}):
        ys, xs = np.nonzero(ids == seg_id)
        segments.append({"id": seg_id, "category_id": categories[seg_id], "iscrowd": 0, "area": len(ys),
                         "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                  int(ys.max() - ys.min() + 1)]})
    return segments


def ground_truth(json_path: Path, folder: Path) -> dict:
    document = json.loads(json_path.read_text())
    return {"json": json_path, "folder": folder, "doc": document,
            "ids": {a["image_id"]: read_ids(folder / a["file_name"]) for a in document["annotations"]}}


@pytest.fixture(scope="module")
def coco():
    """Two COCO val2017 images' panoptic ground truth, at full size."""
    return ground_truth(COCO_GT / "panoptic_examples.json", COCO_GT)


@pytest.fixture(scope="module")
def samples_gt():
    """The ground truth of samples/ (the same two images, downscaled)."""
    return ground_truth(SAMPLES_GT / "panoptic.json", SAMPLES_GT / "panoptic")


def pq_compute(gt_json, pred_json, gt_folder, pred_folder) -> dict:
    from panopticapi.evaluation import pq_compute as reference
    return reference(str(gt_json), str(pred_json), gt_folder=str(gt_folder), pred_folder=str(pred_folder))


def ours(gt_json, gt_folder, pred_json, pred_folder, **kwargs):
    from scheduler.evaluate import FilePredictions, evaluate, load_ground_truth
    return evaluate(load_ground_truth(str(gt_json), str(gt_folder)), FilePredictions(str(pred_json), str(pred_folder)),
                    **kwargs).results


def assert_same(results: dict, reference: dict) -> None:
    """Our results (per_class keyed by int or str) equal panopticapi's to 1e-9."""
    for group in ("All", "Things", "Stuff"):
        assert results[group]["n"] == reference[group]["n"], group
        for key in ("pq", "sq", "rq"):
            assert results[group][key] == pytest.approx(reference[group][key], abs=TOL), (group, key)
    per_class = {int(k): v for k, v in results["per_class"].items()}
    for cat_id, row in reference["per_class"].items():
        if cat_id in per_class:
            for key in ("pq", "sq", "rq"):
                assert per_class[cat_id][key] == pytest.approx(row[key], abs=TOL), (cat_id, key)
        else:                               # absent from GT and predictions: panopticapi lists zeros
            assert row == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert set(per_class) <= set(reference["per_class"])


def write_predictions(folder: Path, coco, make) -> Path:
    """A prediction file (folder/pred.json + folder/pred/) with make(image_id, gt_ids, gt_segments,
    rng) → (id map, {id: category}) per GT image."""
    rng = np.random.default_rng(abs(hash(make.__name__)) % 2**32)
    annotations = []
    for annotation in coco["doc"]["annotations"]:
        ids, categories = make(annotation["image_id"], coco["ids"][annotation["image_id"]].copy(),
                               annotation["segments_info"], rng)
        name = f"pred_{annotation['image_id']}.png"
        write_ids(folder / "pred" / name, ids)
        annotations.append({"image_id": annotation["image_id"], "file_name": name,
                            "segments_info": segments_of(ids, categories)})
    path = folder / "pred.json"
    path.write_text(json.dumps({"annotations": annotations, "categories": coco["doc"]["categories"]}))
    return path


def renumber(ids, categories, rng):
    """Same segments under new ids (1..n in random order), so ids never line up with the GT's."""
    old = sorted(set(np.unique(ids).tolist()) - {0})
    new = rng.permutation(len(old)) + 1
    lookup = dict(zip(old, new.tolist()))
    out = np.zeros_like(ids)
    for o, n in lookup.items():
        out[ids == o] = n
    return out, {lookup[o]: categories[o] for o in old}


def gt_categories(segments):
    return {s["id"]: s["category_id"] for s in segments}


# Perturbations: each returns a prediction (id map, categories) for one GT image.

def identity(image_id, ids, segments, rng):
    return renumber(ids, gt_categories(segments), rng)


def eroded(image_id, ids, segments, rng):
    out = ids.copy()
    for dy, dx in ((0, 4), (0, -4), (4, 0), (-4, 0), (3, 3), (-3, -3)):
        out[ids != np.roll(ids, (dy, dx), (0, 1))] = 0       # boundary bands become VOID
    return renumber(out, gt_categories(segments), rng)


def shifted(image_id, ids, segments, rng):
    out = np.zeros_like(ids)
    out[9:, 14:] = ids[:-9, :-14]                  # large shift: small things drop below IoU 0.5
    return renumber(out, gt_categories(segments), rng)


def relabelled(image_id, ids, segments, rng):
    categories = gt_categories(segments)
    from worker.categories import categories as known_categories
    known = [c["id"] for c in known_categories()]
    for seg_id in list(categories)[::3]:
        categories[seg_id] = int(rng.choice(known))
    return renumber(ids, categories, rng)


def dropped_and_merged(image_id, ids, segments, rng):
    categories = gt_categories(segments)
    out = ids.copy()
    for s in segments[1::4]:                       # dropped: VOID
        out[out == s["id"]] = 0
    by_category: dict[int, list[int]] = {}
    for s in segments:
        if s["id"] in np.unique(out):
            by_category.setdefault(s["category_id"], []).append(s["id"])
    for members in by_category.values():           # merged: pairs of same-category segments become one
        for a, b in zip(members[0::2], members[1::2]):
            out[out == b] = a
    return renumber(out, categories, rng)


def extra_false_positives(image_id, ids, segments, rng):
    categories = gt_categories(segments)
    out = ids.copy()
    h, w = ids.shape
    for k, category in enumerate((1, 184, 62)):
        y, x = int(rng.integers(0, h - 40)), int(rng.integers(0, w - 60))
        out[y:y + 40, x:x + 60] = 9000 + k
        categories[9000 + k] = category
    return renumber(out, categories, rng)


def on_crowd(image_id, ids, segments, rng):
    """Predictions over crowd regions: same category (ignored), another category (a FP), and one
    half on the crowd (the > 0.5 rule)."""
    categories = gt_categories(segments)
    out = ids.copy()
    crowd = [s for s in segments if s["iscrowd"]]
    for k, s in enumerate(crowd):
        region = ids == s["id"]
        ys, xs = np.nonzero(region)
        third = xs.min() + (xs.max() - xs.min()) // 3
        out[region & (np.arange(ids.shape[1])[None, :] < third)] = 7000 + k      # same category
        categories[7000 + k] = s["category_id"]
        out[region & (np.arange(ids.shape[1])[None, :] >= 2 * third)] = 7100 + k  # other category
        categories[7100 + k] = 2 if s["category_id"] != 2 else 3
        x0, y0, bw, bh = s["bbox"]                 # a box straddling the crowd region's edge
        out[y0:y0 + 30, max(0, x0 - 20):x0 + 20] = 7200 + k
        categories[7200 + k] = s["category_id"]
    return renumber(out, categories, rng)


def everything(image_id, ids, segments, rng):
    ids, categories = dropped_and_merged(image_id, ids, segments, rng)
    ids2 = ids.copy()
    ids2[ids != np.roll(ids, (0, 3), (0, 1))] = 0
    ids2[5:50, 5:80] = 8000
    categories[8000] = 193
    return renumber(ids2, categories, rng)


PERTURBATIONS = [identity, eroded, shifted, relabelled, dropped_and_merged, extra_false_positives, on_crowd,
                 everything]


# ---------------------------------------------------------------------------------------------
# evaluate == panopticapi's pq_compute


def test_ground_truth_as_prediction_scores_100(coco, tmp_path):
    gt_json = tmp_path / "gt.json"
    shutil.copy(coco["json"], gt_json)
    reference = pq_compute(gt_json, gt_json, coco["folder"], coco["folder"])
    results = ours(gt_json, coco["folder"], gt_json, coco["folder"])
    assert_same(results, reference)
    assert results["All"]["pq"] == 1.0 and results["All"]["n"] == reference["All"]["n"] > 0


@pytest.mark.parametrize("make", PERTURBATIONS, ids=[m.__name__ for m in PERTURBATIONS])
def test_evaluate_equals_pq_compute(coco, tmp_path, make):
    pred_json = write_predictions(tmp_path, coco, make)
    reference = pq_compute(coco["json"], pred_json, coco["folder"], tmp_path / "pred")
    results = ours(coco["json"], coco["folder"], pred_json, tmp_path / "pred")
    assert_same(results, reference)
    if make is not identity:
        assert results["All"]["pq"] < 1.0
    else:
        assert results["All"]["pq"] == pytest.approx(1.0)


def test_categories_outside_the_list_are_ignored(coco, tmp_path):
    """GT segments of a category missing from the list count nowhere (as in panopticapi); a
    predicted segment of such a category counts as unlabelled (panopticapi refuses it), i.e. the
    same as VOID there."""
    document = json.loads(coco["json"].read_text())
    document["categories"] = [c for c in document["categories"] if c["id"] not in (1, 193)]
    gt_json = tmp_path / "gt.json"
    gt_json.write_text(json.dumps(document))

    def without_dropped(image_id, ids, segments, rng):      # what panopticapi accepts
        ids, categories = eroded(image_id, ids, segments, rng)
        for seg_id, category in list(categories.items()):
            if category in (1, 193):
                ids[ids == seg_id] = 0
        return ids, categories

    (tmp_path / "a").mkdir()
    pred_a = write_predictions(tmp_path / "a", coco, without_dropped)
    reference = pq_compute(gt_json, pred_a, coco["folder"], tmp_path / "a/pred")
    assert_same(ours(gt_json, coco["folder"], pred_a, tmp_path / "a/pred"), reference)
    assert "1" not in reference["per_class"] and 1 not in reference["per_class"]

    (tmp_path / "b").mkdir()
    pred_b = write_predictions(tmp_path / "b", coco, eroded)   # keeps persons and category 193
    from scheduler.evaluate import FilePredictions, evaluate, load_ground_truth
    evaluation = evaluate(load_ground_truth(str(gt_json), str(coco["folder"])),
                          FilePredictions(str(pred_b), str(tmp_path / "b/pred")))
    assert_same(evaluation.results, reference)
    assert evaluation.unknown_predictions > 0


def test_samples_ground_truth_fits_the_samples(samples_gt, tmp_path):
    """samples-gt/ is a valid COCO panoptic ground truth of samples/ at their sizes, so that
    `evaluate` works on the README's sample images."""
    images = {i["id"]: i for i in samples_gt["doc"]["images"]}
    assert sorted(i["file_name"] for i in images.values()) == sorted(p.name for p in SAMPLES.glob("*.jpg"))
    for annotation in samples_gt["doc"]["annotations"]:
        image, ids = images[annotation["image_id"]], samples_gt["ids"][annotation["image_id"]]
        with Image.open(SAMPLES / image["file_name"]) as sample:
            assert ids.shape == (sample.height, sample.width) == (image["height"], image["width"])
        categories = {s["id"]: s["category_id"] for s in annotation["segments_info"]}
        recomputed = {s["id"]: s for s in segments_of(ids, categories)}
        assert set(recomputed) == {s["id"] for s in annotation["segments_info"]}
        for segment in annotation["segments_info"]:
            again = recomputed[segment["id"]]
            assert (segment["area"], segment["bbox"]) == (again["area"], again["bbox"])
    gt_json = tmp_path / "gt.json"
    shutil.copy(samples_gt["json"], gt_json)
    reference = pq_compute(gt_json, gt_json, samples_gt["folder"], samples_gt["folder"])
    assert reference["All"]["pq"] == 1.0 and reference["All"]["n"] > 0


def run_evaluate(*args, env=None):
    from scheduler.cli import main
    return CliRunner().invoke(main, ["evaluate", *map(str, args)], env=env, catch_exceptions=False)


def test_evaluate_command_json_and_table(coco, tmp_path):
    pred_json = write_predictions(tmp_path, coco, everything)
    reference = pq_compute(coco["json"], pred_json, coco["folder"], tmp_path / "pred")
    result = run_evaluate("--gt-json", coco["json"], "--gt-folder", coco["folder"], "--pred-json", pred_json,
                          "--pred-folder", tmp_path / "pred", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert_same(payload, reference)
    assert payload["images"] == 2 and payload["missing"] == 0
    assert set(payload["All"]) == {"pq", "sq", "rq", "n"}
    person = payload["per_class"]["1"]
    assert person["name"] == "person" and person["isthing"] is True and person["tp"] + person["fn"] > 0

    table = run_evaluate("--gt-json", coco["json"], "--gt-folder", coco["folder"], "--pred-json", pred_json,
                         "--pred-folder", tmp_path / "pred")
    assert table.exit_code == 0
    line = next(l for l in table.stdout.splitlines() if "All" in l)
    assert f"{100 * reference['All']['pq']:.2f}" in line
    assert "person" in table.stdout


def test_missing_predictions(coco, tmp_path):
    """A GT image without a prediction: fn (default) scores it as an empty prediction, skip leaves
    it out, error refuses."""
    document = json.loads(coco["json"].read_text())
    first = document["annotations"][0]
    pred_doc = {"annotations": [first], "categories": document["categories"]}
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps(pred_doc))
    args = ["--gt-json", coco["json"], "--gt-folder", coco["folder"], "--pred-json", pred_json,
            "--pred-folder", coco["folder"]]

    refused = run_evaluate(*args, "--missing", "error")
    assert refused.exit_code == 1 and "1 of 2 ground-truth images have no prediction" in refused.output

    # fn: the same as panopticapi given an all-VOID prediction for the missing image
    empty = dict(document["annotations"][1], segments_info=[], file_name="empty.png")
    h, w = coco["ids"][empty["image_id"]].shape
    (tmp_path / "pred").mkdir()
    write_ids(tmp_path / "pred" / "empty.png", np.zeros((h, w), np.int64))
    shutil.copy(coco["folder"] / first["file_name"], tmp_path / "pred" / first["file_name"])
    full_json = tmp_path / "full.json"
    full_json.write_text(json.dumps({"annotations": [first, empty], "categories": document["categories"]}))
    counted = run_evaluate(*args, "--json")
    assert counted.exit_code == 0, counted.output
    assert "1 ground-truth images have no prediction" in counted.stderr
    payload = json.loads(counted.stdout)
    assert payload["missing"] == 1 and payload["images"] == 2
    assert_same(payload, pq_compute(coco["json"], full_json, coco["folder"], tmp_path / "pred"))
    assert payload["All"]["pq"] < 1

    skipped = run_evaluate(*args, "--missing", "skip", "--json")
    payload = json.loads(skipped.stdout)
    assert payload["images"] == 1 and payload["All"]["pq"] == 1.0


def test_bad_input_gets_a_one_line_error(coco, tmp_path):
    base = ["--gt-json", coco["json"], "--gt-folder", coco["folder"]]
    cases = []
    cases.append((["--gt-json", tmp_path / "nope.json", "--pred-json", coco["json"]], "nope.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    cases.append((base + ["--pred-json", tmp_path / "list.json"], "must hold a JSON object"))
    (tmp_path / "shape.json").write_text(json.dumps({"annotations": [{"image_id": 1}]}))
    cases.append((base + ["--pred-json", tmp_path / "shape.json"], "needs image_id, file_name and segments_info"))
    (tmp_path / "text.json").write_text("{not json")
    cases.append((base + ["--pred-json", tmp_path / "text.json"], "is not JSON"))
    cases.append((base + ["--pred-json", coco["json"], "--pred-folder", tmp_path / "empty"], "no such file"))

    small = tmp_path / "small"            # PNGs of another size
    for annotation in json.loads(coco["json"].read_text())["annotations"]:
        write_ids(small / annotation["file_name"], coco["ids"][annotation["image_id"]][::2, ::2])
    cases.append((base + ["--pred-json", coco["json"], "--pred-folder", small], "the prediction is 320×214 pixels"))

    document = json.loads(coco["json"].read_text())
    document["annotations"][0]["segments_info"].pop()
    (tmp_path / "short.json").write_text(json.dumps(document))
    cases.append((base + ["--pred-json", tmp_path / "short.json", "--pred-folder", coco["folder"]],
                  "in the PNG but not in segments_info"))
    cases.append((base, "give either --job JOB or --pred-json"))

    for args, message in cases:
        result = run_evaluate(*args)
        assert result.exit_code in (1, 2), (args, result.output)
        assert message in result.output, (message, result.output)
        assert "Traceback" not in result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == (1 if result.exit_code == 1 else 3), lines      # usage errors add two usage lines
        assert lines[-1].startswith("Error: ")


# ---------------------------------------------------------------------------------------------
# export of real jobs


def job_images() -> dict[str, bytes]:
    files = {f"coco/{p.name}": p.read_bytes() for p in sorted(SAMPLES.glob("*.jpg"))}
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(buffer, "PNG")
    files["b/synthetic.png"] = buffer.getvalue()
    return files


def run_job(source: str, dest: str, env: dict, cwd: Path) -> str:
    result = subprocess.run([exe(), "run", source, "--dest", dest, *MODEL_ARGS], capture_output=True, text=True,
                            env=env, cwd=cwd, timeout=600)
    assert result.returncode in (0, 1), result.stderr
    return re.search(r"job ([0-9a-f]{12})", result.stdout).group(1)


@pytest.fixture(scope="module")
def local_job(tmp_path_factory):
    """A finished job on SQLite and folders: three images succeeded, one failed."""
    root = tmp_path_factory.mktemp("local-job")
    files = job_images()
    files["broken.jpg"] = b"\xff\xd8\xff not a JPEG"
    for key, data in files.items():
        (root / "in" / key).parent.mkdir(parents=True, exist_ok=True)
        (root / "in" / key).write_bytes(data)
    env = {k: v for k, v in os.environ.items() if k != "PANOPTIC_BROKER_URL"}
    env["PANOPTIC_DATABASE_URL"] = f"sqlite:///{root / 'jobs.db'}"
    job_id = run_job(str(root / "in"), str(root / "out"), env, root)
    return {"root": root, "env": env, "job": job_id, "files": files}


def check_export(json_path: Path, png_folder: Path, files: dict[str, bytes]) -> dict:
    """The export is a well-formed COCO panoptic file whose PNGs agree with its segments_info."""
    from worker.categories import categories
    document = json.loads(json_path.read_text())
    assert document["categories"] == [dict(c) for c in categories()] and len(document["categories"]) == 133
    images = {i["id"]: i for i in document["images"]}
    assert len(images) == len(document["images"]) == len(document["annotations"])
    known = {c["id"] for c in document["categories"]}
    for annotation in document["annotations"]:
        image = images[annotation["image_id"]]
        with Image.open(io.BytesIO(files[image["file_name"]])) as source:
            assert (image["width"], image["height"]) == source.size
        assert annotation["file_name"] == image["file_name"].rsplit(".", 1)[0] + ".png"
        ids = read_ids(png_folder / annotation["file_name"])
        assert ids.shape == (image["height"], image["width"])
        segments = annotation["segments_info"]
        assert sorted(s["id"] for s in segments) == sorted(set(np.unique(ids).tolist()) - {0})
        for segment in segments:
            assert segment["category_id"] in known
            assert segment["area"] == int((ids == segment["id"]).sum())
            assert set(segment) >= {"id", "category_id", "area", "bbox", "iscrowd"}
    return document


def test_export_local_job_is_accepted_by_pq_compute(local_job, tmp_path):
    env = local_job["env"]
    out = tmp_path / "export" / "panoptic_job.json"
    from scheduler.cli import main
    result = CliRunner().invoke(main, ["export", local_job["job"], "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert "3 images exported" in result.stdout and "1 failed" in result.stdout
    folder = tmp_path / "export" / "panoptic_job"                 # the default PNG folder
    document = check_export(out, folder, local_job["files"])
    assert sorted(i["file_name"] for i in document["images"]) == ["b/synthetic.png", "coco/000000142238.jpg",
                                                                  "coco/000000439180.jpg"]
    assert sum(len(a["segments_info"]) for a in document["annotations"]) > 0
    assert {str(p.relative_to(folder)) for p in folder.rglob("*.png")} == {
        "b/synthetic.png", "coco/000000142238.png", "coco/000000439180.png"}

    # pq_compute accepts the export as predictions against a ground truth made from it (a random
    # model finds one stuff segment per image; an added person makes "Things" non-empty).
    gt_json = derived_ground_truth(out, folder, tmp_path / "gt")
    reference = pq_compute(gt_json, out, tmp_path / "gt", folder)
    assert 0 < reference["All"]["pq"] < 1
    by_job = run_evaluate("--gt-json", gt_json, "--gt-folder", tmp_path / "gt", "--job", local_job["job"], "--json",
                          env=env)
    assert by_job.exit_code == 0, by_job.output
    assert_same(json.loads(by_job.stdout), reference)
    # …and the export against itself scores 100.
    itself = run_evaluate("--gt-json", out, "--job", local_job["job"], "--json", env=env)
    assert itself.exit_code == 0, itself.output
    assert json.loads(itself.stdout)["All"]["pq"] == 1.0


def derived_ground_truth(export_json: Path, folder: Path, gt_folder: Path) -> Path:
    """The export as ground truth, with a person box added to every image."""
    document = json.loads(export_json.read_text())
    for annotation in document["annotations"]:
        ids = read_ids(folder / annotation["file_name"])
        categories = {s["id"]: s["category_id"] for s in annotation["segments_info"]}
        h, w = ids.shape
        ids[h // 4:h // 2, w // 4:w // 2] = 4242
        categories[4242] = 1
        write_ids(gt_folder / annotation["file_name"], ids)
        annotation["segments_info"] = segments_of(ids, categories)
    path = gt_folder.parent / "gt.json"
    path.write_text(json.dumps(document))
    return path


def test_evaluate_job_equals_evaluate_export(local_job, tmp_path, samples_gt):
    """Against the COCO ground truth: --job (outputs matched by file name) and --pred-json on the
    export (ids taken from the GT with --ids-from) give the same numbers, and so does pq_compute.
    The job's COCO images are samples/, whose ground truth is samples-gt/."""
    from scheduler.cli import main
    env = local_job["env"]
    out = tmp_path / "job.json"
    exported = CliRunner().invoke(main, ["export", local_job["job"], "--out", str(out), "--png-folder",
                                         str(tmp_path / "pngs"), "--ids-from", str(samples_gt["json"])], env=env)
    assert exported.exit_code == 0, exported.output
    document = check_export(out, tmp_path / "pngs", local_job["files"])
    by_name = {i["file_name"]: i["id"] for i in document["images"]}
    assert by_name["coco/000000142238.jpg"] == 142238 and by_name["coco/000000439180.jpg"] == 439180
    assert by_name["b/synthetic.png"] == 439181                     # not in the GT: a new id
    assert "1 images are not in" in exported.stderr

    gt = ["--gt-json", samples_gt["json"], "--gt-folder", samples_gt["folder"]]
    by_job = run_evaluate(*gt, "--job", local_job["job"], "--json", env=env)
    by_file = run_evaluate(*gt, "--pred-json", out, "--pred-folder", tmp_path / "pngs", "--json")
    assert by_job.exit_code == 0 and by_file.exit_code == 0, by_job.output + by_file.output
    job_payload, file_payload = json.loads(by_job.stdout), json.loads(by_file.stdout)
    for group in ("All", "Things", "Stuff", "per_class"):
        assert job_payload[group] == file_payload[group], group
    assert job_payload["images"] == 2 and job_payload["missing"] == 0
    assert job_payload["unmatched_predictions"] == 1                # the synthetic image has no GT
    if file_payload["All"]["n"]:
        assert_same(file_payload, pq_compute(samples_gt["json"], out, samples_gt["folder"], tmp_path / "pngs"))


def test_export_refuses_to_overwrite_the_job_outputs(local_job):
    from scheduler.cli import main
    root = local_job["root"]
    result = CliRunner().invoke(main, ["export", local_job["job"], "--out", str(root / "x.json"), "--png-folder",
                                       str(root / "out")], env=local_job["env"])
    assert result.exit_code == 1 and "overlaps the job's destination" in result.output
    assert not (root / "x.json").exists()


def test_export_and_evaluate_a_job_on_s3(s3_server, s3_bucket, tmp_path):
    s3 = boto3.client("s3")
    files = job_images()
    for key, data in files.items():
        s3.put_object(Bucket=s3_bucket, Key=f"in/{key}", Body=data)
    env = {k: v for k, v in os.environ.items() if k != "PANOPTIC_BROKER_URL"}
    env["PANOPTIC_DATABASE_URL"] = f"sqlite:///{tmp_path / 'jobs.db'}"
    from scheduler.cli import main
    ran = CliRunner().invoke(main, ["run", f"s3://{s3_bucket}/in", "--dest", f"s3://{s3_bucket}/out", *MODEL_ARGS],
                             env=env)
    assert ran.exit_code == 0, ran.output
    job_id = re.findall(r"\b[0-9a-f]{12}\b", ran.stdout)[-1]
    out = tmp_path / "s3job.json"
    exported = CliRunner().invoke(main, ["export", job_id, "--out", str(out)], env=env)
    assert exported.exit_code == 0, exported.output
    assert "3 images exported" in exported.stdout and "none left out" in exported.stdout
    check_export(out, tmp_path / "s3job", files)
    gt_json = derived_ground_truth(out, tmp_path / "s3job", tmp_path / "gt")
    reference = pq_compute(gt_json, out, tmp_path / "gt", tmp_path / "s3job")
    gt = ["--gt-json", gt_json, "--gt-folder", tmp_path / "gt"]
    by_job = run_evaluate(*gt, "--job", job_id, "--json", env=env)
    by_file = run_evaluate(*gt, "--pred-json", out, "--pred-folder", tmp_path / "s3job", "--json")
    assert by_job.exit_code == 0 and by_file.exit_code == 0, by_job.output + by_file.output
    assert_same(json.loads(by_job.stdout), reference)
    assert_same(json.loads(by_file.stdout), reference)
    assert json.loads(by_job.stdout)["images"] == 3

    # The same export to S3 while the store fails a PNG, an output JSON and the export's own write
    # six times each: more than boto3's 5 attempts, so only the retry budget gets them through.
    from tests.fault_proxy import FaultProxy
    [png, document] = [f"/{s3_bucket}/out/b/synthetic.{suffix}" for suffix in ("png", "json")]
    written = f"/{s3_bucket}/export/s3job.json"
    with FaultProxy(s3_server.endpoint_url, fault_rate=0.0) as proxy:
        proxy.stubborn({png, document, written}.__contains__, failures=6)
        flaky = CliRunner().invoke(main, ["export", job_id, "--out", f"s3://{s3_bucket}/export/s3job.json"],
                                   env=dict(env, AWS_ENDPOINT_URL=proxy.endpoint_url))
    assert flaky.exit_code == 0, flaky.output
    assert all(proxy.requests[path] >= 7 for path in (png, document, written)), proxy.requests
    again = json.loads(boto3.client("s3").get_object(Bucket=s3_bucket, Key="export/s3job.json")["Body"].read())
    assert again["annotations"] == json.loads(out.read_text())["annotations"]
    exported_png = "export/s3job/b/synthetic.png"
    assert (boto3.client("s3").get_object(Bucket=s3_bucket, Key=exported_png)["Body"].read()
            == (tmp_path / "s3job" / "b" / "synthetic.png").read_bytes())


def test_export_of_a_damaged_output_says_which_and_why(local_job, tmp_path):
    from scheduler.cli import main
    root = local_job["root"]
    document_path = sorted((root / "out").rglob("*.json"))[0]
    original = document_path.read_text()
    document = json.loads(original)
    del document["segments_info"][0]["category_id"]
    document_path.write_text(json.dumps(document))
    try:
        result = CliRunner().invoke(main, ["export", local_job["job"], "--out", str(tmp_path / "x.json")],
                                    env=local_job["env"])
    finally:
        document_path.write_text(original)
    assert result.exit_code == 1, result.output
    assert "segments without id or category_id" in result.output and "Traceback" not in result.output
