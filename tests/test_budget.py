"""The decoded-pixel budget (worker.budget): images wait for room instead of all decoding at once,
and an image larger than the whole budget still runs, alone."""

from __future__ import annotations

import pytest

from .test_pipeline import _chunk_job


def test_images_wait_for_room_in_the_pixel_budget(tmp_path, monkeypatch):
    from worker import budget as budget_module
    from worker import pipeline
    from worker.pipeline import ChunkProcessor

    limit = 25_000                                   # room for two 120×100 images, not three
    monkeypatch.setenv("PANOPTIC_MAX_DECODED_PIXELS", str(limit))
    sizes = [(120, 100)] * 4 + [(300, 200)]          # the last one alone is over the budget
    store, job_id, chunks = _chunk_job(tmp_path, sizes, batch_size=2)

    held_after_each_take, refusals, decodes = [], [], []
    try_acquire = budget_module.PixelBudget.try_acquire

    def counting_try_acquire(self, image_id, pixels):
        taken = try_acquire(self, image_id, pixels)
        if taken:
            held_after_each_take.append((self.in_use, len(self._held)))
        else:
            refusals.append(pixels)
        return taken

    monkeypatch.setattr(budget_module.PixelBudget, "try_acquire", counting_try_acquire)
    decode_image = pipeline.decode_image
    monkeypatch.setattr(pipeline, "decode_image", lambda *args: decodes.append(1) or decode_image(*args))

    processor = ChunkProcessor(store, device="cpu")
    ((job, ids),) = chunks
    outcomes = processor.process(job, ids)

    assert len(outcomes) == 5 and all(o.ok for o in outcomes)
    assert store.job(job_id).state == "succeeded"
    assert len(decodes) == 5                                            # each decoded once
    assert len(held_after_each_take) == 5
    # Never more than the budget decoded at once, unless one image is alone in it.
    assert all(in_use <= limit or images == 1 for in_use, images in held_after_each_take)
    assert (300 * 200, 1) in held_after_each_take                       # the big one ran, alone
    assert max(images for _, images in held_after_each_take) == 2       # the budget, not less, was used
    assert refusals                                                     # and images did wait for room
    assert processor._budget.in_use == 0                                # all given back at the end


@pytest.mark.parametrize("value, expected", [("", 100_000_000), ("0", None), ("5000", 5000)])
def test_the_budget_is_configurable(monkeypatch, value, expected):
    from worker.budget import max_decoded_pixels

    monkeypatch.setenv("PANOPTIC_MAX_DECODED_PIXELS", value)
    assert max_decoded_pixels() == expected


def test_a_budget_that_is_not_a_number_is_refused_with_the_reason(monkeypatch):
    from worker.budget import max_decoded_pixels

    monkeypatch.setenv("PANOPTIC_MAX_DECODED_PIXELS", "lots")
    with pytest.raises(ValueError, match="PANOPTIC_MAX_DECODED_PIXELS='lots' is not a whole number"):
        max_decoded_pixels()
