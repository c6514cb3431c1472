"""Training objectives: the CLIP baseline, label similarity, and WSCL (DESIGN §4).

Imports nothing from `train/`: the trainer calls these with the model's output dict
(`image_features`, `text_features`, `logit_scale`) plus labels and the memory queue.
"""

from vilref_fed.objectives.clip import ClipLoss, clip_loss
from vilref_fed.objectives.label_similarity import is_labelled, label_similarity
from vilref_fed.objectives.wscl import (
    FN_TOLERANCE,
    WSCLLoss,
    false_negative_mask,
    false_negative_threshold,
    refill_selection,
    wscl_from_similarity,
)

__all__ = [
    "FN_TOLERANCE",
    "ClipLoss",
    "WSCLLoss",
    "clip_loss",
    "false_negative_mask",
    "false_negative_threshold",
    "is_labelled",
    "label_similarity",
    "refill_selection",
    "wscl_from_similarity",
]
