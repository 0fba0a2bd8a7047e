"""``implicit bench``: the solver × cell workload × backward benchmark matrix.

Every registered solver, cell (through the :class:`implicit.Workload` s its spec lists) and
backward strategy that declare they fit together is measured; third-party plugins included.

``results.json`` schema (``"schema": "implicit-bench/1"``)::

    {
      "schema": "implicit-bench/1",
      "machine": {time_utc, platform, processor, cpu_count, python, torch, torch_threads,
                  device, cuda_device?, cuda?, float32_matmul_precision, tf32_matmul,
                  tf32_cudnn, implicit_layers},
      "config":  {the BenchConfig fields, argv},
      "records": [  # one per combination
        {
          "combination": {solver, cell, workload, backward, device, dtype, batch, tol, stop,
                          max_iter, repeat, seed, reference_tol},
          "error": null | "Type: message",            # then the fields below are absent
          "workload": {description, batch, state_numel_per_sample},
          "forward": {n_calls, nfe_mean, nfe_max, status, status_counts{converged, max_iter,
                      diverged, nonfinite}, time_s (median), times_s, true_abs_residual_max,
                      true_rel_residual_max, trace (median stopping residual per step)},
          "train_forward": {n_calls, nfe_mean, nfe_max, status, status_counts},
          "backward": null | {n_calls, nfe_mean, nfe_max, status, status_counts},
          "train_step_time_s", "train_step_times_s", "cell_eval_time_s",
          "floor_ratio",            # fastest forward / (n_calls × fastest cell evaluation),
                                    # the two timed interleaved; "cell_eval_time_s" is the latter:
                                    # the fastest burst of n_calls evaluations back to back, per
                                    # call ("cell_eval_method" says so; records without it:
                                    # the fastest single call)
          "forward_time_method",    # each timed forward and burst after untimed calls of the
                                    # same, for at least measure.WARM_S (records without it:
                                    # right after the other turns' work)
          "peak_memory_bytes", "peak_memory_method",
          "allocator",              # CPU: the C allocator settings timings ran under (--malloc)
          "grad_rel_error",         # ‖g − g_ref‖ / ‖g_ref‖ over x and all parameters, or null
          "reference": {solver, tol, backward, status, n_calls, backward_status},
          "compare": null | {...}   # with --compare torchdeq
        }
      ]
    }

Times are wall-clock medians of ``repeat`` runs after a warm-up (CUDA synchronised). The true
residual is recomputed by an independent call of the cell on the returned state. The gradient
reference is the same solver in float64 at ``reference_tol`` with a backward declaring the
``exact`` capability. Peak memory is the CUDA allocator's peak over one training step, or on
CPU the growth of the resident set's high-water mark (reset first via /proc/self/clear_refs on
Linux; ``ru_maxrss`` elsewhere) over one training step, in a fresh process per combination.
CPU timings run with glibc's allocator told to keep freed memory (``--malloc tuned``, the
default; see :mod:`implicit.bench.allocator`), and free memory is handed back to the system
before the peak-memory step.
"""

from .matrix import build_matrix
from .measure import Combination, measure
from .runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "Combination", "build_matrix", "measure", "run_bench"]
