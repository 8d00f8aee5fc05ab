"""The two-layer linear network: every enumerated critical point against the closed-form spectrum.

Derivation (rotate so that M = diag(sigma); a critical point for subset J of size q <= p has unit k < q
carrying component j_k with a_k = b_k = sqrt(sigma_j) e_j, the other units zero). With residual
R = M - W2 W1 (zero on J) and D = dW2 W1 + W2 dW1, the Hessian's quadratic form is
    Q(d) = ||D||^2 - 2 <R, dW2 dW1>,
which splits into independent 2x2 blocks:
  * active units k, k' and the pair (dW2[j_k', k], dW1[k', j_k]): [[s_k^2, s_k s_k'], [.., s_k'^2]]
    -> eigenvalues 0 and sigma_jk + sigma_jk'  (q^2 pairs: the gauge GL(q) gives q^2 zeros);
  * active unit with component j and an unused component i <= r: [[sigma_j, -sigma_i], [-sigma_i, sigma_j]]
    -> sigma_j + sigma_i and sigma_j - sigma_i (negative iff sigma_i > sigma_j);
  * active unit and an index beyond the rank (i > r on either side): a single sigma_j;
  * an unused unit and an unused component i: [[0, -sigma_i], [-sigma_i, 0]] -> +sigma_i, -sigma_i;
    with a component in J or beyond the rank: zeros.
"""

import pytest
import torch

import saddlescope as ss


def closed_form_spectrum(sigma, subset, m, n, p):
    r = len(sigma)
    values = []
    unused = [i for i in range(r) if i not in subset]
    for j in subset:
        for k in subset:
            values += [0.0, sigma[j] + sigma[k]]
        for i in unused:
            values += [sigma[j] + sigma[i], sigma[j] - sigma[i]]
        values += [sigma[j]] * ((m - r) + (n - r))
    for _ in range(p - len(subset)):
        for i in unused:
            values += [sigma[i], -sigma[i]]
        values += [0.0] * (2 * len(subset) + (m - r) + (n - r))
    return sorted(values)


@pytest.mark.parametrize(
    "m,n,p,sigma",
    [(4, 4, 2, [4.0, 3.0, 2.0, 1.0]), (4, 3, 2, [3.0, 2.0, 0.5]), (3, 5, 1, [2.5, 1.5, 1.0]),
     (5, 4, 3, [5.0, 3.5, 2.0, 0.7])],
)
def test_spectrum_and_verdict_at_every_critical_point(m, n, p, sigma):
    net = ss.problems.TwoLayerLinear(m, n, p, sigma, seed=3)
    obj = net.objective()
    points = net.critical_points()
    assert len(points) == sum(
        __import__("math").comb(len(sigma), q) for q in range(p + 1)
    )
    for point in points:
        cp = ss.analyze(obj, point.theta)
        expected = torch.tensor(closed_form_spectrum(sigma, point.subset, m, n, p), dtype=torch.float64)
        assert cp.grad_norm < 1e-12
        assert cp.loss == pytest.approx(point.loss, abs=1e-12)
        assert float((cp.eigenvalues - expected).abs().max()) < 1e-9, point.subset
        assert cp.n_negative == int((expected < -1e-9).sum())
        assert cp.n_zero == int((expected.abs() < 1e-9).sum())
        want = "minimum" if tuple(point.subset) == tuple(range(p)) else "saddle"
        assert cp.kind == want, (point.subset, cp.reason)
        if want == "minimum":  # p^2 gauge zeros: the probe settles it, and finds the valley flat
            assert cp.resolved_by == "probe" and cp.probe.flat


def test_random_gauge_keeps_it_critical():
    net = ss.problems.TwoLayerLinear(4, 4, 2, seed=0)
    obj = net.objective()
    point = net.critical_points()[-1]
    w1, w2 = net.unpack(point.theta)
    c = torch.tensor([[2.0, 0.3], [-0.1, 0.7]], dtype=torch.float64)
    theta = net.pack(torch.linalg.solve(c, w1), w2 @ c)
    assert float(obj.grad(theta).norm()) < 1e-12
    assert ss.analyze(obj, theta).kind == "saddle"


def test_bad_sizes_are_refused():
    with pytest.raises(ss.errors.InvalidInputError):
        ss.problems.TwoLayerLinear(3, 3, 4)
    with pytest.raises(ss.errors.InvalidInputError):
        ss.problems.TwoLayerLinear(2, 2, 1, [1.0, 1.0])
