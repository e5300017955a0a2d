"""Training the embedded prior: denoising score matching (`score_matching`) on photographs gathered
from installable packages (`data`), never the held-out ones the evaluation room scores on.

`posterior_diff.training` was one module (today's `score_matching`); its public names are still
importable from here.
"""

from posterior_diff.training.score_matching import (CHECKPOINT, IMAGE_WEIGHTINGS, LOSS_WEIGHTINGS, LR_SCHEDULES,
                                                    MIXED_PRECISIONS, SNAPSHOTS, RandomCrops, TrainingConfig,
                                                    TrainingRun, build_scheduler, build_unet, config_from_init,
                                                    find_unet_folder, learning_rate, load_checkpoint,
                                                    load_init_weights, load_snapshot, loss_weights, min_snr_weights,
                                                    parameter_count, resolve_device, save_snapshot,
                                                    start_model_steps, total_steps, train, unet_kwargs)

__all__ = ["CHECKPOINT", "LOSS_WEIGHTINGS", "LR_SCHEDULES", "IMAGE_WEIGHTINGS", "MIXED_PRECISIONS", "TrainingConfig",
           "unet_kwargs", "build_unet", "build_scheduler", "parameter_count", "find_unet_folder", "config_from_init",
           "load_init_weights", "RandomCrops", "min_snr_weights", "loss_weights", "learning_rate", "load_checkpoint",
           "resolve_device", "TrainingRun", "train", "start_model_steps", "total_steps", "SNAPSHOTS", "save_snapshot",
           "load_snapshot"]
