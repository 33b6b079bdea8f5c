"""Where the tests' data lives: inside the repository, so that the tests pass in any clone.

- ``TEST_DATA`` (tests/data/, see its README.md): reference vectors, checkpoint layouts and, in
  ``COCO_GT``, the COCO panoptic ground truth of two val2017 images at full size.
- ``SAMPLES`` (samples/) and ``SAMPLES_GT`` (samples-gt/): the README's sample images and their
  ground truth at the same (downscaled) sizes.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = REPO_ROOT / "tests" / "data"
COCO_GT = TEST_DATA / "panoptic-maps"
SAMPLES = REPO_ROOT / "samples"
SAMPLES_GT = REPO_ROOT / "samples-gt"
