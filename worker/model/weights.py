"""Where each variant's weights come from, and how a weights source becomes a state dict.

The published checkpoints are described as data in worker.config (no torch there, for the
command line); this module turns them, or any other source, into state dicts.
A weights source is one of:
  "official"        the published checkpoint, cached in torch hub's checkpoint folder and checked
                    against the SHA-256 prefix in its file name;
  "random"          seeded initialisation (smoke runs, tests) — only when asked for by name;
  a local path, "s3://bucket/key", "http(s)://…" or "file://…": a checkpoint in the official
                    layout, as a PyTorch file or a `.safetensors` file (recognised by content);
  a local folder or an S3 prefix holding a transformers `DetrForSegmentation` checkpoint
                    (`config.json` with `model.safetensors` or `pytorch_model.bin`), see
                    transformers_checkpoint.py.
PyTorch files are always read with `torch.load(..., weights_only=True)` and safetensors files with
the `safetensors` package: no pickled code runs.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from storage.objects import redact_urls, without_secrets

from ..config import VARIANTS, VariantSpec
from ..weights_source import WEIGHTS_CHOICES, folder_reader, is_safetensors, local_weights_path, url_cache_name
from ..labels import LabelMap
from ..transformers_config import CONFIG_FILE, CheckpointError, read_checkpoint_folder
from . import transformers_checkpoint

RANDOM_SEED = 0


class WeightsError(RuntimeError):
    """A weights source that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class LoadedWeights:
    state_dict: dict[str, torch.Tensor]
    sha256: str          # of the checkpoint file's bytes
    source: str          # as given, secrets dropped (storage.objects.without_secrets): for messages
    label_map: LabelMap | None = None    # the checkpoint's own (a transformers config's id2label)


def checkpoint_cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safetensors_state_dict(data: bytes, source: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"cannot read weights from {source}: not a loadable safetensors file — {exc}") from exc


def _state_dict_from_bytes(data: bytes, source: str) -> dict[str, torch.Tensor]:
    if is_safetensors(data):
        return _safetensors_state_dict(data, source)
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"cannot read weights from {source}: not a loadable PyTorch checkpoint "
            f"(weights_only=True refuses pickled code) — {reason}") from exc
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise WeightsError(f"cannot read weights from {source}: expected a state dict or "
                           f'{{"model": state_dict}}, got {type(checkpoint).__name__}')
    return checkpoint


def _official_path(spec: VariantSpec) -> Path:
    path = checkpoint_cache_dir() / spec.checkpoint
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(spec.url, str(path), hash_prefix=None, progress=False)
        except Exception as exc:
            raise WeightsError(
                f"the official weights of {spec.name} ({spec.checkpoint}) are not in the cache and "
                f"could not be downloaded from {spec.url}: {exc}. Download that file on a machine "
                f"with internet access and copy it to {path}, or pass --weights PATH|s3://…") from exc
    digest = sha256_of_file(path)
    if not digest.startswith(spec.sha256_prefix):
        raise WeightsError(
            f"{path} does not match the published {spec.checkpoint}: its SHA-256 is {digest}, the "
            f"published one starts with {spec.sha256_prefix}. Delete it and fetch it again.")
    return path


def _download_url(url: str) -> Path:
    """http(s) URLs are cached under a name derived from the URL, so reruns do not refetch."""
    path = checkpoint_cache_dir() / url_cache_name(url)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as exc:
            # The URL may carry a signature or password (predict takes such URLs): never in a message.
            reason = str(exc).replace(url, without_secrets(url))
            raise WeightsError(f"cannot download weights from {without_secrets(url)}: "
                               f"{type(exc).__name__}: {redact_urls(reason)}") from exc
    return path


def load_weights(source: str, variant: str) -> LoadedWeights:
    """Resolve a weights source other than "random" into a state dict and the file's SHA-256."""
    spec = VARIANTS[variant]
    shown = without_secrets(source)         # what messages and the loaded weights' provenance show
    if source == "official":
        path = _official_path(spec)
        data = path.read_bytes()
    elif source.startswith(("http://", "https://")):
        data = _download_url(source).read_bytes()
    elif source.startswith("s3://"):
        # storage is the only code that talks to S3; retried: a throttled store must not fail a chunk.
        from storage.objects import ObjectNotFound, ObjectStoreError, read_bytes_retrying
        read_prefix = folder_reader(source, WeightsError)
        try:
            if source.endswith("/"):
                return _load_transformers_folder(shown, shown, variant, read_prefix)
            data = read_bytes_retrying(source)
        except ObjectNotFound as exc:
            if read_prefix(CONFIG_FILE) is None:   # nor a checkpoint's prefix
                raise WeightsError(f"cannot read weights from {shown}: {exc}") from exc
            return _load_transformers_folder(shown, shown, variant, read_prefix)
        except ObjectStoreError as exc:
            raise WeightsError(f"cannot read weights from {shown}: {exc}") from exc
    else:
        path = local_weights_path(source)
        if path.is_dir():
            return _load_transformers_folder(str(path), shown, variant, folder_reader(str(path)))
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist ({WEIGHTS_CHOICES})")
        data = path.read_bytes()
    return LoadedWeights(_state_dict_from_bytes(data, shown), hashlib.sha256(data).hexdigest(), shown)


def _load_transformers_folder(location: str, source: str, variant: str, read) -> LoadedWeights:
    """A transformers `DetrForSegmentation` checkpoint in a folder or S3 prefix (`read(name)` gives
    a file's bytes, None where it is missing): its config is checked against `variant`, its
    parameters renamed to ours; its id2label becomes the weights' label map."""
    try:
        folder = read_checkpoint_folder(read, location, source, variant)
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from exc
    path, data = folder.weights_path, folder.weights
    raw = _safetensors_state_dict(data, path) if path.endswith(".safetensors") else _state_dict_from_bytes(data, path)
    try:
        state_dict = transformers_checkpoint.convert_state_dict(raw, folder.architecture)
    except CheckpointError as exc:
        raise WeightsError(f"cannot map {path} onto {variant}: {exc}") from exc
    return LoadedWeights(state_dict, hashlib.sha256(data).hexdigest(), source, folder.label_map)


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A content hash for weights that have no file (random initialisation): names and bytes."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
