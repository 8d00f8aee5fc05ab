"""Memory as a budget: eigs plans its Krylov basis (size, precision, place) from the memory it may use,
says so in the result, falls back to a float32 basis with partial reorthogonalisation, and refuses
before any product when nothing fits. Accuracy of the float32 basis against the float64 path and dense eigh."""

import json
import types

import pytest
import torch
from spectra import outlier_spectrum, planted

import saddlescope as ss
from saddlescope import errors
from saddlescope.curvature import basis_plan, lanczos
from saddlescope.curvature.two_pass import two_pass_bytes
from saddlescope.curvature.operator import _Operator
from saddlescope.memory import available_memory

F32_EPS = torch.finfo(torch.float32).eps


class Diagonal:
    """A diagonal operator of any size (the products cost n flops), counted."""

    def __init__(self, values):
        self.values = values
        self.shape = (values.numel(), values.numel())
        self.dtype, self.device = values.dtype, values.device
        self.hvp_count = 0

    def matmat(self, block):
        self.hvp_count += block.shape[1]
        return self.values[:, None] * block


def truth(values, k, which):
    s = torch.sort(values.double()).values
    return {"largest": s[-k:], "smallest": s[:k], "both": torch.cat([s[:k], s[-k:]])}[which]


def need(n, vectors, dtype, want=1):
    partial = dtype == torch.float32
    return lanczos.planned_bytes(n, vectors, want, basis_dtype=dtype, recurrence_dtype=torch.float64,
                                 partial=partial, grows_by_copy=False)


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
@pytest.mark.parametrize("krylov_dim", [None, 40])
def test_a_float32_basis_costs_little_accuracy_against_the_float64_path(which, krylov_dim):
    # Dense eigh is the truth. Measured (tol 1e-6 of ||A||): the float64 path's eigenvalue error <= 8e-9 of
    # ||A||, the float32 basis's <= 8e-8; the float32 basis stops at its residual floor, 64 eps(float32)
    # ||A|| = 7.6e-6 ||A|| (true residuals up to 6.8e-6 ||A||, against <= 1e-6 for float64), and so spends
    # fewer products (109-114 against 154-173 at the bottom; the same at the top).
    values = outlier_spectrum()
    op = planted(values)
    scale = float(values.abs().max())
    full = ss.eigs(op, 3, which, tol=1e-6, krylov_dim=krylov_dim)
    coarse = ss.eigs(op, 3, which, tol=1e-6, krylov_dim=krylov_dim, basis_dtype=torch.float32)
    assert full.plan.dtype == "torch.float64" and full.plan.reorthogonalisation == "full"
    assert coarse.plan.dtype == "torch.float32" and coarse.plan.reorthogonalisation == "partial"
    assert coarse.plan.recurrence_dtype == "torch.float64" and coarse.dtype == "torch.float32"
    exact = truth(values, 3, which)
    assert float((full.eigenvalues - exact).abs().max()) <= 1e-7 * scale
    assert float((coarse.eigenvalues - exact).abs().max()) <= 1e-6 * scale
    true = (op.matrix @ coarse.eigenvectors - coarse.eigenvectors * coarse.eigenvalues).norm(dim=0)
    assert torch.allclose(true, coarse.residuals, rtol=1e-6, atol=1e-12 * scale)
    assert coarse.all_converged and coarse.atol == pytest.approx(lanczos.COARSE_FLOOR_EPS * F32_EPS * scale, rel=1e-6)
    assert float(coarse.residuals.max()) <= coarse.atol
    assert coarse.hvp_count <= full.hvp_count + 5
    if krylov_dim is None:
        assert 0 < coarse.reorthogonalisations < coarse.hvp_count  # partial: not every step


def test_the_budget_chooses_size_then_precision_then_refuses():
    n = 20_000
    op = Diagonal(outlier_spectrum(n))
    roomy = ss.eigs(op, 1, "largest", tol=1e-8, memory_budget=2**30)
    assert (roomy.plan.vectors, roomy.plan.dtype, roomy.plan.device) == (1000, "torch.float64", "cpu")
    assert roomy.plan.bytes <= roomy.plan.budget == 2**30 and roomy.plan.budget_source == "memory_budget"
    assert "(the cap)" in roomy.plan.why

    # Fewer float64 vectors while at least 40 fit.
    budget = need(n, 60, torch.float64)
    fewer = ss.eigs(op, 1, "largest", tol=1e-8, memory_budget=budget)
    assert fewer.plan.dtype == "torch.float64" and fewer.plan.vectors == 60 and fewer.plan.bytes <= budget

    # Below 40 float64 vectors: a float32 basis with partial reorthogonalisation, as many vectors as fit.
    budget = need(n, 40, torch.float64) - 1
    coarse = ss.eigs(op, 1, "largest", tol=1e-8, memory_budget=budget)
    assert coarse.plan.dtype == "torch.float32" and coarse.plan.reorthogonalisation == "partial"
    assert coarse.plan.vectors >= 60 and coarse.plan.bytes <= budget
    assert "float64 basis of 40 vectors would need" in coarse.plan.why
    assert coarse.eigenvalues[-1] == pytest.approx(100.0, rel=1e-6)

    # Below 40 float32 vectors: fewer, down to 20 (ARPACK's default ncv).
    budget = need(n, 25, torch.float32)
    small = ss.eigs(op, 1, "largest", tol=1e-8, memory_budget=budget)
    assert small.plan.dtype == "torch.float32" and small.plan.vectors == 25
    assert small.eigenvalues[-1] == pytest.approx(100.0, rel=1e-6)

    # Not even 20 float32 vectors: no basis, two passes of the three-term recurrence.
    budget = need(n, 20, torch.float32) - 1
    lean = ss.eigs(op, 1, "largest", tol=1e-8, memory_budget=budget)
    assert lean.plan.reorthogonalisation == lanczos.TWO_PASS and lean.plan.bytes <= budget
    assert "float32 basis of 20 vectors would need" in lean.plan.why
    assert lean.eigenvalues[-1] == pytest.approx(100.0, rel=1e-6)

    # Not even the two-pass recurrence's float32 vectors: a clear error with the estimate, before any product.
    smallest = two_pass_bytes(n, 1, vector_dtype=torch.float32, recurrence_dtype=torch.float64)
    op.hvp_count = 0
    with pytest.raises(errors.MemoryBudgetError, match=r"even the two-pass recurrence's need about") as info:
        ss.eigs(op, 1, "largest", memory_budget=smallest - 1)
    assert op.hvp_count == 0
    assert f"{smallest:,} bytes" in str(info.value)
    assert isinstance(info.value, errors.TooLargeError) and isinstance(info.value, MemoryError)
    # A fixed size is honoured (in the precision that fits) or refused, never shrunk.
    with pytest.raises(errors.MemoryBudgetError, match="even 300 float32"):
        ss.eigs(op, 1, krylov_dim=300, memory_budget=need(n, 200, torch.float32))
    fixed = ss.eigs(op, 1, krylov_dim=300, memory_budget=need(n, 300, torch.float64) - 1)
    assert fixed.plan.vectors == 300 and fixed.plan.dtype == "torch.float32"


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_two_passes_without_a_basis_agree_with_eigh(which):
    # The three-term recurrence (no basis) and a second pass for the Ritz vectors, against dense eigh: the
    # same eigenvalues to the tolerance (no ghost copy of a converged outlier taking a wanted place), true
    # residuals from one confirming product each, in 1.7-3x the products of a stored basis (measured: 18
    # against 10 at the top, 306 against 102 at the clustered bottom) and a handful of vectors.
    values = outlier_spectrum()
    op = planted(values)
    n = values.numel()
    budget = two_pass_bytes(n, 6, vector_dtype=torch.float64, recurrence_dtype=torch.float64)
    stored = ss.eigs(op, 3, which, tol=1e-6)
    lean = ss.eigs(op, 3, which, tol=1e-6, memory_budget=budget)
    assert lean.plan.reorthogonalisation == lanczos.TWO_PASS and lean.plan.dtype == "torch.float64"
    assert stored.plan.reorthogonalisation == "full"
    norm = float(values.abs().max())
    assert torch.allclose(lean.eigenvalues, truth(values, 3, which), atol=1e-6 * norm, rtol=0)
    assert lean.all_converged and float(lean.residuals.max()) <= 1e-6 * norm * (1 + 1e-9)
    dense = op.matmat(torch.eye(n, dtype=torch.float64))
    true = (dense @ lean.eigenvectors - lean.eigenvectors * lean.eigenvalues).norm(dim=0)
    assert torch.allclose(true, lean.residuals, rtol=1e-6, atol=1e-12)
    assert stored.hvp_count < lean.hvp_count <= 3.5 * stored.hvp_count


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_two_passes_in_float32_vectors_find_the_extreme_pair(which):
    # The last resort before refusing: float32 vectors (the recurrence's coefficients stay float64).
    # One pair at each end, what a verdict needs, to the float32-level tolerance asked.
    values = outlier_spectrum()
    op = planted(values)
    want = 2 if which == "both" else 1
    budget = two_pass_bytes(values.numel(), want, vector_dtype=torch.float32, recurrence_dtype=torch.float64)
    lean = ss.eigs(op, 1, which, tol=1e-5, memory_budget=budget)
    assert lean.plan.reorthogonalisation == lanczos.TWO_PASS and lean.plan.dtype == "torch.float32"
    norm = float(values.abs().max())
    assert lean.all_converged
    assert torch.allclose(lean.eigenvalues, truth(values, 1, which), atol=1e-5 * norm, rtol=0)


def test_without_a_basis_float32_products_get_float32_vectors():
    # A float32 operator's products are rounded to float32 already: with room for float64 vectors, a run
    # without a basis still holds float32 ones (half the memory traffic a step); a float64 operator keeps
    # float64 vectors. Both find the top eigenvalue of the planted spectrum (eigh's: 100).
    values = outlier_spectrum()
    budget = two_pass_bytes(values.numel(), 1, vector_dtype=torch.float64, recurrence_dtype=torch.float64)
    wide_op = planted(values)
    narrow_op = ss.DenseOperator(wide_op.matrix.float())
    wide = ss.eigs(wide_op, 1, "largest", tol=1e-6, memory_budget=budget)
    narrow = ss.eigs(narrow_op, 1, "largest", tol=1e-4, memory_budget=budget)
    assert (wide.plan.reorthogonalisation, wide.plan.dtype) == (lanczos.TWO_PASS, "torch.float64")
    assert (narrow.plan.reorthogonalisation, narrow.plan.dtype) == (lanczos.TWO_PASS, "torch.float32")
    assert narrow.plan.bytes < wide.plan.bytes
    assert narrow.all_converged and float(narrow.eigenvalues[-1]) == pytest.approx(100.0, rel=1e-4)
    assert wide.all_converged and float(wide.eigenvalues[-1]) == pytest.approx(100.0, rel=1e-6)


def test_analyze_with_no_room_for_a_basis_still_proves_the_saddle():
    a = planted(outlier_spectrum(300), seed=2).matrix
    obj = ss.Objective.from_function(lambda th: 0.5 * th @ (a @ th), torch.zeros(300, dtype=torch.float64))
    budget = two_pass_bytes(300, 1, vector_dtype=torch.float64, recurrence_dtype=torch.float64)
    cp = ss.analyze(obj, exact=False, k=1, index_probes=0, memory_budget=budget)
    assert cp.kind == "saddle" and cp.lanczos["top"]["plan"]["reorthogonalisation"] == lanczos.TWO_PASS
    u = cp.escape_direction
    assert float(u @ a @ u) == pytest.approx(cp.escape_curvature, rel=1e-9) and cp.escape_curvature < 0
    assert cp.lambda_max == pytest.approx(100.0, rel=1e-6)


def test_the_default_budget_is_half_the_free_memory_less_a_rebuilt_graph(monkeypatch):
    op = planted(torch.linspace(-1, 2, 300))
    free, source = available_memory("cpu")
    res = ss.eigs(op, 1, "largest")
    assert res.plan.budget is not None and source in res.plan.budget_source
    assert res.plan.budget == pytest.approx(lanczos.BASIS_MEMORY_SHARE * free, rel=0.2)

    monkeypatch.setattr(basis_plan, "available_memory", lambda device: (1_000_000, "a test"))
    res = ss.eigs(op, 1, "largest")
    assert res.plan.budget == 500_000 and "a test" in res.plan.budget_source
    assert res.plan.bytes <= 500_000
    graphs = types.SimpleNamespace(recomputed=2, bytes_per_graph=200_000)
    with_graph = types.SimpleNamespace(shape=op.shape, dtype=op.dtype, device=op.device, matmat=op.matmat,
                                       graph_plan=graphs)
    res = ss.eigs(with_graph, 1, "largest")
    assert res.plan.budget == 400_000 and "rebuilt gradient graph" in res.plan.budget_source

    monkeypatch.setattr(basis_plan, "available_memory", lambda device: (None, "unknown"))
    res = ss.eigs(op, 1, "largest")  # the former rule: as many float64 vectors as fit 1 GiB
    assert res.plan.budget is None and res.plan.vectors == 300 and res.plan.dtype == "torch.float64"


def test_the_plan_is_in_the_record_beside_every_former_key():
    res = ss.eigs(planted(torch.linspace(-1, 2, 100)), 2, "both", memory_budget=10**8)
    record = res.to_dict()
    for key in ("eigenvalues", "residuals", "converged", "spectral_norm", "hvp_count", "restarts", "which", "tol",
                "relative_to", "atol", "stopped_early", "dtype", "operator_dtype"):
        assert key in record
    plan = record["plan"]
    assert {"vectors", "dtype", "bytes", "budget", "why", "reorthogonalisation", "device"} <= set(plan)
    assert plan["budget"] == 10**8 and plan["vectors"] == 100
    json.dumps(record)


def test_analyze_takes_the_budget_and_refuses_before_any_product():
    a = planted(outlier_spectrum(300), seed=2).matrix
    obj = ss.Objective.from_function(lambda th: 0.5 * th @ (a @ th), torch.zeros(300, dtype=torch.float64))
    cp = ss.analyze(obj, exact=False, k=1, index_probes=0, memory_budget=need(300, 30, torch.float32))
    assert cp.kind == "saddle"
    for end in ("top", "bottom"):
        plan = cp.lanczos[end]["plan"]
        assert plan["budget_source"] == "memory_budget" and plan["dtype"] == "torch.float32"
    calls = []
    with pytest.raises(errors.MemoryBudgetError):
        ss.analyze(obj, exact=False, index_probes=0, memory_budget=1000, progress=lambda *a: calls.append(a))
    assert calls == []


def test_a_cpu_basis_holds_only_the_vectors_a_run_writes():
    # 2M parameters, a plan of about 2 GiB (127 float64 vectors); top-1 converges in about ten steps,
    # and the resident set grows by about as many vectors, not by the plan.
    n = 2_000_000
    values = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values[0] = 5.0
    op = Diagonal(values)

    def rss():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

    before, peak = rss(), [0]
    res = ss.eigs(op, 1, "largest", tol=1e-4, memory_budget=2 * 2**30,
                  progress=lambda done, total: peak.__setitem__(0, max(peak[0], rss())))
    assert res.plan.vectors > 100 and res.plan.bytes > 1.5 * 2**30
    assert res.eigenvalues[-1] == pytest.approx(5.0, rel=1e-6)
    vector = n * 8
    assert peak[0] - before <= (res.hvp_count + 12) * vector


def test_a_budget_reads_as_people_write_it():
    from saddlescope.memory import parse_bytes

    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("500 MB") == 500 * 10**6
    assert parse_bytes("1.5G") == 1_500_000_000 and parse_bytes("2e9") == 2 * 10**9 and parse_bytes(4096) == 4096
    for bad in ("lots", "-1GB", "8 parsecs", ""):
        with pytest.raises(ValueError, match="not a number of bytes"):
            parse_bytes(bad)


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_freed_heap_memory_goes_back_to_the_system():
    # glibc's dynamic mmap threshold: once a 16 MB block is freed, blocks up to that size come from the heap,
    # where what is freed below the top stays resident. Twenty 8 MB blocks, all but the last freed: about
    # 150 MB resident for 8 MB in use, until return_freed_memory().
    from saddlescope.memory import return_freed_memory

    if not return_freed_memory():
        pytest.skip("no malloc_trim in this C library")
    big = torch.ones(2 * 2**20, dtype=torch.float64)
    del big
    before = _rss()
    blocks = [torch.ones(2**20, dtype=torch.float64) for _ in range(20)]
    last = blocks.pop()
    del blocks
    held = _rss()
    if held - before < 100 * 2**20:
        pytest.skip("this allocator returned the blocks by itself (a fixed mmap threshold)")
    assert return_freed_memory()
    assert held - _rss() >= 100 * 2**20
    del last


def test_a_plan_that_economises_returns_freed_memory_after_every_product(monkeypatch):
    calls = []
    monkeypatch.setattr(lanczos, "return_freed_memory", lambda: calls.append(1) or True)
    values = outlier_spectrum()
    for budget, returned in ((None, False), (two_pass_bytes(values.numel(), 1, vector_dtype=torch.float64,
                                                             recurrence_dtype=torch.float64), True)):
        calls.clear()
        res = ss.eigs(planted(values), 1, "largest", memory_budget=budget)
        assert (res.plan.reorthogonalisation != "full") is returned
        assert len(calls) == (res.hvp_count if returned else 0)


def test_a_two_pass_plan_at_the_default_budget_hands_memory_back_only_while_it_is_short(monkeypatch):
    # At 124M parameters a product right after the hand-back took 3.2-6.1 s against 2.1-2.8 s (its
    # temporaries faulted in again), so at the default budget a two-pass run hands memory back only while
    # the host's free memory is below its budget; an explicit budget still means every product.
    calls = []
    monkeypatch.setattr(lanczos, "return_freed_memory", lambda: calls.append(1) or True)
    values = outlier_spectrum()
    need = two_pass_bytes(values.numel(), 1, vector_dtype=torch.float64, recurrence_dtype=torch.float64)
    monkeypatch.setattr(basis_plan, "available_memory", lambda device: (2 * need, "a test"))  # budget: need
    for free, returned in ((10 * need, False), (need // 2, True)):
        monkeypatch.setattr(lanczos, "available_memory", lambda device, free=free: (free, "a test"))
        calls.clear()
        res = ss.eigs(planted(values), 1, "largest")
        assert res.plan.reorthogonalisation == lanczos.TWO_PASS and res.plan.budget_source.endswith("a test)")
        assert len(calls) == (res.hvp_count if returned else 0)
        assert res.all_converged and float(res.eigenvalues[0]) == pytest.approx(100.0, rel=1e-4)


def test_on_a_gpu_the_basis_moves_to_host_memory_before_the_plan_gives_up():
    # plan_basis is a pure function of the budgets: checked here without a GPU.
    n = 10_000_000
    gpu_room = lanczos.planned_bytes(n, 20, 1, basis_dtype=torch.float32, recurrence_dtype=torch.float64,
                                     partial=True, grows_by_copy=True) - 1
    plan = lanczos.plan_basis(n, 1, budget=gpu_room, budget_source="test GPU", device="cuda",
                              host_budget=64 * 2**30, host_source="test host")
    assert (plan.device, plan.dtype, plan.reorthogonalisation) == ("cpu", "torch.float32", "partial")
    assert plan.budget == 64 * 2**30 and "in host memory" in plan.why
    # No room in host memory either: no basis at all, the two-pass recurrence on the GPU; then nothing.
    lean = lanczos.plan_basis(n, 1, budget=gpu_room, budget_source="test GPU", device="cuda",
                              host_budget=2**20, host_source="test host")
    assert (lean.device, lean.reorthogonalisation) == ("cuda", lanczos.TWO_PASS) and lean.bytes <= gpu_room
    smallest = two_pass_bytes(n, 1, vector_dtype=torch.float32, recurrence_dtype=torch.float64)
    with pytest.raises(errors.MemoryBudgetError):
        lanczos.plan_basis(n, 1, budget=smallest - 1, budget_source="test GPU", device="cuda",
                           host_budget=2**20, host_source="test host")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_eigs_with_the_basis_in_host_memory(monkeypatch):
    values = outlier_spectrum(2000).cuda()
    op = Diagonal(values)
    monkeypatch.setattr(lanczos, "default_budget", lambda op, device: (
        (2**30, "test host") if torch.device(device).type == "cpu" else (10_000, "test GPU")))
    res = ss.eigs(op, 1, "both", tol=1e-6)
    assert res.plan.device == "cpu" and res.eigenvalues.device.type == "cuda"
    assert torch.allclose(res.eigenvalues.cpu(), truth(values.cpu(), 1, "both"), rtol=1e-5)


class _SpikeOverBulk(_Operator):
    """``D + c u u^T`` in float32: a diagonal bulk in [-1, 1] and one outlier along the flat unit vector
    ``u``, applied without forming the matrix (so ``n`` can be millions)."""

    def __init__(self, n: int, c: float) -> None:
        gen = torch.Generator().manual_seed(0)
        self.d = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
        self.c, self.shape, self.dtype, self.device, self.hvp_count = c, (n, n), torch.float32, torch.device("cpu"), 0

    def _matmat(self, vs):
        self.hvp_count += vs.shape[1]
        v = vs.double()
        out = self.d[:, None] * v + self.c * v.mean(0, keepdim=True)  # c u u^T v with u = 1/sqrt(n)
        return out.float()

    def top(self) -> float:
        """The largest root of the secular equation ``1 = (c / n) sum 1 / (lambda - d_i)``, by bisection."""
        low, high = float(self.d.max()) + 1e-12, float(self.d.max()) + self.c + 1.0
        for _ in range(200):
            mid = 0.5 * (low + high)
            low, high = (mid, high) if float((self.c / (mid - self.d)).mean()) > 1 else (low, mid)
        return 0.5 * (low + high)


def test_two_passes_in_float32_vectors_measure_a_flat_eigenvector_of_millions_of_entries():
    # torch sums a float32 norm in float32: over 4M entries a flat unit vector's norm reads 1.003, and a
    # run that normalised its Ritz vector so reported a Rayleigh quotient 0.6% high, a "lower bound" above
    # the eigenvalue (at 124M entries: 1,399 for 1,231). Norms and dots are now summed in float64.
    op = _SpikeOverBulk(4_000_000, c=50.0)
    truth = op.top()
    budget = two_pass_bytes(op.shape[0], 1, vector_dtype=torch.float32, recurrence_dtype=torch.float64)
    res = ss.eigs(op, 1, "largest", tol=1e-4, memory_budget=budget)
    assert (res.plan.reorthogonalisation, res.plan.dtype) == (lanczos.TWO_PASS, "torch.float32")
    y = res.eigenvectors[:, -1].double()
    assert float(y.norm()) == pytest.approx(1.0, abs=1e-6)
    theta = float(res.eigenvalues[-1])
    assert theta <= truth * (1 + 1e-6)  # a Rayleigh quotient: never above the largest eigenvalue
    assert abs(theta - truth) <= 1e-4 * truth
