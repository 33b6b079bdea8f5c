"""Seeded "informative" weights for benchmarks: outputs that differ across queries.

Seeded random weights collapse (every query alike: one segment, or none). The model tests'
``tests.test_model.informative_weights`` perturbs and calibrates them so that queries differ and
class scores vary; this saves the result as a bare state dict that ``--weights PATH`` and
``ModelConfig(weights=PATH)`` load like any checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def save_informative_weights(variant: str, path: str | Path, seed: int = 1234) -> Path:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.test_model import DILATION, informative_weights
    from worker.model import create_model

    model = create_model(variant)           # seeded random weights
    weights = informative_weights(model.state_dict(), DILATION[variant], seed=seed)
    model.load_state_dict(weights, strict=True)
    path = Path(path)
    torch.save(model.state_dict(), path)
    return path
