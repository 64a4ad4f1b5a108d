"""Oracle SKB: W48-lite-shaped priors from label maps, marked as an oracle, fed by precompute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import make_lol

from components import registry
from components.catalog import open_catalog
from components.data.ingest import get_version, ingest
from components.data.scenes import SCENE_CLASSES, generate_scene_dataset, render_scene
from components.data.torch_dataset import load_label
from components.precompute import MissingLabelsError, precompute_priors
from components.prior_cache import PriorCache
from components.settings import get_settings
from components.skb_oracle import FEATURE_RMS, ORACLE_SPEC, OracleLabelsRequired, OracleSKB
from components.storage import open_storage

LITE = "skb/hrnet-w48-lite@1"
MAPS = ("f0", "f1", "f2", "logits")


@pytest.fixture(scope="module")
def oracle() -> OracleSKB:
    return registry.create(ORACLE_SPEC, device="cpu")


@pytest.fixture(scope="module")
def lite() -> object:
    return registry.create(LITE, device="cpu")


def _labels(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, len(SCENE_CLASSES), (b, h, w), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [(64, 96), (36, 52), (100, 150)])
def test_priors_have_the_w48_lite_shapes_and_dtypes(
    oracle: OracleSKB, lite: object, size: tuple[int, int]
) -> None:
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        real = lite(x)
    fake = oracle(x, labels=_labels(2, *size))
    for name in MAPS:
        a, b = getattr(fake, name), getattr(real, name)
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device), name
        assert a.is_contiguous()
    assert oracle.feature_channels == lite.feature_channels and oracle.num_classes == lite.num_classes == 59


def test_feature_magnitudes_are_those_of_the_w48_lite_skb(oracle: OracleSKB, lite: object) -> None:
    x = torch.rand(2, 3, 128, 192)
    with torch.no_grad():
        real = lite(x)
    high, labels = render_scene((128, 192), np.random.default_rng(0))
    fake = oracle(x, labels=torch.from_numpy(labels.astype(np.int64))[None].expand(2, -1, -1))
    for name, rms in zip(("f0", "f1", "f2"), FEATURE_RMS, strict=True):
        a, b = getattr(fake, name), getattr(real, name)
        ratio = float(a.pow(2).mean().sqrt() / b.pow(2).mean().sqrt())
        assert 0.5 < ratio < 2.0, (name, ratio)
        assert float(a.min()) >= 0.0  # non-negative, like HRNet's post-ReLU branch outputs
        assert abs(float(a.pow(2).mean().sqrt()) - rms) < 0.5 * rms


def test_logits_are_one_hot_like_in_the_first_k_channels(oracle: OracleSKB) -> None:
    _, labels = render_scene((128, 192), np.random.default_rng(3))
    lab = torch.from_numpy(labels.astype(np.int64))[None]
    priors = oracle(torch.zeros(1, 3, 128, 192), labels=lab)
    k = len(SCENE_CLASSES)
    assert float(priors.logits[:, k:].max()) == -20.0
    assert float(priors.logits[:, :k].max()) == 10.0 and float(priors.logits[:, :k].min()) == -10.0
    # Upsampled back to full resolution, the argmax is the label map except near region borders.
    agreement = (priors.labels((128, 192)) == lab).float().mean()
    assert agreement > 0.95
    pure = priors.probabilities((128, 192))[0, :, 0, 0]  # top-left corner: sky, far from any border
    assert float(pure[0]) > 0.99


def test_features_depend_on_the_class_not_on_the_image(oracle: OracleSKB) -> None:
    labels = torch.zeros(1, 32, 32, dtype=torch.int64)
    labels[:, :, 16:] = 2
    a = oracle(torch.rand(1, 3, 32, 32), labels=labels)
    b = oracle(torch.rand(1, 3, 32, 32), labels=labels)
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in MAPS)
    f0 = a.f0[0]
    assert torch.equal(f0[:, 0, 0], f0[:, 7, 1]) and not torch.equal(f0[:, 0, 0], f0[:, 0, 7])
    other_seed = OracleSKB(seed=1, device="cpu")(torch.rand(1, 3, 32, 32), labels=labels)
    assert not torch.equal(other_seed.f0, a.f0)


def test_marked_as_an_oracle_never_pretrained(oracle: OracleSKB) -> None:
    assert oracle.pretrained is False and oracle.needs_labels is True
    assert oracle.fingerprint.startswith("oracle") and "oracle" in oracle.fingerprint
    assert len(oracle.fingerprint) == 64  # fits the prior cache's fingerprint column
    assert oracle.fingerprint == OracleSKB(device="cpu").fingerprint  # deterministic
    assert OracleSKB(seed=1, device="cpu").fingerprint != oracle.fingerprint
    assert OracleSKB(label_classes=7, device="cpu").fingerprint != oracle.fingerprint
    described = oracle.describe()
    assert described["skb.pretrained"] is False and described["skb.oracle"] is True
    assert described["skb.spec"] == ORACLE_SPEC and ORACLE_SPEC in registry.available("skb")
    assert set(oracle.model.state_dict()) == {"e0", "e1", "e2"}  # packaging sees a state dict


def test_calling_without_labels_or_with_bad_labels_is_a_clear_error(oracle: OracleSKB) -> None:
    x = torch.rand(1, 3, 32, 48)
    with pytest.raises(OracleLabelsRequired, match=r"call it as skb\(x, labels=\.\.\.\)"):
        oracle(x)
    with pytest.raises(OracleLabelsRequired, match="matching the image"):
        oracle(x, labels=torch.zeros(1, 32, 32, dtype=torch.int64))
    with pytest.raises(OracleLabelsRequired, match="integer"):
        oracle(x, labels=torch.zeros(1, 32, 48))
    with pytest.raises(OracleLabelsRequired, match=r"label ids must be in 0\.\.4"):
        oracle(x, labels=torch.full((1, 32, 48), 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="has no weights"):
        registry.create(ORACLE_SPEC, checkpoint="w.pth")


# --------------------------------------------------------------------------------------------- precompute
def _cache(fingerprint: str) -> PriorCache:
    settings = get_settings()
    return PriorCache(open_storage(settings.storage_uri), open_catalog(settings.catalog_url), fingerprint)


def test_precompute_feeds_the_label_maps_and_fills_the_cache(skf_home: Path, tmp_path: Path) -> None:
    src = generate_scene_dataset(tmp_path / "scenes", seed=2, size=(64, 96), train=3, test=1)
    ref = ingest(str(src), name="scenes").ref
    first = precompute_priors(ref, ORACLE_SPEC, device="cpu", batch_size=2)
    assert (first.computed, first.cached, first.failed, first.total) == (4, 0, 0, 4)
    assert first.pretrained is False and first.oracle and first.fingerprint.startswith("oracle")
    assert "oracle" in dict(first.rows())["pretrained"]

    oracle = registry.create(ORACLE_SPEC, device="cpu")
    cache = _cache(oracle.fingerprint)
    version = get_version(ref)
    for low, _high, label in version.labelled_pairs("train") + version.labelled_pairs("test"):
        cached = cache.get(low.sha256)
        assert cached is not None
        ids = torch.from_numpy(load_label(label).astype(np.int64))[None]
        expected = oracle(torch.zeros(1, 3, 64, 96), labels=ids)
        for name in MAPS:  # stored as fp16: equal to the oracle's priors of THIS image's label map
            torch.testing.assert_close(
                getattr(cached.float(), name), getattr(expected, name), atol=1e-2, rtol=1e-3
            )

    again = precompute_priors(ref, ORACLE_SPEC, device="cpu")
    assert (again.computed, again.cached, again.failed) == (0, 4, 0)


def test_precompute_with_the_oracle_on_an_unlabelled_dataset_is_a_clear_error(
    skf_home: Path, tmp_path: Path
) -> None:
    ref = ingest(str(make_lol(tmp_path / "lol", train=2, test=1)), name="plain").ref
    with pytest.raises(MissingLabelsError) as info:
        precompute_priors(ref, ORACLE_SPEC, device="cpu")
    message = str(info.value)
    assert f"dataset {ref} has no label maps" in message
    assert "ingest a labelled source" in message and ORACLE_SPEC in message
    assert _cache(registry.create(ORACLE_SPEC, device="cpu").fingerprint).cached([]) == set()


def test_precompute_names_the_images_whose_label_map_was_quarantined(skf_home: Path, tmp_path: Path) -> None:
    src = generate_scene_dataset(tmp_path / "scenes", seed=3, size=(64, 96), train=2, test=1)
    (src / "our485" / "labels" / "scene-0001.png").write_bytes(b"not a png")
    result = ingest(str(src), name="partly")
    assert [q.reason for q in result.quarantined] == ["not-an-image"]
    with pytest.raises(
        MissingLabelsError, match=r"has no label map for 1 of 3 images \(e\.g\. our485/low/scene-0001\.png\)"
    ):
        precompute_priors(result.ref, ORACLE_SPEC, device="cpu")
    # Priors of a split whose label maps are all there are fine.
    assert precompute_priors(result.ref, ORACLE_SPEC, device="cpu", splits=("test",)).computed == 1


def test_an_enhancer_on_oracle_priors_is_never_promoted(oracle: OracleSKB) -> None:
    from components.baselines import get_family
    from components.inference import make_spec
    from components.model_registry import Candidate, PromotionPolicy, decide

    family = get_family("baseline/snr-net@1")
    net = registry.create(family.spec, skf=True, **family.smoke_model)
    family.check_skb(net, oracle)  # SE blocks built for W48 take the oracle's priors
    spec = make_spec(family.spec, net, oracle)
    assert spec.skb == ORACLE_SPEC and spec.skb_pretrained is False
    assert spec.skb_fingerprint.startswith("oracle")
    challenger = Candidate("1", "scenes@1", "raw", spec.skb_pretrained, {"psnr": 99.0})
    promoted, reason, _ = decide(challenger, None, PromotionPolicy())
    assert not promoted and "not pretrained" in reason
