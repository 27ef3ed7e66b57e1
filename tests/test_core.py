import math

import pytest
import scipy.stats
import torch

from diffsolve.core import SeededNoise, multistep_order, phi, splitmix64_mix, _GOLDEN, _signed


def test_splitmix64_matches_reference_sequence():
    # splitmix64 seeded with 0: the reference C implementation (Vigna) outputs these first three values
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    states = torch.tensor([_signed(k * 0x9E3779B97F4A7C15) for k in (1, 2, 3)])
    got = [int(v) % (1 << 64) for v in splitmix64_mix(states)]
    assert got == expected
    assert _GOLDEN == _signed(0x9E3779B97F4A7C15)


def test_seeded_noise_is_per_sample():
    seeds = [5, 17, 3, 1 << 40, -2]
    batch = SeededNoise(seeds).normal((3, 4, 4), step=7, sub=1)
    for k, s in enumerate(seeds):
        alone = SeededNoise([s]).normal((3, 4, 4), step=7, sub=1)
        assert torch.equal(alone[0], batch[k])
    # streams differ from each other
    noise = SeededNoise([0])
    draws = [noise.normal((64,), step=s, sub=u) for s in (-1, 0, 1) for u in (0, 1)]
    for i in range(len(draws)):
        for j in range(i):
            assert not torch.allclose(draws[i], draws[j])


def test_seeded_noise_drawn_in_pieces_equals_one_draw():
    """DAPS draws its Langevin noise one step at a time with ``offset``: bitwise the rows of one long draw, so
    taking it in pieces changes memory, not samples."""
    noise = SeededNoise([5, 1 << 40])
    whole = noise.normal((4, 3, 5), step=2, sub=0)
    for j in range(4):
        assert torch.equal(noise.normal((3, 5), step=2, sub=0, offset=j * 15), whole[:, j])
    assert not torch.equal(noise.normal((3, 5), step=2, sub=0, offset=1), whole[:, 0])


def test_seeded_noise_is_standard_normal():
    z = SeededNoise(range(256)).normal((256,), step=3).double().flatten()
    n = z.numel()
    assert abs(z.mean()) < 4 / math.sqrt(n)  # 4 standard errors
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    assert scipy.stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # no correlation between neighbouring elements or neighbouring seeds
    zz = SeededNoise(range(256)).normal((256,), step=3).double()
    assert abs((zz[:, 1:] * zz[:, :-1]).mean()) < 4 / math.sqrt(n)
    assert abs((zz[1:] * zz[:-1]).mean()) < 4 / math.sqrt(n)


@pytest.mark.parametrize("h", [-3.0, -1.0, -0.6, -0.4, -1e-3, -1e-9, 1e-6, 0.3, 0.7, 2.0])
def test_phi_functions_match_closed_forms(h):
    closed = {
        1: math.expm1(h) / h,
        2: (math.expm1(h) - h) / h**2,
        3: (math.expm1(h) - h - h**2 / 2) / h**3,
    }
    for k, value in closed.items():
        if abs(h) ** k < 1e-4:  # the closed forms themselves cancel catastrophically here: use the limit
            value = sum(h**j / math.factorial(j + k) for j in range(4))
        assert phi(k, h) == pytest.approx(value, rel=1e-12 if abs(h) > 0.3 else 1e-9)
    assert phi(0, h) == math.exp(h)


def test_phi_series_and_recurrence_agree_at_the_switch():
    for k in (1, 2, 3, 4):
        assert phi(k, 0.5) == pytest.approx(phi(k, 0.5 + 1e-12), rel=1e-11)
        assert phi(k, -0.5) == pytest.approx(phi(k, -0.5 - 1e-12), rel=1e-11)
        assert phi(k, 0.0) == 1 / math.factorial(k)


def test_multistep_order_rules():
    orders = [multistep_order(i, 10, 3, True, False) for i in range(10)]
    assert orders == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]  # warm-up, then lower order at the end (< 15 steps)
    assert [multistep_order(i, 20, 3, True, False) for i in range(20)][-3:] == [3, 3, 3]
    assert multistep_order(19, 20, 3, True, True) == 1  # a last step onto σ = 0 is first order
    assert [multistep_order(i, 10, 2, False, False) for i in range(10)][-2:] == [2, 2]
