"""Contract checks for plugins, generated from the registry — reusable in third-party CI.

``implicit verify [PLUGIN ...]`` runs them (through pytest and Hypothesis) on the installed
plugins, or on those of the named plugins / distributions, and exits non-zero on a violation,
printing the falsifying example. The checks are theorems for the instances a cell's strategy
draws, so Hypothesis may search them adversarially:

* **solver contract** (every solver × every cell with a strategy; a ``linear_only`` solver ×
  the suite's own affine problem, :func:`affine_examples`): the record is truthful against
  residuals recomputed from their definition in float64 (:func:`true_residuals`),
  ``nfe``/``n_calls`` within ``max_iter`` and no calls after every sample is done, a sample out
  of budget only when fewer calls were left than one step needs (``n_calls = max_iter`` for a
  solver whose steps make one call) and the record says how many went unused, the state's
  structure, dtype and device kept, the caller's tensors untouched, no graph, deterministic;
* **fault** (same cases): f turning NaN, Inf or divergent for one sample at a drawn call;
* **batch rows** (``batch_independent`` cells, the affine problem): each sample solved alone
  equals its row, with the same count;
* **efficacy** (every declared :class:`implicit.Guarantee`): the theorem's bound on calls, on
  linear maps or contractions;
* **gradient contract** (every backward × every cell with the primary solver, and every
  ``exact`` backward × every solver × ``cheap`` cell): gradients reach ``x`` and every
  parameter and are finite; ``exact``: finite differences and the dense adjoint; approximate:
  the declared ``adjoint_formula`` and ``adjoint_error_bound``; ``second_order``: Hessian-vector
  products of a plain autograd loop; ``backprop_through_iterates``: the solver's own steps;
* **adjoint solvers** (backwards declaring ``adjoint_solver`` × every solver): the implied
  adjoint is exact with that solver on the adjoint;
* **no leak**: 50 training steps leave no hooks, free each graph without the garbage
  collector and keep the number of live tensors flat.

Options are drawn from each plugin's ``option_strategy``; every case counts its claims
(:class:`Tally`) and fails as vacuous when a required claim was made on fewer than half of its
examples. ``implicit verify --report DIR`` writes the counts.

The pytest plugin is opt-in: ``pytest -p implicit.testing.plugin``.
"""

from __future__ import annotations

from .checks import (
    AFFINE,
    AffineCell,
    Case,
    affine_examples,
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

__all__ = ["AFFINE", "AffineCell", "Case", "ContractViolation", "Tally", "affine_examples",
           "check_adjoint",
           "check_backprop_through_iterates", "check_batch_rows", "check_efficacy",
           "check_fault", "check_gradient_contract", "check_no_leak", "check_nonfinite",
           "check_second_order", "check_solver_contract", "guarantees_of", "linear_problem",
           "matrix", "true_residuals"]
