"""What a weights source is, told without torch and without loading a model.

`submit` runs where no model is ever loaded (and must start fast: no torch), yet a job whose
weights no worker can load fails every image. So it checks what it can before recording a job
(`describe_weights`): the published checkpoint is in torch hub's cache or its URL answers; a URL
answers; a file, S3 object or transformers checkpoint folder can be read (it is read anyway, for
its hash), its parameter names fit the variant, and its class head's size and own label map are
known (read from the safetensors header, or from the pickle with every class replaced by an inert
stand-in: no code from the file runs). Workers and `run` load the weights themselves and check
everything (worker.model.weights).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import pickletools
import struct
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .config import VARIANTS
from .labels import DETR_PANOPTIC_CLASSES, LabelMap
from .transformers_config import CONFIG_FILE, CheckpointError, read_checkpoint_folder

__all__ = ["WeightsUnavailable", "WeightsFacts", "WEIGHTS_CHOICES", "hub_checkpoint_dir", "local_weights_path",
           "url_cache_name", "describe_weights", "folder_reader", "is_safetensors", "class_head_size"]

URL_CHECK_TIMEOUT_S = 10.0
# A parameter only DETR-R101 has (its ResNet's third stage has 23 blocks, ResNet-50's has 6).
_R101_ONLY = "detr.backbone.0.body.layer3.22.conv1.weight"
_DETR_PARAMETER = "detr.class_embed.weight"
# The class head's weight: one row per class id plus "no object" (ours; a transformers checkpoint's).
_CLASS_HEADS = (_DETR_PARAMETER, "detr.class_labels_classifier.weight")


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


@dataclass(frozen=True)
class WeightsFacts:
    """What submit can tell about a weights source without loading it."""
    identity: str                   # official:<variant>, random:<variant>, the URL, or sha256:… of the file(s)
    num_classes: int | None         # class ids the head predicts; None: known once a model loads them
    label_map: LabelMap | None = None   # the weights' own (a transformers config's id2label)


def describe_weights(source: str, variant: str) -> WeightsFacts:
    """Raise WeightsUnavailable unless the published checkpoint or a URL's file is in the cache
    or can be downloaded, or a file, S3 object or checkpoint folder can be read and fits
    `variant`; else what the weights are (files are read whole, for their hash)."""
    from storage.objects import mask_url
    if source == "official":
        spec = VARIANTS[variant]
        path = hub_checkpoint_dir() / spec.checkpoint
        if not path.is_file() and (why := _url_answers(spec.url)):
            raise WeightsUnavailable(
                f"the official weights of {variant} are not in the cache ({path}) and cannot be downloaded "
                f"from {spec.url} ({why}): download that file where there is internet access and copy it "
                f"there (on every machine that runs a model), or pass --weights PATH|s3://bucket/key")
        return WeightsFacts(f"official:{variant}", DETR_PANOPTIC_CLASSES)
    if source == "random":
        return WeightsFacts(f"random:{variant}", DETR_PANOPTIC_CLASSES)
    if source.startswith(("http://", "https://")):
        cached = hub_checkpoint_dir() / url_cache_name(source)
        if cached.is_file():
            return WeightsFacts(source, class_head_size(cached.read_bytes()))
        if why := _url_answers(source):
            raise WeightsUnavailable(f"cannot download --weights {mask_url(source)}: {why}")
        return WeightsFacts(source, None)   # checked by whatever loads it (`run`: before recording)
    if source.startswith("s3://"):
        return _describe_s3(source, variant)
    path = local_weights_path(source)       # a local path or file:// URL
    if path.is_dir():
        return _describe_folder(str(path), str(path), variant, folder_reader(str(path)))
    if not path.is_file():
        raise WeightsUnavailable(f"weights file {path} does not exist ({WEIGHTS_CHOICES})")
    return _describe_file(path.read_bytes(), str(path), variant)


def _describe_file(data: bytes, shown: str, variant: str) -> WeightsFacts:
    _check_variant_fits(data, shown, variant)
    return WeightsFacts("sha256:" + hashlib.sha256(data).hexdigest(), class_head_size(data))


def _describe_folder(location: str, shown: str, variant: str, read) -> WeightsFacts:
    try:
        folder = read_checkpoint_folder(read, location, shown, variant)
    except CheckpointError as exc:
        raise WeightsUnavailable(str(exc)) from exc
    # The config counts too: it says how the same tensors are wired (dilation, backbone kind).
    identity = (f"sha256:{hashlib.sha256(folder.weights).hexdigest()}"
                f"+config:{hashlib.sha256(folder.config).hexdigest()}")
    return WeightsFacts(identity, class_head_size(folder.weights), folder.label_map)


def _describe_s3(source: str, variant: str) -> WeightsFacts:
    """An object (a checkpoint file) or a prefix (a transformers checkpoint folder): a URI ending
    in "/" is a prefix; another is the object, else the prefix of that name."""
    from storage.objects import ObjectNotFound, ObjectStoreError, read_bytes
    reader = folder_reader(source)
    if not source.endswith("/"):
        try:
            return _describe_file(read_bytes(source), source, variant)
        except ObjectNotFound as exc:
            if reader(CONFIG_FILE) is None:
                raise WeightsUnavailable(f"cannot read --weights {source}: {exc}") from exc
        except ObjectStoreError as exc:
            raise WeightsUnavailable(f"cannot read --weights {source}: {exc}") from exc
    return _describe_folder(source, source, variant, reader)


def folder_reader(location: str, error: type[Exception] = WeightsUnavailable):
    """read(name) → the bytes of file `name` in a local folder or under an S3 prefix, None where
    it is missing; `error` for a store that cannot be read."""
    from storage.objects import ObjectNotFound, ObjectStoreError, is_s3, join, read_bytes
    if not is_s3(location):
        folder = Path(location)
        return lambda name: (folder / name).read_bytes() if (folder / name).is_file() else None

    def read(name: str) -> bytes | None:
        try:
            return read_bytes(join(location, name))
        except ObjectNotFound:
            return None
        except ObjectStoreError as exc:
            raise error(f"cannot read weights from {location}: {exc}") from exc
    return read


def _check_variant_fits(data: bytes, shown: str, variant: str) -> None:
    """Raise WeightsUnavailable when a checkpoint's parameter names show another variant (or no
    DETR panoptic model at all). Reads the names from the pickle without running it: nothing is
    unpickled. Checkpoints in a format this cannot read are left to the workers to judge."""
    names = _pickled_strings(data)
    if not names:
        return
    if not any(name.startswith("detr.") for name in names):
        raise WeightsUnavailable(f"--weights {shown} is not a DETR panoptic checkpoint (no detr.* parameters): "
                                 "pass the file of a DETR panoptic model")
    if _DETR_PARAMETER not in names:
        return
    is_r101 = _R101_ONLY in names
    if is_r101 != (VARIANTS[variant].depth == 101):
        fits = "detr-r101" if is_r101 else "detr-r50 (or detr-r50-dc5)"
        raise WeightsUnavailable(f"--weights {shown} holds a {fits} checkpoint, not {variant}: pass --model {fits}")


def is_safetensors(data: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON."""
    if len(data) < 10 or data[8:10] != b'{"':
        return False
    return 8 + struct.unpack("<Q", data[:8])[0] <= len(data)


def class_head_size(data: bytes) -> int | None:
    """How many class ids a checkpoint's head predicts (its class head's rows, less "no object"),
    read without torch; None when the file does not say (another format, no DETR head)."""
    try:
        shapes = _safetensors_shapes(data) if is_safetensors(data) else _pickled_shapes(data)
    except Exception:       # unreadable here: whatever loads the weights will say why
        return None
    for name in _CLASS_HEADS:
        shape = shapes.get(name)
        if isinstance(shape, _Shape) and len(shape) == 2 and shape[0] > 1:
            return shape[0] - 1
    return None


class _Shape(tuple):
    """A tensor, as the shape unpickler sees it."""


def _safetensors_shapes(data: bytes) -> dict[str, _Shape]:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    return {name: _Shape(entry["shape"]) for name, entry in header.items()
            if isinstance(entry, dict) and "shape" in entry}


class _Inert:
    """Whatever a checkpoint's pickle names besides tensors and dicts: built, filled and called
    without effect, so that no code from the file runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


def _rebuild_tensor(storage, offset, size, *rest) -> _Shape:
    return _Shape(size)


def _first(value, *rest):
    return value


class _ShapeUnpickler(pickle.Unpickler):
    """A torch checkpoint's pickle with every tensor as its shape (torch._utils' rebuild functions
    are the only names it keeps meaning for, with OrderedDict); the rest becomes _Inert."""

    KNOWN = {("collections", "OrderedDict"): collections.OrderedDict,
             ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
             ("torch._utils", "_rebuild_parameter"): _first,
             ("torch._utils", "_rebuild_parameter_with_state"): _first}

    def find_class(self, module, name):
        return self.KNOWN.get((module, name), _Inert)

    def persistent_load(self, pid):     # the tensors' storages: not needed for shapes
        return None


def _pickled_shapes(data: bytes) -> dict:
    """name → shape of each tensor in a zip-format torch checkpoint's state dict (also inside
    {"model": …}); empty for other formats."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        pickles = [name for name in archive.namelist() if name.rsplit("/", 1)[-1] == "data.pkl"]
        if not pickles:
            return {}
        loaded = _ShapeUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    return loaded if isinstance(loaded, dict) else {}


def _pickled_strings(data: bytes) -> set[str]:
    """The strings in a torch checkpoint's pickle (zip format: <name>/data.pkl; legacy format: the
    pickles at the start of the file); empty when it is neither."""
    strings: set[str] = set()
    try:
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                pickles = [name for name in archive.namelist() if name.rsplit("/", 1)[-1] == "data.pkl"]
                if not pickles:
                    return strings
                _collect_strings(io.BytesIO(archive.read(pickles[0])), strings)
        else:
            stream = io.BytesIO(data)
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
