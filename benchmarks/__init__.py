"""The measured comparisons, each run from the repository root as `python -m benchmarks.NAME`.

gaussian_exactness, run_benchmarks (its parts: exact_posteriors, images_vs_deepinv),
image_restoration, particle_mode, training_curve. They share `reporting` (tables, the
provenance block), `peers` (deepinv's methods) and `posterior_diff.evaluation.harness` (photographs,
measurements, baselines, scores, the divergence rule).
"""
