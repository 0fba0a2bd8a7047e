"""Standard nonlinear test problems as batched maps: scipy's and Moré–Garbow–Hillstrom's.

Every problem is a square system ``F(x) = 0`` in ``n`` unknowns with its standard starting
point, written for batches: ``problem.F(x)`` maps ``(B, n)`` to ``(B, n)`` (any float dtype and
device) and ``problem.fixed_point(x)`` is ``f(z) = z − F(z)``, the form every solver of this
library takes (a fixed point of ``f`` is a root of ``F``, and the solver's residual
``‖f(z) − z‖`` is ``‖F(z)‖``). ``problem.start(factor)`` is ``factor · x0``: Moré, Garbow &
Hillstrom (1981) run each problem from ``x0``, ``10 x0`` and ``100 x0``; ``factor=1`` is the
standard start. ``problem.roots`` lists known solutions (exact, or from the literature, or
computed once to ``‖F‖ < 1e-12`` where marked so); every one is checked by the tests.

Sources:

* ``scipy_*``: scipy's ``optimize/tests/test_nonlin.py`` (the problems its ``anderson``,
  ``broyden1`` and ``newton_krylov`` are tested on), with their starting points;
* the others: J. J. Moré, B. S. Garbow, K. E. Hillstrom, "Testing unconstrained optimization
  software", ACM TOMS 7 (1981) 17–41 (numbers in ``source``), in the square form MINPACK-1
  tests its ``hybrd`` on (``vecfcn``: Wood and variably dimensioned as gradient systems).

Third-party solver authors can run the set with ``implicit bench --problems standard`` (ours
and scipy's solvers side by side) or use it directly::

    from implicit import problems
    for p in problems.standard():
        sol = implicit.solve(p.fixed_point, p.start(), solver="broyden", tol=1e-8, stop="abs",
                             max_iter=200)
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import attrs
import torch

ResidualFn = Callable[[torch.Tensor], torch.Tensor]
StartSpec = Union[Sequence[float], Callable[[int], Sequence[float]]]


@attrs.frozen(kw_only=True, eq=False)
class TestProblem:
    """A square nonlinear system ``F(x) = 0`` with its standard start (see the module)."""

    __test__ = False  # not a pytest test class, despite its name

    name: str
    n: int
    residual: ResidualFn = attrs.field(repr=False)
    x0: tuple = attrs.field(converter=tuple, repr=False)
    source: str
    roots: tuple = attrs.field(default=(), converter=tuple, repr=False)
    note: str = ""

    def F(self, x: torch.Tensor) -> torch.Tensor:
        """``F`` on a batch ``(B, n)``."""
        if x.dim() != 2 or x.shape[1] != self.n:
            raise ValueError(f"problem {self.name!r} takes (B, {self.n}) batches, got shape "
                             f"{tuple(x.shape)}")
        return self.residual(x)

    def fixed_point(self, z: torch.Tensor) -> torch.Tensor:
        """``f(z) = z − F(z)``: its fixed points are the roots of ``F``."""
        return z - self.F(z)

    def start(self, factor: float = 1.0, *, batch: int = 1, dtype: torch.dtype = torch.float64,
              device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """``factor · x0`` as a ``(batch, n)`` tensor."""
        x0 = torch.tensor(self.x0, dtype=dtype, device=device) * factor
        return x0.expand(batch, self.n).clone()

    def root_tensors(self, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
        return [torch.tensor(r, dtype=dtype) for r in self.roots]


# -- scipy's optimize/tests/test_nonlin.py ---------------------------------------------------


def _scipy_f(x):  # F: -d x - c (xᵀx) x
    d = x.new_tensor([3, 2, 1.5, 1, 0.5])
    return -d * x - 0.01 * (x * x).sum(dim=1, keepdim=True) * x


def _scipy_f2(x):
    return x.clone()


_F3_A = ((-2.0, 1.0, 0.0), (1.0, -2.0, 1.0), (0.0, 1.0, -2.0))
_F3_B = (1.0, 2.0, 3.0)


def _scipy_f3(x):  # A x - b
    return x @ x.new_tensor(_F3_A).T - x.new_tensor(_F3_B)


def _scipy_f4_powell(x):
    a = 1e4
    return torch.stack([a * x[:, 0] * x[:, 1] - 1,
                        torch.exp(-x[:, 0]) + torch.exp(-x[:, 1]) - (1 + 1 / a)], dim=1)


def _scipy_f5(x):  # pressure_network(x, Qtot=4, k=0.5): P = k x², F = (P[1:] - P[0], Σx - 4)
    p = 0.5 * x * x
    return torch.cat([p[:, 1:] - p[:, :1], x.sum(dim=1, keepdim=True) - 4], dim=1)


_F6_J0 = ((-4.256, 14.7), (0.8394989, 0.59964207))


def _scipy_f6(x):  # -J0⁻¹ v(x)
    x1, x2 = x[:, 0], x[:, 1]
    v = torch.stack([(x1 + 3) * (x2 ** 5 - 7) + 18, torch.sin(x2 * torch.exp(x1) - 1)], dim=1)
    return -torch.linalg.solve(x.new_tensor(_F6_J0), v.T).T


# -- Moré, Garbow & Hillstrom 1981 (MINPACK-1's square forms) ----------------------------------


def _rosenbrock(x):  # MGH 1
    return torch.stack([10 * (x[:, 1] - x[:, 0] ** 2), 1 - x[:, 0]], dim=1)


def _freudenstein_roth(x):  # MGH 2
    x1, x2 = x[:, 0], x[:, 1]
    return torch.stack([-13 + x1 + ((5 - x2) * x2 - 2) * x2,
                        -29 + x1 + ((x2 + 1) * x2 - 14) * x2], dim=1)


def _powell_badly_scaled(x):  # MGH 3
    return torch.stack([1e4 * x[:, 0] * x[:, 1] - 1,
                        torch.exp(-x[:, 0]) + torch.exp(-x[:, 1]) - 1.0001], dim=1)


def _helical_valley(x):  # MGH 7
    x1, x2, x3 = x[:, 0], x[:, 1], x[:, 2]
    # MGH: θ = atan(x2/x1)/2π, plus 1/2 where x1 < 0, so θ ∈ (−1/4, 3/4); atan2 gives the
    # same up to a whole turn
    theta = torch.atan2(x2, x1) / (2 * math.pi)
    theta = torch.where(theta < -0.25, theta + 1, theta)
    return torch.stack([10 * (x3 - 10 * theta), 10 * (torch.sqrt(x1 ** 2 + x2 ** 2) - 1), x3],
                       dim=1)


def _powell_singular(x):  # MGH 13
    x1, x2, x3, x4 = x.unbind(dim=1)
    return torch.stack([x1 + 10 * x2, math.sqrt(5) * (x3 - x4), (x2 - 2 * x3) ** 2,
                        math.sqrt(10) * (x1 - x4) ** 2], dim=1)


def _wood(x):  # MGH 14 as MINPACK's gradient system
    x1, x2, x3, x4 = x.unbind(dim=1)
    t1, t2 = x2 - x1 ** 2, x4 - x3 ** 2
    return torch.stack([-200 * x1 * t1 - (1 - x1),
                        200 * t1 + 20.2 * (x2 - 1) + 19.8 * (x4 - 1),
                        -180 * x3 * t2 - (1 - x3),
                        180 * t2 + 20.2 * (x4 - 1) + 19.8 * (x2 - 1)], dim=1)


def _extended_rosenbrock(x):  # MGH 21
    odd, even = x[:, 0::2], x[:, 1::2]
    out = torch.stack([10 * (even - odd ** 2), 1 - odd], dim=2)
    return out.reshape(x.shape)


def _extended_powell_singular(x):  # MGH 22
    b = x.reshape(x.shape[0], -1, 4)
    x1, x2, x3, x4 = b.unbind(dim=2)
    out = torch.stack([x1 + 10 * x2, math.sqrt(5) * (x3 - x4), (x2 - 2 * x3) ** 2,
                       math.sqrt(10) * (x1 - x4) ** 2], dim=2)
    return out.reshape(x.shape)


def _variably_dimensioned(x):  # MGH 25 as MINPACK's gradient system
    j = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)
    s = ((x - 1) * j).sum(dim=1, keepdim=True)
    return x - 1 + j * (s * (1 + 2 * s * s))


def _trigonometric(x):  # MGH 26
    n = x.shape[1]
    i = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    return (n - torch.cos(x).sum(dim=1, keepdim=True) + i * (1 - torch.cos(x))
            - torch.sin(x))


def _brown_almost_linear(x):  # MGH 27
    n = x.shape[1]
    head = x[:, :-1] + x.sum(dim=1, keepdim=True) - (n + 1)
    return torch.cat([head, x.prod(dim=1, keepdim=True) - 1], dim=1)


def _grid(x):
    n = x.shape[1]
    h = 1.0 / (n + 1)
    t = torch.arange(1, n + 1, dtype=x.dtype, device=x.device) * h
    return h, t


def _neighbours(x):
    zero = torch.zeros_like(x[:, :1])
    return torch.cat([zero, x[:, :-1]], dim=1), torch.cat([x[:, 1:], zero], dim=1)


def _discrete_boundary_value(x):  # MGH 28
    h, t = _grid(x)
    left, right = _neighbours(x)
    return 2 * x - left - right + h * h * (x + t + 1) ** 3 / 2


def _discrete_integral_equation(x):  # MGH 29
    h, t = _grid(x)
    u = (x + t + 1) ** 3
    lower = torch.cumsum(t * u, dim=1)  # Σ_{j ≤ k} t_j u_j
    upper = torch.flip(torch.cumsum(torch.flip((1 - t) * u, [1]), dim=1), [1])  # Σ_{j ≥ k}
    upper = torch.cat([upper[:, 1:], torch.zeros_like(upper[:, :1])], dim=1)  # Σ_{j > k}
    return x + h * ((1 - t) * lower + t * upper) / 2


def _broyden_tridiagonal(x):  # MGH 30
    left, right = _neighbours(x)
    return (3 - 2 * x) * x - left - 2 * right + 1


def _broyden_banded(x):  # MGH 31: J_k = {j ≠ k : max(1, k − 5) ≤ j ≤ min(n, k + 1)}
    n = x.shape[1]
    k = torch.arange(n, device=x.device)
    band = (k[None, :] >= k[:, None] - 5) & (k[None, :] <= k[:, None] + 1) & (
        k[None, :] != k[:, None])
    return x * (2 + 5 * x * x) + 1 - (x * (1 + x)) @ band.to(x.dtype).T


def _chebyquad(x):  # MGH 35: (1/n) Σ_j T_i(2 x_j − 1) − ∫₀¹ T_i(2t − 1) dt, i = 1..n
    n = x.shape[1]
    y = 2 * x - 1
    t_prev, t_cur = torch.ones_like(y), y
    rows = []
    for i in range(1, n + 1):
        integral = -1.0 / (i * i - 1) if i % 2 == 0 else 0.0
        rows.append(t_cur.mean(dim=1) - integral)
        t_prev, t_cur = t_cur, 2 * y * t_cur - t_prev
    return torch.stack(rows, dim=1)


#: roots without a closed form, computed once (scipy.optimize.root, method "hybr", from the
#: standard start, then Newton steps with the exact Jacobian) to ‖F‖₂ < 1e-15 in float64
_COMPUTED: dict[str, tuple[float, ...]] = {
    "powell_badly_scaled": (1.0981593296998035e-05, 9.10614673986664),
    "discrete_boundary_value": (
        -0.043164982518764876, -0.08157715653538689, -0.1144857143805293,
        -0.14097357686259668, -0.15990869618198314, -0.16987720231277492,
        -0.16908998378120835, -0.15524953522183182, -0.125355891678935, -0.07541653368589209),
    "broyden_tridiagonal": (
        -0.5707221320112247, -0.6818069499842749, -0.7022100760176601, -0.7055106298950804,
        -0.7049061557287437, -0.7014966070298512, -0.6918893223547983, -0.6657965144058536,
        -0.5960351090263657, -0.4164122575286933),
    "broyden_banded": (
        -0.4283028635872503, -0.47659642435629024, -0.5196524636468617, -0.5580993248321808,
        -0.5925061568294573, -0.624503682199468, -0.6232394714405911, -0.6213938417965735,
        -0.6204535966590874, -0.5864692707204351),
    "chebyquad": (0.08375125649950903, 0.31272929522320947, 0.5, 0.6872707047767905,
                  0.9162487435004909),
}


def _build() -> tuple[TestProblem, ...]:
    scipy_src = "scipy optimize/tests/test_nonlin.py"
    mgh = "Moré, Garbow & Hillstrom 1981, problem "
    n10 = 10
    # F3's root: A x = b
    f3_root = torch.linalg.solve(torch.tensor(_F3_A, dtype=torch.float64),
                                 torch.tensor(_F3_B, dtype=torch.float64)).tolist()
    return (
        TestProblem(name="scipy_F", n=5, residual=_scipy_f, x0=(1, 1, 1, 1, 1),
                    source=scipy_src + " (F)", roots=[(0.0,) * 5]),
        TestProblem(name="scipy_F2", n=6, residual=_scipy_f2, x0=(1, 2, 3, 4, 5, 6),
                    source=scipy_src + " (F2)", roots=[(0.0,) * 6]),
        TestProblem(name="scipy_F3", n=3, residual=_scipy_f3, x0=(1, 2, 3),
                    source=scipy_src + " (F3)", roots=[tuple(f3_root)]),
        TestProblem(name="scipy_F4_powell", n=2, residual=_scipy_f4_powell, x0=(-1, -2),
                    source=scipy_src + " (F4_powell)",
                    roots=[_COMPUTED["powell_badly_scaled"]]),
        TestProblem(name="scipy_F5", n=4, residual=_scipy_f5, x0=(2, 0, 2, 0),
                    source=scipy_src + " (F5, pressure network)", roots=[(1.0,) * 4]),
        TestProblem(name="scipy_F6", n=2, residual=_scipy_f6, x0=(-0.5, 1.4),
                    source=scipy_src + " (F6)", roots=[(0.0, 1.0)]),
        TestProblem(name="rosenbrock", n=2, residual=_rosenbrock, x0=(-1.2, 1),
                    source=mgh + "1", roots=[(1.0, 1.0)]),
        TestProblem(name="freudenstein_roth", n=2, residual=_freudenstein_roth, x0=(0.5, -2),
                    source=mgh + "2", roots=[(5.0, 4.0)],
                    note="a local minimiser of ‖F‖ with ‖F‖ ≈ 7 attracts many methods"),
        TestProblem(name="powell_badly_scaled", n=2, residual=_powell_badly_scaled, x0=(0, 1),
                    source=mgh + "3", roots=[_COMPUTED["powell_badly_scaled"]]),
        TestProblem(name="helical_valley", n=3, residual=_helical_valley, x0=(-1, 0, 0),
                    source=mgh + "7", roots=[(1.0, 0.0, 0.0)]),
        TestProblem(name="powell_singular", n=4, residual=_powell_singular, x0=(3, -1, 0, 1),
                    source=mgh + "13", roots=[(0.0,) * 4],
                    note="the Jacobian is singular at the root"),
        TestProblem(name="wood", n=4, residual=_wood, x0=(-3, -1, -3, -1),
                    source=mgh + "14 (MINPACK gradient form)", roots=[(1.0,) * 4]),
        TestProblem(name="extended_rosenbrock", n=n10, residual=_extended_rosenbrock,
                    x0=(-1.2, 1) * (n10 // 2), source=mgh + "21", roots=[(1.0,) * n10]),
        TestProblem(name="extended_powell_singular", n=8, residual=_extended_powell_singular,
                    x0=(3, -1, 0, 1) * 2, source=mgh + "22", roots=[(0.0,) * 8],
                    note="the Jacobian is singular at the root"),
        TestProblem(name="variably_dimensioned", n=n10, residual=_variably_dimensioned,
                    x0=[1 - j / n10 for j in range(1, n10 + 1)],
                    source=mgh + "25 (MINPACK gradient form)", roots=[(1.0,) * n10]),
        TestProblem(name="trigonometric", n=n10, residual=_trigonometric,
                    x0=(1 / n10,) * n10, source=mgh + "26"),
        TestProblem(name="brown_almost_linear", n=n10, residual=_brown_almost_linear,
                    x0=(0.5,) * n10, source=mgh + "27", roots=[(1.0,) * n10]),
        TestProblem(name="discrete_boundary_value", n=n10, residual=_discrete_boundary_value,
                    x0=[(j / (n10 + 1)) * (j / (n10 + 1) - 1) for j in range(1, n10 + 1)],
                    source=mgh + "28", roots=[_COMPUTED["discrete_boundary_value"]]),
        TestProblem(name="discrete_integral_equation", n=n10,
                    residual=_discrete_integral_equation,
                    x0=[(j / (n10 + 1)) * (j / (n10 + 1) - 1) for j in range(1, n10 + 1)],
                    source=mgh + "29", roots=[_COMPUTED["discrete_boundary_value"]],
                    note="the same solution as the discrete boundary value problem"),
        TestProblem(name="broyden_tridiagonal", n=n10, residual=_broyden_tridiagonal,
                    x0=(-1.0,) * n10, source=mgh + "30",
                    roots=[_COMPUTED["broyden_tridiagonal"]]),
        TestProblem(name="broyden_banded", n=n10, residual=_broyden_banded,
                    x0=(-1.0,) * n10, source=mgh + "31",
                    roots=[_COMPUTED["broyden_banded"]]),
        TestProblem(name="chebyquad", n=5, residual=_chebyquad,
                    x0=[j / 6 for j in range(1, 6)], source=mgh + "35",
                    roots=[_COMPUTED["chebyquad"]]),
    )


_STANDARD: Optional[tuple[TestProblem, ...]] = None


def standard() -> tuple[TestProblem, ...]:
    """The standard set (scipy's problems, then Moré–Garbow–Hillstrom's), standard sizes."""
    global _STANDARD
    if _STANDARD is None:
        _STANDARD = _build()
    return _STANDARD


def get(name: str) -> TestProblem:
    """One problem of the standard set by name."""
    for problem in standard():
        if problem.name == name:
            return problem
    raise KeyError(f"no test problem {name!r}; the standard set has: "
                   + ", ".join(p.name for p in standard()))


SETS: dict[str, Callable[[], tuple[TestProblem, ...]]] = {"standard": standard}


def problem_set(name: str) -> tuple[TestProblem, ...]:
    """A named set (``"standard"``) or a comma-separated list of problem names."""
    if name in SETS:
        return SETS[name]()
    return tuple(get(part.strip()) for part in name.split(",") if part.strip())
