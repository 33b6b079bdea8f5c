"""Weight sources: every one we can serve locally round-trips an official-format checkpoint."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading

import boto3
import pytest
import torch

from worker.model import WeightsError, create_model
from worker.model.weights import VARIANTS, checkpoint_cache_dir

VARIANT = "detr-r50"   # the smallest checkpoint (172 MB) serves every source test


@pytest.fixture(autouse=True)
def private_torch_home(tmp_path, monkeypatch):
    """Each test gets its own torch hub cache, so nothing leaks between tests or to the user."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An official-format checkpoint ({"model": state_dict}) whose weights differ from seed 0's."""
    state_dict = create_model(VARIANT, seed=1).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "detr-r50-custom.pth"
    torch.save({"model": state_dict}, path)
    return path, state_dict, hashlib.sha256(path.read_bytes()).hexdigest()


def assert_loaded(model, checkpoint):
    _, state_dict, sha256 = checkpoint
    assert model.weights_sha256 == sha256
    assert not model.training
    loaded = model.state_dict()
    assert loaded.keys() == state_dict.keys()
    assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)
    assert not torch.equal(loaded["detr.query_embed.weight"],
                           create_model(VARIANT).state_dict()["detr.query_embed.weight"])


def test_local_path(checkpoint):
    assert_loaded(create_model(VARIANT, weights=str(checkpoint[0])), checkpoint)


def test_file_url(checkpoint):
    assert_loaded(create_model(VARIANT, weights=checkpoint[0].as_uri()), checkpoint)


def test_s3(checkpoint, s3_bucket):
    boto3.client("s3").upload_file(str(checkpoint[0]), s3_bucket, "models/detr.pth")
    assert_loaded(create_model(VARIANT, weights=f"s3://{s3_bucket}/models/detr.pth"), checkpoint)


def test_s3_missing_object(s3_bucket):
    with pytest.raises(WeightsError, match=f"s3://{s3_bucket}/nothing.pth"):
        create_model(VARIANT, weights=f"s3://{s3_bucket}/nothing.pth")


@pytest.fixture
def http_server(checkpoint):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(checkpoint[0].parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_url_is_downloaded_once_into_the_cache(checkpoint, http_server):
    url = f"{http_server}/{checkpoint[0].name}"
    assert_loaded(create_model(VARIANT, weights=url), checkpoint)
    cached = list(checkpoint_cache_dir().iterdir())
    assert len(cached) == 1 and cached[0].name.endswith(checkpoint[0].name)
    assert_loaded(create_model(VARIANT, weights=url), checkpoint)   # from the cache
    assert list(checkpoint_cache_dir().iterdir()) == cached


def test_http_url_not_found(http_server):
    with pytest.raises(WeightsError, match="cannot download weights from .*missing.pth.*404"):
        create_model(VARIANT, weights=f"{http_server}/missing.pth")


def test_official_offline_names_the_file_and_how_to_supply_it(monkeypatch):
    # A proxy on a closed local port makes any download fail at once, as offline.
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    spec = VARIANTS["detr-r101"]
    with pytest.raises(WeightsError) as info:
        create_model("detr-r101", weights="official")
    message = str(info.value)
    assert spec.checkpoint in message
    assert str(checkpoint_cache_dir() / spec.checkpoint) in message
    assert "--weights PATH" in message


def test_official_cached_file_with_wrong_hash_is_refused():
    spec = VARIANTS[VARIANT]
    path = checkpoint_cache_dir() / spec.checkpoint
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the published checkpoint")
    with pytest.raises(WeightsError, match=f"does not match the published {spec.checkpoint}.*{spec.sha256_prefix}"):
        create_model(VARIANT, weights="official")


def test_missing_path():
    with pytest.raises(WeightsError, match="does not exist"):
        create_model(VARIANT, weights="/no/such/weights.pth")


@pytest.mark.parametrize("content", [b"", b"garbage" * 100], ids=["empty", "garbage"])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="not a loadable PyTorch checkpoint"):
        create_model(VARIANT, weights=str(path))


def test_truncated_checkpoint(tmp_path, checkpoint):
    path = tmp_path / "truncated.pth"
    path.write_bytes(checkpoint[0].read_bytes()[: 10_000_000])
    with pytest.raises(WeightsError, match="not a loadable PyTorch checkpoint"):
        create_model(VARIANT, weights=str(path))


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_code_never_runs(tmp_path):
    """weights_only=True: a checkpoint that would run code when unpickled is refused instead."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _RunsCodeWhenUnpickled(str(marker))}, path)
    with pytest.raises(WeightsError, match="weights_only=True"):
        create_model(VARIANT, weights=str(path))
    assert not marker.exists()


def test_checkpoint_of_another_variant_says_which(tmp_path):
    path = tmp_path / "r101.pth"
    torch.save({"model": create_model("detr-r101").state_dict()}, path)
    with pytest.raises(WeightsError, match="do not fit detr-r50: unexpected .*--model detr-r101"):
        create_model(VARIANT, weights=str(path))


def test_bare_state_dict_is_accepted(tmp_path, checkpoint):
    path = tmp_path / "bare.pth"
    torch.save(checkpoint[1], path)
    model = create_model(VARIANT, weights=str(path))
    assert torch.equal(model.state_dict()["detr.class_embed.bias"], checkpoint[1]["detr.class_embed.bias"])


def test_random_weights_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b = create_model(VARIANT), create_model(VARIANT, weights="random")
    assert torch.equal(torch.rand(3), expected_next)
    assert a.weights_sha256 == b.weights_sha256
    assert torch.equal(a.state_dict()["detr.query_embed.weight"], b.state_dict()["detr.query_embed.weight"])
    assert create_model(VARIANT, seed=5).weights_sha256 != a.weights_sha256
