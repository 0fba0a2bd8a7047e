"""Contract checks for plugins, generated from the registry — reusable in third-party CI.

``implicit verify [PLUGIN ...]`` runs them (through pytest and Hypothesis) on the installed
plugins, or on those of the named plugins / distributions, and exits non-zero on a violation,
printing the falsifying example. The checks are theorems for the instances a cell's strategy
draws, so Hypothesis may search them adversarially:

* **solver contract** (every solver × every cell with a strategy, ``linear_only`` solvers
  excepted): the record is truthful (``converged[i]`` ⇔ recomputed residual ≤ tol), ``nfe`` and
  ``n_calls`` stay within ``max_iter``, the output has the state's structure, dtype and device,
  the caller's tensors are not mutated and no autograd graph is built;
* **gradient contract** (every backward, on every cell with a strategy, with the first
  unrollable solver): gradients reach ``x`` and every parameter and are finite; for backwards
  declaring ``exact``, the directional derivative matches central finite differences.

The pytest plugin is opt-in: ``pytest -p implicit.testing.plugin``.
"""

from __future__ import annotations

from .checks import ContractViolation, check_gradient_contract, check_solver_contract, matrix

__all__ = ["ContractViolation", "check_gradient_contract", "check_solver_contract", "matrix"]
