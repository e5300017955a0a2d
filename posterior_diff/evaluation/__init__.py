"""Evaluation: what the benchmarks, the demos and the tests measure with.

- `harness`: the held-out photographs, measurements of them, the classical baselines (bicubic,
  biharmonic fill, BM3D, unsupervised Wiener and Richardson-Lucy) and the image scores.
- `metrics`: distances between sample sets and known distributions, and calibration.
- `problems`: reference inverse problems with closed-form posteriors.

`posterior_diff.evaluation` was one module (today's `harness`); its public names are still
importable from here.
"""

from posterior_diff.evaluation.harness import (DIVERGED, DIVERGENCE_BOUND, HELD_OUT, HELD_OUT_PHOTOGRAPHS,
                                               SIMULATED_TASKS, TRAINING_PHOTOGRAPHS, Measurement, baselines,
                                               bicubic_upsample, biharmonic_fill, bm3d_denoise, calibrated_coverage,
                                               centre_crop, coverage_within_two_std, display_std, has_diverged,
                                               load_photograph, measure, nearest_upsample, photograph,
                                               posterior_distance, psnr_ssim, restore_unless_diverged,
                                               richardson_lucy_deconvolve, single_precision, wiener_deconvolve)

__all__ = [
    "HELD_OUT_PHOTOGRAPHS", "HELD_OUT", "TRAINING_PHOTOGRAPHS", "SIMULATED_TASKS", "DIVERGED", "DIVERGENCE_BOUND",
    "photograph", "centre_crop", "load_photograph", "Measurement", "measure",
    "bicubic_upsample", "biharmonic_fill", "bm3d_denoise", "wiener_deconvolve", "richardson_lucy_deconvolve", "baselines", "nearest_upsample", "display_std", "psnr_ssim",
    "coverage_within_two_std", "calibrated_coverage", "has_diverged", "restore_unless_diverged", "single_precision",
    "posterior_distance",
]
