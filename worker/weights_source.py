"""Whether a weights source can be had, told without torch and without loading a model.

`submit` runs where no model is ever loaded (and must start fast: no torch), yet a job whose
weights no worker can load fails every image. So it checks what it can before recording a job:
the published checkpoint is in torch hub's cache or its URL answers; a URL answers; a file or S3
object can be read (it is read anyway, for its hash), and a checkpoint's parameter names fit the
variant. Workers and `run` load the weights themselves and check everything (worker.model.weights).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickletools
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from .config import VARIANTS

__all__ = ["WeightsUnavailable", "WEIGHTS_CHOICES", "hub_checkpoint_dir", "local_weights_path", "url_cache_name",
           "check_weights_available", "check_variant_fits"]

URL_CHECK_TIMEOUT_S = 10.0
# A parameter only DETR-R101 has (its ResNet's third stage has 23 blocks, ResNet-50's has 6).
_R101_ONLY = "detr.backbone.0.body.layer3.22.conv1.weight"
_DETR_PARAMETER = "detr.class_embed.weight"


class WeightsUnavailable(RuntimeError):
    """The weights cannot be found or read, or do not fit the variant; the message says what to do."""


def hub_checkpoint_dir() -> Path:
    """torch.hub.get_dir() / "checkpoints", computed as torch computes it (TORCH_HOME, else
    $XDG_CACHE_HOME/torch, else ~/.cache/torch), without importing torch."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


# What --weights takes, for messages about a source that is not one.
WEIGHTS_CHOICES = "use --weights official, random, a local path, s3://bucket/key or an https:// URL"


def local_weights_path(source: str) -> Path:
    """The file a local --weights source (a path or a file:// URL) names."""
    return Path(urllib.parse.urlparse(source).path if source.startswith("file://") else source).expanduser()


def url_cache_name(url: str) -> str:
    """The file name an http(s) checkpoint is cached under in the hub's checkpoint folder, derived
    from the URL so that reruns do not fetch it again."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or "weights.pth"
    return f"url-{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"


def _url_answers(url: str) -> str | None:
    """None when `url` can be fetched (HEAD), else why not."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=URL_CHECK_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", None) or exc)


def check_weights_available(source: str, variant: str) -> None:
    """Raise WeightsUnavailable unless the published checkpoint or a URL's file is in the cache
    or can be downloaded, or a local checkpoint exists and its parameter names fit `variant`.
    S3 objects are read by the caller (submit hashes them)."""
    from storage.objects import mask_url
    if source == "official":
        spec = VARIANTS[variant]
        path = hub_checkpoint_dir() / spec.checkpoint
        if path.is_file():
            return
        why = _url_answers(spec.url)
        if why:
            raise WeightsUnavailable(
                f"the official weights of {variant} are not in the cache ({path}) and cannot be downloaded "
                f"from {spec.url} ({why}): download that file where there is internet access and copy it "
                f"there (on every machine that runs a model), or pass --weights PATH|s3://bucket/key")
    elif source == "random" or source.startswith("s3://"):
        return                              # S3: read by the caller, for its hash
    elif source.startswith(("http://", "https://")):
        if (hub_checkpoint_dir() / url_cache_name(source)).is_file():
            return
        why = _url_answers(source)
        if why:
            raise WeightsUnavailable(f"cannot download --weights {mask_url(source)}: {why}")
    else:                                   # a local path or file:// URL
        path = local_weights_path(source)
        if path.is_dir():
            raise WeightsUnavailable(f"--weights {path} is a folder: a transformers checkpoint folder runs with "
                                     "`predict` only for now (jobs record the COCO categories); for a job, "
                                     "pass a checkpoint file")
        if not path.is_file():
            raise WeightsUnavailable(f"weights file {path} does not exist ({WEIGHTS_CHOICES})")
        check_variant_fits(path, variant)


def check_variant_fits(path: Path, variant: str) -> None:
    """Raise WeightsUnavailable when a checkpoint's parameter names show another variant (or no
    DETR panoptic model at all). Reads the names from the pickle without running it: nothing is
    unpickled. Checkpoints in a format this cannot read are left to the workers to judge."""
    names = _pickled_strings(path)
    if not names:
        return
    if not any(name.startswith("detr.") for name in names):
        raise WeightsUnavailable(f"--weights {path} is not a DETR panoptic checkpoint (no detr.* parameters): "
                                 "pass the file of a DETR panoptic model")
    if _DETR_PARAMETER not in names:
        return
    is_r101 = _R101_ONLY in names
    if is_r101 != (VARIANTS[variant].depth == 101):
        fits = "detr-r101" if is_r101 else "detr-r50 (or detr-r50-dc5)"
        raise WeightsUnavailable(f"--weights {path} holds a {fits} checkpoint, not {variant}: pass --model {fits}")


def _pickled_strings(path: Path) -> set[str]:
    """The strings in a torch checkpoint's pickle (zip format: <name>/data.pkl; legacy format: the
    pickles at the start of the file); empty when it is neither."""
    strings: set[str] = set()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [name for name in archive.namelist() if name.rsplit("/", 1)[-1] == "data.pkl"]
                if not pickles:
                    return strings
                _collect_strings(io.BytesIO(archive.read(pickles[0])), strings)
        else:
            with open(path, "rb") as stream:
                # Legacy files hold pickles one after another (magic number, protocol, info, data),
                # then raw tensor bytes, where walking stops.
                for _ in range(4):
                    _collect_strings(stream, strings)
    except Exception:       # not a pickle, or one pickletools cannot walk: the workers will say why
        pass
    return strings


def _collect_strings(stream, strings: set[str]) -> None:
    for _opcode, argument, _position in pickletools.genops(stream):
        if isinstance(argument, str):
            strings.add(argument)
