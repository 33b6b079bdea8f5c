"""What DEST holds is what the job says: names that normalise alike are output conflicts (never
two images over one pair of outputs), and nightly re-runs skip an image only while both its
outputs are still in DEST. On a folder with SQLite and on S3 (SeaweedFS) with PostgreSQL."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from scheduler.submit import JobSpec, submit
from storage import objects
from storage.jobs import JobStore
from tests.test_pipeline import stats_from_documents
from worker.output import output_stem


def png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(params=["folder", "s3"])
def where(request, tmp_path):
    """(SOURCE, DEST, store): a folder and SQLite, or an S3 bucket and PostgreSQL."""
    if request.param == "folder":
        return str(tmp_path / "in"), str(tmp_path / "out"), JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/in", f"s3://{bucket}/out", JobStore(request.getfixturevalue("pg_database_url"))


def put(source: str, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        objects.write_bytes(objects.join(source, key) if objects.is_s3(source) else os.path.join(source, key), data)


def remove(uri: str) -> None:
    if objects.is_s3(uri):
        bucket, key = uri[len("s3://"):].split("/", 1)
        objects.s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        os.remove(uri)


_PROCESSORS: dict[int, object] = {}


def run_job(store: JobStore, source: str, dest: str, force: bool = False):
    """submit, then process every chunk in this process (as `run` does); the job's status."""
    from worker.pipeline import ChunkProcessor

    spec = JobSpec(source=source, dest=dest, model="detr-r50", weights="random", threshold=0.0, min_size=64,
                   max_size=96, chunk_size=4, config={"batch_size": 4, "chunk_size": 4})
    chunks = []
    job_id = submit(store, spec, lambda job, ids: chunks.append((job, ids)), force=force)
    processor = _PROCESSORS.setdefault(id(store), ChunkProcessor(store, device="cpu"))
    for job, ids in chunks:
        processor.process(job, ids)
    return store.job(job_id)


def dest_documents(dest: str) -> dict[str, dict]:
    """Every JSON document in DEST by its output name; each one's PNG is there too."""
    listed = {info.key: info.uri for info in objects.list_objects(dest)}
    documents = {}
    for key, uri in listed.items():
        if key.endswith(".json"):
            assert key[:-5] + ".png" in listed, key
            documents[key[:-5]] = json.loads(objects.read_bytes(uri))
    return documents


# ---------------------------------------------------------------------------------------------
# Nightly runs check that both outputs are still in DEST (issue 15, item 10)


def test_nightly_rerun_processes_images_whose_outputs_were_deleted(where, monkeypatch):
    source, dest, store = where
    put(source, {f"img{i}.png": png_bytes(i) for i in range(4)})
    first = run_job(store, source, dest)
    assert (first.state, first.total, first.succeeded) == ("succeeded", 4, 4)
    remove(objects.join(dest, "img1.json") if objects.is_s3(dest) else os.path.join(dest, "img1.json"))
    remove(objects.join(dest, "img2.png") if objects.is_s3(dest) else os.path.join(dest, "img2.png"))

    listings = []
    real_list = objects.list_objects
    monkeypatch.setattr(objects, "list_objects", lambda uri: listings.append(uri) or real_list(uri))
    second = run_job(store, source, dest)
    assert (second.state, second.total, second.succeeded, second.config["skipped"]) == ("succeeded", 2, 2, 2)
    assert sorted(image.key for image in store.images(second.id)) == ["img1.png", "img2.png"]
    assert listings.count(dest) == 1                        # one listing of DEST, not a request per image
    documents = dest_documents(dest)
    assert sorted(documents) == [f"img{i}" for i in range(4)]
    assert all(documents[f"img{i}"]["image"].endswith(f"img{i}.png") for i in range(4))

    listings.clear()
    third = run_job(store, source, dest)                    # everything is there again: nothing to do
    assert (third.total, third.config["skipped"]) == (0, 4) and listings.count(dest) == 1


# ---------------------------------------------------------------------------------------------
# Names that normalise alike are output conflicts (issue 15, item 1)


def test_claim_output_names_is_first_come_first_served(where):
    _, _, store = where
    job_id = store.create_job("n", "/in", "/out", "detr-r50", "random", 0.85, 800, 1333, {})
    assert store.claim_output_names(job_id, [("a.jpg", "a"), ("b.jpg", "b"), ("a.png", "a")]) == {"a.png": "a.jpg"}
    # A later batch: names taken before are conflicts, however far back; keys holding theirs are not.
    assert store.claim_output_names(job_id, [("A.png", "A"), ("a.jpeg", "a"), ("b.jpg", "b"), ("a.tif", "a")]) == \
        {"a.jpeg": "a.jpg", "a.tif": "a.jpg"}
    other = store.create_job("m", "/in", "/out", "detr-r50", "random", 0.85, 800, 1333, {})
    assert store.claim_output_names(other, [("a.png", "a")]) == {}          # names are per job


def test_keys_that_normalise_alike_are_output_conflicts_in_submit_and_nightly_reruns(where):
    source, dest, store = where
    files = {"cafe\u0301.jpg": png_bytes(1),         # decomposed é ...
             "caff.png": png_bytes(2),               # (listed between the two)
             "caf\u00e9.png": png_bytes(3),          # ... and composed: both would write café.png
             "Pic.JPG": png_bytes(4), "Pic.jpeg": png_bytes(5),     # extension and its case
             "sub/x.png": png_bytes(6), "sub/x.webp": png_bytes(7), "z.png": png_bytes(8)}
    if objects.is_s3(source):
        files.update({"d//e.jpg": png_bytes(9), "d/e.png": png_bytes(10),   # empty components
                      "f/./g.jpg": png_bytes(11), "f/g.png": png_bytes(12)})  # "." components
    put(source, files)
    listed = [info.key for info in objects.list_objects(source)]
    by_name: dict[str, list[str]] = {}
    for key in listed:
        by_name.setdefault(output_stem(key), []).append(key)
    assert any(len(keys) > 1 for keys in by_name.values())

    first = run_job(store, source, dest)
    rows = {image.key: image for image in store.images(first.id)}
    assert first.total == len(listed) and first.succeeded == len(by_name)
    documents = dest_documents(dest)
    assert sorted(documents) == sorted(by_name)            # one pair of outputs per name, nothing else
    for name, keys in by_name.items():
        winner, *losers = keys                             # the first listed is processed ...
        assert rows[winner].state == "succeeded" and documents[name]["image"] == rows[winner].uri
        for key in losers:                                 # ... every other one fails, naming it
            assert rows[key].state == "failed" and rows[key].error.startswith("output conflict:"), rows[key]
            assert winner in rows[key].error
    # stats (what `stats --json` prints) == the sums over DEST's JSON files: nothing counted twice.
    assert {r["category_id"]: {k: r[k] for k in ("segments", "images", "pixels")}
            for r in store.class_stats(first.id)} == stats_from_documents(list(documents.values()))

    # Nightly: the winners are unchanged and skipped, the losers (failed before) come back and
    # still conflict with them, although those are not in the new job.
    second = run_job(store, source, dest)
    losers = sorted(key for keys in by_name.values() for key in keys[1:])
    assert (second.total, second.succeeded, second.failed, second.config["skipped"]) == \
        (len(losers), 0, len(losers), len(by_name))
    assert sorted(image.key for image in store.images(second.id, state="failed")) == losers
    assert dest_documents(dest) == documents               # nothing overwritten
