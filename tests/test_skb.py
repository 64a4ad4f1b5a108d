"""SKB component and checkpoint loading: strict loads, safe unpickling, http/s3 sources, priors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from components import checkpoints, skb
from components.checkpoints import (
    CheckpointError,
    ChecksumMismatchError,
    StateDictMismatchError,
    load_state_dict_from_uri,
    load_strict,
    strip_prefixes,
)
from components.registry import available, create
from models.hrnet import HRNet, hrnet_w18_small_config, hrnet_w48_config

SMALL = "skb/hrnet-w18-small-test@1"


def _small_net(seed: int = 3) -> HRNet:
    net = HRNet(hrnet_w18_small_config())
    net.init_weights("kaiming", generator=torch.Generator().manual_seed(seed))
    return net


def _official_style(net: HRNet) -> dict:
    """What HRNet's training code saves: FullModel keys (``model.*`` + ``loss.*``) under ``state_dict``."""
    sd = {f"model.{k}": v for k, v in net.state_dict().items()}
    sd["loss.criterion.weight"] = torch.ones(59)
    return {"state_dict": sd, "epoch": 200}


@pytest.fixture()
def small_ckpt(tmp_path: Path) -> tuple[Path, HRNet, str]:
    net = _small_net()
    path = tmp_path / "hrnet_small.pth"
    torch.save(_official_style(net), path)
    return path, net, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def cpu_skb() -> skb.SemanticKnowledgeBank:
    return create(SMALL, device="cpu")


# ---------------------------------------------------------------------------------------------- loading
def test_registered_specs() -> None:
    assert {"skb/hrnet-w48-pascal@1", SMALL} <= set(available("skb"))


def test_prefixed_checkpoint_loads_strictly(small_ckpt: tuple[Path, HRNet, str]) -> None:
    path, net, digest = small_ckpt
    model = create(SMALL, checkpoint=str(path), expected_sha256=digest, device="cpu")
    assert model.pretrained
    assert model.weights_id == f"sha256:{digest}"
    loaded, ref = model.model.state_dict(), net.state_dict()
    assert set(loaded) == set(ref)
    assert all(torch.equal(loaded[k].cpu(), ref[k]) for k in ref)


def test_w48_official_style_state_dict_loads_strictly() -> None:
    net = HRNet(hrnet_w48_config())
    wrapped = {f"module.model.{k}": v.clone() for k, v in net.state_dict().items()}  # DataParallel(FullModel)
    wrapped["module.model.last_layer.3.weight"].fill_(0.5)
    sd = strip_prefixes(wrapped)
    assert load_strict(net, {**sd, "loss.criterion.weight": torch.ones(59)}) == 1_839
    assert bool((net.last_layer[3].weight == 0.5).all())


def test_truncated_checkpoint_fails_naming_missing_keys(tmp_path: Path) -> None:
    sd = _official_style(_small_net())["state_dict"]
    dropped = sorted(k for k in sd if k.startswith("model.last_layer."))
    for k in dropped:
        del sd[k]
    path = tmp_path / "truncated.pth"
    torch.save(sd, path)
    with pytest.raises(StateDictMismatchError, match="missing key") as info:
        create(SMALL, checkpoint=str(path), device="cpu")
    assert "last_layer.3.weight" in str(info.value) and str(path) in str(info.value)
    assert set(info.value.missing) == {k.removeprefix("model.") for k in dropped if "num_batches" not in k}


def test_unexpected_and_misshaped_keys_fail() -> None:
    net = _small_net()
    sd = dict(net.state_dict())
    with pytest.raises(StateDictMismatchError, match="unexpected") as info:
        load_strict(HRNet(hrnet_w18_small_config()), {**sd, "aux_head.weight": torch.zeros(1)})
    assert info.value.unexpected == ["aux_head.weight"]
    sd["last_layer.3.bias"] = torch.zeros(21)
    with pytest.raises(StateDictMismatchError, match=r"last_layer\.3\.bias \(checkpoint \(21,\)"):
        load_strict(HRNet(hrnet_w18_small_config()), sd)


def test_missing_batch_counters_are_tolerated() -> None:
    sd = {k: v for k, v in _small_net().state_dict().items() if not k.endswith("num_batches_tracked")}
    target = HRNet(hrnet_w18_small_config())
    assert load_strict(target, sd) == len(sd)


class _Payload:
    """Unpickling this creates a file: a stand-in for a checkpoint that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_weights_only_refuses_code_execution(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="not a weights-only checkpoint"):
        load_state_dict_from_uri(path)
    assert not marker.exists()
    # The file really is dangerous: an unrestricted load runs the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_file_and_bad_scheme(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict_from_uri(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="unsupported checkpoint URI scheme"):
        load_state_dict_from_uri("ftp://host/x.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_state_dict_from_uri(tmp_path / "junk.pth")


def test_local_sha256_mismatch(small_ckpt: tuple[Path, HRNet, str]) -> None:
    path, _, _ = small_ckpt
    with pytest.raises(ChecksumMismatchError, match="sha256 mismatch"):
        load_state_dict_from_uri(path, expected_sha256="0" * 64)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(_QuietHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, requests
    finally:
        server.shutdown()
        server.server_close()


def test_http_download_cache_and_checksum(http_root: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    base, root, requests = http_root
    net = _small_net()
    torch.save(_official_style(net), root / "hrnet.pth")
    digest = hashlib.sha256((root / "hrnet.pth").read_bytes()).hexdigest()
    cache = tmp_path / "cache"

    model = create(
        SMALL, checkpoint=f"{base}/hrnet.pth", expected_sha256=digest, cache_dir=str(cache), device="cpu"
    )
    assert model.pretrained and model.weights_id == f"sha256:{digest}"
    assert torch.equal(model.model.conv1.weight, net.conv1.weight)
    cached = list(cache.rglob("hrnet.pth"))
    assert len(cached) == 1 and not list(cache.rglob("*.part"))
    assert len(requests) == 1
    load_state_dict_from_uri(f"{base}/hrnet.pth", expected_sha256=digest, cache_dir=cache)
    assert len(requests) == 1  # served from the verified cache

    other = tmp_path / "cache2"
    with pytest.raises(ChecksumMismatchError, match="sha256 mismatch"):
        load_state_dict_from_uri(f"{base}/hrnet.pth", expected_sha256="f" * 64, cache_dir=other)
    assert not [p for p in other.rglob("*") if p.is_file()]  # nothing half-written is left behind
    with pytest.raises(CheckpointError, match="HTTP 404"):
        load_state_dict_from_uri(f"{base}/missing.pth", cache_dir=other)


@pytest.mark.s3
def test_s3_checkpoint(s3_env: str, small_ckpt: tuple[Path, HRNet, str]) -> None:
    from components.storage import open_storage

    path, net, digest = small_ckpt
    uri = open_storage(f"s3://{s3_env}/weights").put_file("hrnet/small.pth", path)
    model = create(SMALL, checkpoint=uri, expected_sha256=digest, device="cpu")
    assert model.pretrained and torch.equal(model.model.last_layer[3].bias, net.last_layer[3].bias)
    with pytest.raises(ChecksumMismatchError):
        load_state_dict_from_uri(uri, expected_sha256="1" * 64)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict_from_uri(f"s3://{s3_env}/weights/none.pth")


# ---------------------------------------------------------------------------------------------- priors
@pytest.mark.parametrize(("h", "w"), [(400, 600), (97, 131)])
def test_prior_shapes_for_unpadded_image(cpu_skb: skb.SemanticKnowledgeBank, h: int, w: int) -> None:
    priors = cpu_skb(torch.rand(1, 3, h, w))

    def c(n: int, s: int) -> int:
        return -(-n // s)

    assert tuple(priors.f0.shape) == (1, 18, c(h, 4), c(w, 4))
    assert tuple(priors.f1.shape) == (1, 36, c(h, 8), c(w, 8))
    assert tuple(priors.f2.shape) == (1, 72, c(h, 16), c(w, 16))
    assert tuple(priors.logits.shape) == (1, 59, c(h, 4), c(w, 4))
    assert priors.probabilities((h, w)).shape == (1, 59, h, w)
    assert priors.full_logits((h, w)).shape == (1, 59, h, w)
    assert priors.labels((h, w)).shape == (1, h, w)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in (*priors.features, priors.logits))
    assert priors.half().f0.dtype == torch.float16


def test_lol_size_matches_spec(cpu_skb: skb.SemanticKnowledgeBank) -> None:
    p = cpu_skb(torch.rand(1, 3, 400, 600))
    assert [tuple(t.shape[-2:]) for t in (p.f0, p.f1, p.f2, p.logits)] == [
        (100, 150),
        (50, 75),
        (25, 38),
        (100, 150),
    ]


def test_priors_are_cropped_from_the_reflect_padded_run(cpu_skb: skb.SemanticKnowledgeBank) -> None:
    x = torch.rand(1, 3, 40, 50)
    padded = F.pad(x, (0, 14, 0, 24), mode="reflect")  # -> 64 x 64
    with torch.inference_mode():
        ref = cpu_skb.model(padded.contiguous(memory_format=torch.channels_last))
    p = cpu_skb(x)
    torch.testing.assert_close(p.f1, ref.features[1][..., :5, :7])
    torch.testing.assert_close(p.logits, ref.logits[..., :10, :13])


def test_tiny_images_are_padded_in_rounds(cpu_skb: skb.SemanticKnowledgeBank) -> None:
    for h, w in ((5, 7), (1, 3)):
        p = cpu_skb(torch.rand(1, 3, h, w))
        assert tuple(p.logits.shape[-2:]) == (-(-h // 4), -(-w // 4))
    assert skb.reflect_pad_to_multiple(torch.rand(1, 3, 5, 7), 32).shape[-2:] == (32, 32)


def test_batch_equals_per_image_in_eval_mode(cpu_skb: skb.SemanticKnowledgeBank) -> None:
    x = torch.rand(2, 3, 64, 96)
    batched = cpu_skb(x)
    singles = [cpu_skb(x[i : i + 1]) for i in range(2)]
    for i, (one, single) in enumerate(zip(batched.unbind(), singles, strict=True)):
        torch.testing.assert_close(one.logits, single.logits, rtol=1e-4, atol=1e-4, msg=f"image {i}")


def test_frozen_and_eval_bn_survive_parent_train(cpu_skb: skb.SemanticKnowledgeBank) -> None:
    assert not any(p.requires_grad for p in cpu_skb.parameters())
    parent = torch.nn.Sequential(cpu_skb)
    parent.train()
    assert not cpu_skb.model.training and not cpu_skb.model.bn1.training
    before = cpu_skb.model.bn1.running_mean.clone()
    cpu_skb(torch.rand(1, 3, 32, 32))
    assert torch.equal(cpu_skb.model.bn1.running_mean, before)


def test_train_bn_mode_uses_batch_statistics() -> None:
    model = create(SMALL, bn_mode="train", device="cpu")
    model.eval()  # a parent's eval() does not change the configured BN mode
    assert model.model.bn1.training
    before = model.model.bn1.running_mean.clone()
    x = torch.rand(2, 3, 64, 64)
    out = model(x)
    assert not torch.equal(model.model.bn1.running_mean, before)
    # batch statistics: one image's priors depend on its batch companion
    alone = model(x[:1])
    assert not torch.allclose(out.logits[:1], alone.logits, atol=1e-4)


def test_grad_mode_reaches_input_not_params(cpu_skb: skb.SemanticKnowledgeBank) -> None:
    x = torch.rand(1, 3, 48, 48, requires_grad=True)
    p = cpu_skb(x, grad=True)
    (p.f0.square().mean() + p.f2.mean() + p.full_logits((48, 48)).logsumexp(1).mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(param.grad is None for param in cpu_skb.parameters())


def test_default_mode_outputs_are_usable_downstream(cpu_skb: skb.SemanticKnowledgeBank) -> None:
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    p = cpu_skb(x)
    assert p.f0.grad_fn is None and not p.f0.requires_grad and not p.f0.is_inference()
    conv = torch.nn.Conv2d(18, 4, 1)  # an SE projection trained on cached priors
    conv(p.f0).mean().backward()
    assert conv.weight.grad is not None and x.grad is None


def test_input_transforms() -> None:
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(skb.apply_input_transform(x, "linear"), x)
    torch.testing.assert_close(
        skb.apply_input_transform(x, "log"), torch.log(torch.clamp(x + 1e-3, min=1e-3))
    )
    expect = (x.flatten() - torch.tensor(skb.IMAGENET_MEAN)) / torch.tensor(skb.IMAGENET_STD)
    torch.testing.assert_close(skb.apply_input_transform(x, "imagenet").flatten(), expect)
    img = torch.rand(1, 3, 32, 32)
    outs = [create(SMALL, input_transform=t, device="cpu")(img).logits for t in skb.INPUT_TRANSFORMS]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


def test_bad_arguments_fail_clearly() -> None:
    with pytest.raises(ValueError, match="bn_mode"):
        create(SMALL, bn_mode="frozen", device="cpu")
    with pytest.raises(ValueError, match="input_transform"):
        create(SMALL, input_transform="srgb", device="cpu")
    with pytest.raises(ValueError, match="without a checkpoint"):
        create(SMALL, expected_sha256="0" * 64, device="cpu")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        create(SMALL, device="cpu")(torch.rand(3, 32, 32))


# ---------------------------------------------------------------------------------------------- identity
def test_fingerprint_changes_with_every_setting(small_ckpt: tuple[Path, HRNet, str]) -> None:
    path, _, _ = small_ckpt
    base = dict(device="cpu")
    variants = {
        "base": {},
        "bn": {"bn_mode": "train"},
        "log": {"input_transform": "log"},
        "imagenet": {"input_transform": "imagenet"},
        "pad": {"pad_multiple": 64},
        "seed": {"seed": 1},
        "amp": {"amp": False},
        "ckpt": {"checkpoint": str(path)},
    }
    prints = {name: create(SMALL, **base, **kw).fingerprint for name, kw in variants.items()}
    assert len(set(prints.values())) == len(prints), prints
    assert create(SMALL, **base).fingerprint == prints["base"]  # stable across instances
    w48 = create("skb/hrnet-w48-pascal@1", **base)
    assert w48.fingerprint not in prints.values()
    assert w48.feature_channels == (48, 96, 192) and w48.num_classes == 59
    assert sum(p.numel() for p in w48.model.parameters()) == 65_888_219


def test_random_init_warns_once_and_describe(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, small_ckpt: tuple[Path, HRNet, str]
) -> None:
    monkeypatch.setattr(skb, "_warned_random", set())
    with caplog.at_level(logging.WARNING, logger="components.skb"):
        first = create(SMALL, device="cpu")
        create(SMALL, device="cpu", seed=4)
    warnings = [r for r in caplog.records if "NO checkpoint" in r.getMessage()]
    assert len(warnings) == 1
    info = first.describe()
    assert info["skb.pretrained"] is False and info["skb.weights"].startswith("random-init:seed=0:")
    assert info["skb.fingerprint"] == first.fingerprint and info["skb.spec"] == SMALL
    assert all(isinstance(v, str | int | float | bool) for v in info.values())
    loaded = create(SMALL, checkpoint=str(small_ckpt[0]), device="cpu").describe()
    assert loaded["skb.pretrained"] is True and loaded["skb.weights"] == f"sha256:{small_ckpt[2]}"


def test_skb_state_dict_is_official_with_model_prefix(cpu_skb: skb.SemanticKnowledgeBank) -> None:
    keys = set(cpu_skb.state_dict())
    assert keys == {f"model.{k}" for k in cpu_skb.model.state_dict()}
    assert checkpoints.DEFAULT_STRIP_PREFIXES == ("module.", "model.")


def test_w48_lite_priors_fit_the_baselines_se_blocks():
    """The lite SKB has the W48 channel widths, so its priors drive the real SE blocks of SNR-Net."""
    from components import registry

    skb = registry.create("skb/hrnet-w48-lite@1")
    x = torch.rand(1, 3, 64, 96)
    priors = skb(x)
    assert (priors.f0.shape[1], priors.f1.shape[1], priors.f2.shape[1], priors.logits.shape[1]) == (
        48,
        96,
        192,
        59,
    )
    net = registry.create("baseline/snr-net@1", skf=True).eval()
    with torch.no_grad():
        out = net(x, sem=(priors.f0, priors.f1, priors.f2))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert skb.fingerprint != registry.create("skb/hrnet-w18-small-test@1").fingerprint


def test_priors_derive_labels_and_probabilities_from_one_upsampling() -> None:
    from models.hrnet import class_probabilities, label_map

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 6, generator=g).half()
    priors = skb.Priors(torch.zeros(2, 1, 4, 6), torch.zeros(2, 1, 2, 3), torch.zeros(2, 1, 1, 2), logits)
    size = (15, 22)
    full = priors.full_logits(size)
    assert priors.full_logits(torch.Size(size)) is full  # computed once per size, whatever the size type
    assert priors.full_logits().shape[-2:] == (16, 24)  # the uncropped size is a separate entry
    assert torch.equal(priors.labels(size), label_map(logits, size))  # channels-last logits, same labels
    cl = priors.full_logits(size, channels_last=True)
    assert cl.stride(1) == 1 and cl is not full  # channels innermost (a cropped view of a channels-last map)
    assert priors.full_logits(channels_last=True).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, full, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(priors.probabilities(size), class_probabilities(logits, size), rtol=0, atol=0)
    assert priors.half().full_logits(size) is not full  # derived priors start without the memo
