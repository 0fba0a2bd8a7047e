"""Contract checks for plugins, generated from the registry — reusable in third-party CI.

``implicit verify [PLUGIN ...]`` runs them (through pytest and Hypothesis) on the installed
plugins, or on those of the named plugins / distributions, and exits non-zero on a violation,
printing the falsifying example. The checks are theorems for the instances a cell's strategy
draws, so Hypothesis may search them adversarially:

* **solver contract** (every solver × every cell with a strategy, ``linear_only`` solvers
  excepted): the record is truthful (``converged[i]`` ⇔ recomputed residual ≤ tol), ``nfe`` and
  ``n_calls`` stay within ``max_iter``, the output has the state's structure, dtype and device,
  the caller's tensors are not mutated, no autograd graph is built, two solves are identical,
  a map returning NaN for a sample has that sample reported non-finite (and, for
  ``batch_independent`` cells, leaves the others alone); convergence is asserted only where it
  is guaranteed (a ``contraction_convergent`` solver on a cell drawn with Lipschitz < 1);
* **batch rows** (``batch_independent`` cells): each sample solved alone equals its row;
* **gradient contract** (every backward, on every cell with a strategy, with the first
  unrollable solver): gradients reach ``x`` and every parameter and are finite; for backwards
  declaring ``exact``, the directional derivative matches central finite differences and the
  implied adjoint ``w`` matches the dense ``(I − Jᵀ)⁻¹ y``; approximate backwards stay within
  their declared ``adjoint_error_bound``;
* **adjoint solvers** (backwards declaring ``adjoint_solver`` × every solver): the implied
  adjoint is exact with that solver on the adjoint;
* **no leak**: 50 training steps leave no hooks, free each graph without the garbage
  collector and keep the number of live tensors flat.

The pytest plugin is opt-in: ``pytest -p implicit.testing.plugin``.
"""

from __future__ import annotations

from .checks import (
    Case,
    check_adjoint,
    check_backprop_through_iterates,
    check_batch_rows,
    check_efficacy,
    check_fault,
    check_gradient_contract,
    check_no_leak,
    check_nonfinite,
    check_second_order,
    check_solver_contract,
    guarantees_of,
    linear_problem,
    matrix,
    true_residuals,
)
from .claims import ContractViolation, Tally

__all__ = ["Case", "ContractViolation", "Tally", "check_adjoint",
           "check_backprop_through_iterates", "check_batch_rows", "check_efficacy",
           "check_fault", "check_gradient_contract", "check_no_leak", "check_nonfinite",
           "check_second_order", "check_solver_contract", "guarantees_of", "linear_problem",
           "matrix", "true_residuals"]
