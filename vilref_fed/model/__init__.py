"""The ViLReF dual encoder: towers, projections, logit scale, tokenizer, configs and checkpoints.

Public API: `build_model`, `ViLReFModel`, `load_model_config`, `list_model_configs`,
`shared_state_dict`, `load_shared_state_dict`, `save_checkpoint`, `load_checkpoint`.
"""

from vilref_fed.model.checkpoint import (
    load_checkpoint,
    load_shared_state_dict,
    save_checkpoint,
    shared_state_dict,
    unwrap,
)
from vilref_fed.model.config import (
    ModelConfig,
    TextConfig,
    VisionConfig,
    list_model_configs,
    load_model_config,
)
from vilref_fed.model.dual_encoder import TOWER_MODULES, ViLReFModel, build_model

__all__ = [
    "TOWER_MODULES",
    "ModelConfig",
    "TextConfig",
    "ViLReFModel",
    "VisionConfig",
    "build_model",
    "list_model_configs",
    "load_checkpoint",
    "load_model_config",
    "load_shared_state_dict",
    "save_checkpoint",
    "shared_state_dict",
    "unwrap",
]
