"""Sampling: the reverse-time loop and what steers it.

- `time_grids`: the grid of times a sampler steps along.
- `samplers`: `SamplerSettings`, one `Solver` per solver (all with `step(x, now, nxt, denoise, noise)`),
  `sample` and `run_sampler`.
- `guidance`: `AveragedLikelihoodGuidance`, a Denoiser wrapper returning the guided mean D_y.
- `antithetic`: antithetic pairs of samples (the noise source's pairing, their std).
- `mean_estimates`: the posterior mean from the trajectory's guided means (`restore`'s `mean_level`).
- `particles`: particle mode (twisted SMC) on the solvers' Gaussian transitions.

This room works on any Denoiser: it imports only the contracts below it and `operators`, never
a model; the models room beside it does not import it either.
"""
