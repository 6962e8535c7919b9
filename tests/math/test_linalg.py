"""comp_core.math.linalg: relative damping, the damped Cholesky with retries, SPD solves and inverses."""
from __future__ import annotations

import pytest
import torch

from comp_core.math.linalg import cholesky, damped, damping, spd_inverse, spd_solve


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_damping_is_relative_to_mean_diagonal():
    m = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert damping(m, 0.1) == pytest.approx(0.2)
    torch.testing.assert_close(damped(m, 0.1), m + 0.2 * torch.eye(3, dtype=torch.float64))
    assert damping(torch.zeros(3, 3, dtype=torch.float64), 0.1) == 0.1  # never 0
    assert torch.equal(m, torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))  # not in place



def _rotated(eigs: list[float], seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=_gen(seed), dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T



def test_cholesky_of_spd_needs_no_damping():
    a = _rotated([1.0, 2.0, 5.0, 0.5])
    lower, used = cholesky(a)
    assert used == 0.0
    torch.testing.assert_close(lower @ lower.T, a)



def test_cholesky_retry_increases_damping_on_indefinite_matrix():
    # one eigenvalue -1e-7: undamped and 1e-8/1e-7 relative damping (ε ≈ 0.67 × that) fail, 1e-6 works
    a = _rotated([1.0, 1.0, -1e-7])
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(a)
    lower, used = cholesky(a)
    assert used > 0.0
    assert used == pytest.approx(1e-6)
    torch.testing.assert_close(lower @ lower.T, damped(a, used), rtol=1e-12, atol=1e-12)

    # starting from a non-zero damping, the retry multiplies it by 10 until it works
    b = _rotated([1.0, 2.0, -0.01], seed=1)  # mean diagonal ≈ 1: needs relative damping > 0.01
    lower, used = cholesky(b, relative_damp=1e-3)
    assert used > 1e-3
    assert used == pytest.approx(0.1)
    torch.testing.assert_close(lower @ lower.T, damped(b, used), rtol=1e-12, atol=1e-12)



def test_cholesky_raises_when_hopeless():
    # mean diagonal 0: damping stays tiny (relative, absolute) and can never beat the eigenvalue −1
    hopeless = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(torch.linalg.LinAlgError):
        cholesky(hopeless)
    with pytest.raises(torch.linalg.LinAlgError):
        cholesky(_rotated([1.0, 1.0, -1e-7]), max_tries=2)  # would need a third try



def test_spd_solve_and_inverse():
    a = _rotated([1.0, 3.0, 0.2, 7.0], seed=3)
    rhs = torch.randn(4, generator=_gen(4), dtype=torch.float64)
    torch.testing.assert_close(spd_solve(a, rhs), torch.linalg.solve(a, rhs))
    rhs2 = torch.randn(4, 3, generator=_gen(5), dtype=torch.float64)
    torch.testing.assert_close(spd_solve(a, rhs2), torch.linalg.solve(a, rhs2))
    torch.testing.assert_close(spd_inverse(a), torch.linalg.inv(a))
