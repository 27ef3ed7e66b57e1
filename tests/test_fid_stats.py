"""Fréchet distance, KID and statistics files: checked against scipy's sqrtm, a 40-digit mpmath reference,
and torch-fidelity's own functions (read from its installed source when torchvision keeps it from importing)."""

import ast
import importlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from diffsolve.fid import Statistics, frechet_distance, kid, mean_and_covariance


def gaussian_features(seed, n, d, shift=0.0, mix=0.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    b = a + mix * rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(n, d)) @ a
    y = rng.normal(size=(n, d)) @ b + shift
    return x, y


def stats(x):
    return x.mean(0), np.cov(x, rowvar=False)


def sqrtm_reference(mu1, s1, mu2, s2):
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))


def library_function(package: str, module: str, name: str, namespace: dict):
    """``package.module.name``, imported; or, when the package is installed but its import fails (torch-fidelity
    and pytorch-fid import torchvision, which is broken beside the CPU torch build), the function's own source
    compiled from the installed file with ``namespace`` for its globals. Skips when the package is absent."""
    try:
        return getattr(importlib.import_module(f"{package}.{module}"), name)
    except ImportError as err:
        if getattr(err, "name", None) == package:
            pytest.skip(f"{package} is not installed")
    except (RuntimeError, OSError):
        pass
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed")
    source = Path(list(spec.submodule_search_locations)[0]) / f"{module}.py"
    tree = ast.parse(source.read_text())
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in (name, *namespace.get("_also", ()))]
    assert any(n.name == name for n in body), f"{name} not found in {source}"
    ns = {k: v for k, v in namespace.items() if k != "_also"}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(source), "exec"), ns)
    return ns[name]


@pytest.mark.parametrize("n,d", [(2000, 16), (500, 64), (3000, 256)])
def test_frechet_distance_matches_scipy_sqrtm(n, d):
    x, y = gaussian_features(n + d, n, d, shift=0.3, mix=0.5)
    (mu1, s1), (mu2, s2) = stats(x), stats(y)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), sqrtm_reference(mu1, s1, mu2, s2)
    print(f"n={n} d={d}: FID {ours!r} vs sqrtm {ref!r}")
    assert ref > 0.1
    assert abs(ours - ref) <= 1e-8 * abs(ref)
    # symmetric in its arguments, and the float32 inputs of a real run are promoted to float64
    assert abs(frechet_distance(mu2, s2, mu1, s1) - ours) <= 1e-10 * ours
    f32 = frechet_distance(mu1.astype(np.float32), s1.astype(np.float32), mu2.astype(np.float32), s2.astype(np.float32))
    assert abs(f32 - frechet_distance(*(a.astype(np.float32).astype(np.float64) for a in (mu1, s1, mu2, s2)))) == 0


def test_frechet_distance_of_gaussians_in_closed_form():
    # commuting diagonal covariances: Tr (Σ1Σ2)^½ = Σ √(a_i b_i)
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])
    expected = 9.0 + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-14)


def test_self_distance_is_zero_also_for_singular_covariances():
    for n, d in [(5000, 64), (100, 256), (200, 768)]:  # the last two: fewer samples than dimensions
        x, _ = gaussian_features(d, n, d)
        mu, s = stats(x)
        value = frechet_distance(mu, s, mu, s)
        print(f"n={n} d={d}: FID(X, X) = {value:.3e} (Tr Σ = {np.trace(s):.1f})")
        assert abs(value) <= 1e-6


def test_singular_case_against_a_40_digit_reference():
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    rng = np.random.default_rng(1)
    n, d = 12, 30
    mu1, s1 = stats(rng.normal(size=(n, d)) * 3)
    mu2, s2 = stats(rng.normal(size=(n, d)) + 0.5)
    big1, big2 = mp.matrix(s1.tolist()), mp.matrix(s2.tolist())
    w, q = mp.eigsy(big1)
    root = q * mp.diag([mp.sqrt(max(w[i], 0)) for i in range(d)]) * q.T
    ev = mp.eigsy(root * big2 * root, eigvals_only=True)
    exact = float(sum((a - b) ** 2 for a, b in zip(mu1, mu2)) + sum(s1[i, i] + s2[i, i] for i in range(d))
                  - 2 * sum(mp.sqrt(max(ev[i], 0)) for i in range(d)))
    ours = frechet_distance(mu1, s1, mu2, s2)
    print(f"exact {exact!r}, ours {ours!r}, sqrtm {sqrtm_reference(mu1, s1, mu2, s2)!r}")
    assert abs(ours - exact) <= 1e-10 * exact


def test_frechet_distance_matches_torch_fidelity():
    fn = library_function("torch_fidelity", "metric_fid", "fid_statistics_to_metric",
                          {"np": np, "KEY_METRIC_FID": "fid", "vprint": lambda *a, **k: None})
    x, y = gaussian_features(3, 1500, 128, shift=0.2, mix=0.3)
    (mu1, s1), (mu2, s2) = stats(x), stats(y)
    theirs = fn({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)["fid"]
    ours = frechet_distance(mu1, s1, mu2, s2)
    print(f"ours {ours!r}, torch-fidelity {theirs!r}")
    assert abs(ours - theirs) <= 1e-8 * abs(theirs)


def test_frechet_distance_matches_pytorch_fid():
    fn = library_function("pytorch_fid", "fid_score", "calculate_frechet_distance", {"np": np, "linalg": scipy.linalg})
    x, y = gaussian_features(4, 1500, 128, shift=0.2, mix=0.3)
    (mu1, s1), (mu2, s2) = stats(x), stats(y)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # its sqrtm(disp=False)
            theirs = fn(mu1, s1, mu2, s2)
    except TypeError as err:  # scipy >= 1.18 removed disp=: the breakage diffsolve avoids
        pytest.skip(f"pytorch-fid's function no longer runs with this scipy: {err}")
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(theirs, rel=1e-8)


def test_frechet_distance_input_errors():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="means"):
        frechet_distance(mu, s, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(mu, s, mu, np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, s, mu + np.nan, s)


def mmd2_direct(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_matches_a_direct_estimate_and_torch_fidelity():
    x, y = gaussian_features(5, 400, 32, shift=1.0)
    mean, std, size = kid(x, y, subsets=20, subset_size=100, seed=7)
    rng = np.random.RandomState(7)
    direct = []
    for _ in range(20):
        a = x[rng.choice(len(x), 100, replace=False)]
        b = y[rng.choice(len(y), 100, replace=False)]
        direct.append(mmd2_direct(a, b))
    assert size == 100
    assert mean == pytest.approx(np.mean(direct), rel=1e-12) and std == pytest.approx(np.std(direct), rel=1e-10)
    assert mean > 5 * std > 0  # shifted sets are told apart
    same, _, _ = kid(x, x[::-1].copy(), subsets=20, subset_size=100, seed=7)
    assert abs(same) < 0.2 * mean  # unbiased: near 0 for one distribution

    mmd2 = library_function("torch_fidelity", "metric_kid", "mmd2", {"np": np, "vassert": lambda c, m: None})
    kernel = library_function("torch_fidelity", "metric_kid", "kernel_poly",
                              {"np": np, "get_kwarg": lambda k, kw: kw.get(k, {"kid_kernel_poly_degree": 3,
                                                                                "kid_kernel_poly_gamma": None,
                                                                                "kid_kernel_poly_coef0": 1}[k])})
    rng = np.random.RandomState(7)
    theirs = []
    for _ in range(20):
        a = x[rng.choice(len(x), 100, replace=False)]
        b = y[rng.choice(len(y), 100, replace=False)]
        theirs.append(mmd2(kernel(a, a), kernel(a, b), kernel(b, b)))
    assert mean == pytest.approx(np.mean(theirs), rel=1e-12)


def test_kid_caps_the_subset_size_and_rejects_tiny_sets():
    x, y = gaussian_features(6, 50, 8)
    assert kid(x, y[:30], subsets=3)[2] == 30
    with pytest.raises(ValueError, match="at least 2"):
        kid(x[:1], y)


def test_statistics_round_trip_and_chunked_covariance(tmp_path):
    x, _ = gaussian_features(8, 10_001, 12)
    x = x.astype(np.float32)
    mu, sigma = mean_and_covariance(x, chunk=777)
    assert np.allclose(mu, x.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    assert np.allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12, atol=1e-12)
    st = Statistics.from_features(x, "digits:test:abc", kid_max=1000)
    assert st.kid_features.shape == (1000, 12) and st.count == 10_001
    st.save(tmp_path / "s.npz")
    back = Statistics.load(tmp_path / "s.npz")
    assert back.extractor == "digits:test:abc" and back.count == 10_001
    assert np.array_equal(back.mu, st.mu) and np.array_equal(back.sigma, st.sigma)
    assert np.array_equal(back.kid_features, st.kid_features)
    assert back.fid(st) == pytest.approx(0, abs=1e-9)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="different extractors"):
        back.fid(Statistics(st.mu, st.sigma, 2, "inception:x"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read FID statistics"):
        Statistics.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="fid-ref"):
        Statistics.load(tmp_path / "none.npz")
    with pytest.raises(ValueError, match="at least 2"):
        Statistics.from_features(x[:1], "digits:x")
