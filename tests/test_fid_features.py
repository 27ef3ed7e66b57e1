"""The feature extractors: the shipped FID-digits network, and the Inception path end to end with weights from a
local file (a randomly initialised network saved in the real file's format) — and clear errors without it."""

import importlib.util
import sys
import tomllib
from fnmatch import fnmatch

import numpy as np
import pytest
import torch

from diffsolve.cli import main
from diffsolve.data import digits
from diffsolve.fid import DigitsFeatures, InceptionFeatures, Statistics, frechet_distance, get_extractor, to_uint8
from diffsolve.fid.features import DIGITS_WEIGHTS, INCEPTION_ENV

from fid_helpers import REPO, write_pngs

needs_fidelity = pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                                    reason="torch-fidelity is not installed (pip install --no-deps torch-fidelity)")


@pytest.fixture(scope="module")
def digits_features():
    return DigitsFeatures()


def fid_of(extractor, a, b):
    fa, fb = extractor(a).double().numpy(), extractor(b).double().numpy()
    return frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))


def test_shipped_digits_network_is_small_packaged_and_accurate(digits_features):
    assert DIGITS_WEIGHTS.is_file() and DIGITS_WEIGHTS.stat().st_size < 1 << 20
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["diffsolve.models"]
    assert any(fnmatch(DIGITS_WEIGHTS.name, p) for p in patterns), f"{DIGITS_WEIGHTS.name} not in package-data {patterns}"
    x, y = digits("test")
    acc = (digits_features.logits(to_uint8(x)).argmax(1) == y).float().mean().item()
    print(f"held-out accuracy of the FID-digits network: {acc:.4f}")
    assert acc >= 0.98
    assert digits_features.dim == 64 and digits_features.id.startswith("digits:digits-cnn-v1:")


def test_fid_digits_separates_real_digits_from_degraded_ones(digits_features):
    test, train = to_uint8(digits("test")[0]), to_uint8(digits("train")[0])
    gen = torch.Generator().manual_seed(0)
    noisy = to_uint8((digits("train")[0][:300] + 0.6 * torch.randn(300, 1, 16, 16, generator=gen)).clamp(-1, 1))
    noise = torch.randint(0, 256, (300, 1, 16, 16), generator=gen, dtype=torch.uint8)
    real, degraded, pure = fid_of(digits_features, test, train), fid_of(digits_features, noisy, train), \
        fid_of(digits_features, noise, train)
    print(f"FID-digits vs training digits: held-out {real:.3f}, noisy digits {degraded:.3f}, noise {pure:.3f}")
    assert real < 5 and 5 * real < degraded < pure


def test_extractors_take_uint8_batches_and_say_so(digits_features):
    with pytest.raises(ValueError, match="uint8"):
        digits_features(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="16×16"):
        digits_features(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"):
        digits_features(torch.zeros(2, 2, 16, 16, dtype=torch.uint8))
    grey = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    assert torch.equal(digits_features(grey), digits_features(grey.expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match="features: expected one of"):
        get_extractor("clip")


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    from diffsolve.fid.features import save_random_inception_weights

    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / "pt_inception-random.pth", seed=0)


@needs_fidelity
def test_inception_features_from_a_local_file(inception_file):
    ext = InceptionFeatures(inception_file)
    assert ext.dim == 2048 and ext.id.startswith("inception:pool3-2048:")
    grey = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    f = ext(grey)
    assert f.shape == (3, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert torch.equal(f, ext(grey.expand(-1, 3, -1, -1)))  # grey is read as RGB with equal channels
    assert f.std(0).mean() > 0  # the images are told apart
    # the same file gives the same id; another network another id
    assert InceptionFeatures(inception_file).id == ext.id


@needs_fidelity
def test_inception_cli_end_to_end(inception_file, tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    real = write_pngs(tmp_path / "real", rng.integers(0, 256, (4, 20, 20, 3), dtype=np.uint8))
    fake = write_pngs(tmp_path / "fake", rng.integers(0, 128, (3, 20, 20, 3), dtype=np.uint8))
    ref = tmp_path / "ref.npz"
    assert main(["fid-ref", "--data", str(real), "--features", "inception", "--inception-weights", str(inception_file),
                 "--out", str(ref)]) == 0
    st = Statistics.load(ref)
    assert st.count == 4 and st.dim == 2048 and st.extractor.startswith("inception:")
    capsys.readouterr()
    monkeypatch.setenv(INCEPTION_ENV, str(inception_file))  # the environment variable instead of the flag
    assert main(["fid", "--images", str(fake), "--ref", str(ref), "--workdir", str(tmp_path / "w"),
                 "--shard-size", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    value = float(out.split("FID ")[1].split(",")[0])
    assert value > 0 and "3 samples" in out and "KID" in out
    assert sorted(p.name for p in (tmp_path / "w" / "shards").iterdir()) == ["000000.npz", "000001.npz"]


def test_inception_without_weights_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=r"pt_inception-2015-12-05-6726825d\.pth.*--inception-weights"):
        InceptionFeatures()
    assert main(["fid-ref", "--data", "digits:test", "--features", "inception", "--out", str(tmp_path / "r.npz")]) == 2
    err = capsys.readouterr().err
    assert "pt_inception-2015-12-05-6726825d.pth" in err and INCEPTION_ENV in err and "never downloads" in err
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match=rf"not found: .*nope\.pth.*\${INCEPTION_ENV}"):
        InceptionFeatures()
    assert not (tmp_path / "r.npz").exists()


@needs_fidelity
def test_inception_wrong_file_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a PyTorch state-dict file"):
        InceptionFeatures(junk)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="does not hold the FID Inception-v3 weights"):
        InceptionFeatures(other)


def test_inception_without_torch_fidelity_names_the_install(tmp_path, monkeypatch):
    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    for name in [m for m in sys.modules if m.startswith("torch_fidelity")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match=r"diffsolve\[inception\].*--no-deps torch-fidelity"):
        InceptionFeatures(weights)


@needs_fidelity
def test_reference_from_another_extractor_is_refused(inception_file, tmp_path, capsys):
    ref = tmp_path / "digits_ref.npz"
    assert main(["fid-ref", "--data", "digits:test", "--out", str(ref)]) == 0
    folder = write_pngs(tmp_path / "imgs", np.zeros((4, 16, 16), dtype=np.uint8))
    capsys.readouterr()
    assert main(["fid", "--images", str(folder), "--ref", str(ref), "--features", "inception",
                 "--inception-weights", str(inception_file)]) == 2
    assert "made with the feature extractor 'digits:" in capsys.readouterr().err


@needs_fidelity
def test_inception_loads_beside_a_broken_torchvision(inception_file, tmp_path, monkeypatch):
    # PyPI's torchvision beside the CPU torch build fails at import with this RuntimeError; torch-fidelity's
    # package __init__ imports it, its Inception module does not
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    for name in [m for m in sys.modules if m.startswith(("torch_fidelity", "torchvision"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(RuntimeError, match="nms"):
        import torch_fidelity  # noqa: F401
    ext = InceptionFeatures(inception_file)
    assert ext(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape == (1, 2048)
