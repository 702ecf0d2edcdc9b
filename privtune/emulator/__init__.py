"""Emulators for offsite-tuning: Offsite-Tuning (arXiv 2302.04870), ScaleOT (2412.09812), GradOT (2507.04455).

The model owner splits a model into adapters and a middle, compresses the middle into an emulator, ships
adapters + emulator to the data owner, and plugs the returned adapters into the original model. Torch and
transformers only: usable from a plain PyTorch loop.
"""

from privtune.emulator.artifact import (
    OriginalTensorError,
    check_base_model,
    find_original_tensors,
    load_adapter_artifact,
    load_emulator_artifact,
    read_plan,
    save_adapter_artifact,
    save_emulator_artifact,
)
from privtune.emulator.build import (
    build_emulator,
    compress_kept_blocks,
    count_parameters,
    emulator_skeleton,
    freeze_except_adapters,
    model_fingerprint,
)
from privtune.emulator.distill import (
    DistillCheckpoint,
    DistillProgress,
    distill_emulator,
    distillation_loss,
    middle_parameters,
    normalized_kd_loss,
    run_until_block,
)
from privtune.emulator.gradot import (
    KFACStats,
    build_gradot_emulator,
    channel_gcs,
    gradot_compress,
    kfac_statistics,
    select_components,
    svd_gcs,
)
from privtune.emulator.harmonizer import (
    Harmonizer,
    LayerSwitch,
    install_switches,
    make_harmonizers,
    remove_switches,
    set_replace_mask,
    warm_start_harmonizers,
)
from privtune.emulator.importance import least_important, reinforce_update, rewards, sample_keep_mask
from privtune.emulator.layer_drop import uniform_keep_indices, uniform_keep_layers
from privtune.emulator.layer_stack import FAMILY_LINEARS, SandwichSplit, block_linears
from privtune.emulator.low_rank import LowRankLinear, compress_linear, rank_compress_modules, truncated_svd
from privtune.emulator.plan import EmulatorPlan, scaleot_plan, uniform_drop_plan
from privtune.emulator.plug import extract_adapters, plug_adapters
from privtune.emulator.scaleot import LayerImportance, build_scaleot_emulator, lm_loss, rl_step, stage1_step

__all__ = [
    "FAMILY_LINEARS",
    "EmulatorPlan",
    "Harmonizer",
    "KFACStats",
    "LayerImportance",
    "LayerSwitch",
    "LowRankLinear",
    "OriginalTensorError",
    "SandwichSplit",
    "block_linears",
    "build_emulator",
    "build_gradot_emulator",
    "build_scaleot_emulator",
    "channel_gcs",
    "check_base_model",
    "compress_kept_blocks",
    "compress_linear",
    "count_parameters",
    "DistillCheckpoint",
    "DistillProgress",
    "distill_emulator",
    "distillation_loss",
    "emulator_skeleton",
    "extract_adapters",
    "find_original_tensors",
    "freeze_except_adapters",
    "gradot_compress",
    "install_switches",
    "warm_start_harmonizers",
    "kfac_statistics",
    "least_important",
    "lm_loss",
    "load_adapter_artifact",
    "load_emulator_artifact",
    "make_harmonizers",
    "middle_parameters",
    "model_fingerprint",
    "normalized_kd_loss",
    "plug_adapters",
    "rank_compress_modules",
    "read_plan",
    "reinforce_update",
    "remove_switches",
    "rewards",
    "rl_step",
    "run_until_block",
    "sample_keep_mask",
    "save_adapter_artifact",
    "save_emulator_artifact",
    "scaleot_plan",
    "select_components",
    "set_replace_mask",
    "stage1_step",
    "svd_gcs",
    "truncated_svd",
    "uniform_drop_plan",
    "uniform_keep_indices",
    "uniform_keep_layers",
]
