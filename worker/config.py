"""What a run can be configured with: the published model variants (as data), the defaults, and
`ModelConfig`. Nothing here imports torch, so the command line starts fast (`status`, `submit`,
`--help`) and only the commands that run a model pay for loading it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

PUBLISHED_BASE_URL = "https://dl.fbaipublicfiles.com/detr/"


@dataclass(frozen=True)
class VariantSpec:
    name: str
    depth: int               # ResNet depth
    dilation: bool           # DC5: dilated last stage (stride 16)
    checkpoint: str          # published file name; its 8 hex digits start the file's SHA-256
    coco_val_pq: float       # published panoptic quality on COCO val2017

    @property
    def url(self) -> str:
        return PUBLISHED_BASE_URL + self.checkpoint

    @property
    def sha256_prefix(self) -> str:
        return self.checkpoint.rsplit("-", 1)[1].split(".")[0]


VARIANTS: dict[str, VariantSpec] = {
    spec.name: spec for spec in (
        VariantSpec("detr-r50", 50, False, "detr-r50-panoptic-00ce5173.pth", 43.4),
        VariantSpec("detr-r50-dc5", 50, True, "detr-r50-dc5-panoptic-da08f1b1.pth", 44.6),
        VariantSpec("detr-r101", 101, False, "detr-r101-panoptic-40021d53.pth", 45.1),
    )
}
DEFAULT_VARIANT = "detr-r101"

DEFAULT_THRESHOLD = 0.85
DEFAULT_MIN_SIZE = 800
DEFAULT_MAX_SIZE = 1333
# Refuse images above this many pixels before decoding them (decompression bombs).
DEFAULT_MAX_PIXELS = 100_000_000
# Refuse files larger than this many bytes before downloading them (when the size is known).
DEFAULT_MAX_BYTES = 200_000_000
# --precision → the torch dtype the model is autocast to (None: none). "fp32" is IEEE float32
# throughout (TF32 off: CUDA results match the CPU's); "tf32" lets matrix products and
# convolutions round inputs to TF32 on Ampere and later (faster, ~1e-3 relative error).
PRECISIONS: dict[str, str | None] = {"fp32": None, "tf32": None, "bf16": "bfloat16", "fp16": "float16"}


def parse_batch_size(value: int | str) -> int | str:
    """A batch size as given (a positive integer, or "auto") → an int, or "auto"; a ValueError
    that says what is wrong otherwise. The one check of a batch size, torch-free for the command
    line; "auto" becomes a size for a device in worker.predictor.resolve_batch_size."""
    if value == "auto":
        return value
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise ValueError(f"{value!r} is neither a positive integer nor auto")
    return size


@dataclass(frozen=True)
class ModelConfig:
    """Everything that decides what a result looks like, plus where it runs."""
    model: str = DEFAULT_VARIANT
    weights: str = "official"
    threshold: float = DEFAULT_THRESHOLD
    min_size: int = DEFAULT_MIN_SIZE
    max_size: int = DEFAULT_MAX_SIZE
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int | str = "auto"     # images per forward pass, or "auto" (worker.predictor.AUTO_BATCH_SIZE)
    categories: str | None = None      # a label map file (worker.labels); None: the weights' own, else COCO's

    def as_dict(self) -> dict:
        return asdict(self)
