"""DPM-Solver-v3 (Zheng, Lu, Chen, Zhu; NeurIPS 2023; arXiv 2310.13268) with empirical model statistics (EMS).

- :mod:`.sampler`: the solver (predictor, pseudo-order, corrector) on a grid snapped to the statistics;
- :mod:`.coefficients`: the step weights the update integrates from the statistics;
- :mod:`.ems`: computing the statistics l, s, b of a model from data (:func:`compute_ems`);
- :mod:`.storage`: the :class:`EMS` container, its files, the shipped statistics and the checks that tie
  statistics to one model and one run.
"""

from .ems import compute_ems
from .sampler import dpm_solver_v3, snap_to_ems
from .storage import EMS, FORMAT, SHIPPED_EMS_DIR, ems_grid, load_ems, model_fingerprint, shipped_ems

__all__ = ["EMS", "FORMAT", "SHIPPED_EMS_DIR", "compute_ems", "dpm_solver_v3", "ems_grid", "load_ems",
           "model_fingerprint", "shipped_ems", "snap_to_ems"]
