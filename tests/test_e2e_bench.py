"""bench/e2e_gpu.py, the one command a lent GPU runs for issue 14's figures, still runs end to end
(tiny settings on the CPU): a broken option or output there would waste a GPU session."""

from __future__ import annotations

import json

from bench.e2e_gpu import image_sizes, main


def test_image_mix_is_mostly_640x480_with_portrait_and_odd_sizes():
    sizes = image_sizes(100)
    assert sizes.count((640, 480)) == 80
    assert (480, 640) in sizes and len(set(sizes)) >= 5


def test_e2e_bench_runs_panoptic_batch_run_and_writes_its_figures(tmp_path):
    report = main(["--device", "cpu", "--model", "detr-r50", "--weights", "random", "--images", "3",
                   "--small", "1", "--unique", "2", "--min-size", "64", "--max-size", "96", "--configs", "fp32:2:2:3",
                   "--seed-images", "1", "--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "e2e.json")])
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert saved["rows"] == report["rows"] and len(saved["rows"]) == 1
    row = saved["rows"][0]
    assert (row["precision"], row["batch_size"], row["in_flight"], row["postprocess_threads"]) == ("fp32", 2, 2, 3)
    assert not saved["partial"]
    assert row["large"]["images"] == 3 and row["small"]["images"] == 1
    assert row["marginal_images_per_s"] > 0 and row["large"]["peak_rss_mib"] > 100
    assert row["large"]["first_output_s"] is not None
    assert saved["seed"]["images"] == 1 and saved["seed"]["ms_per_image_median"] > 0
    # Both jobs wrote their databases and logs in the work folder (outputs are removed after).
    assert sorted(p.name for p in (tmp_path / "work").glob("jobs-*.db")) == ["jobs-fp32-b2-f2-t3-large.db",
                                                                            "jobs-fp32-b2-f2-t3-small.db"]
