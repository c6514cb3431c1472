"""The local trainer (optimiser, schedule, AMP, DDP, exact-resume checkpoints) and its settings.

Public API: `TrainConfig`, `LocalTrainer`, `collate_pairs`, `retrieval_metrics`, `encode_dataset`.
"""

from vilref_fed.train.config import TrainConfig
from vilref_fed.train.data import BatchPlan, PairCollator, collate_pairs
from vilref_fed.train.metrics import encode_dataset, retrieval_metrics
from vilref_fed.train.trainer import SITE_STATE_FILE, LocalTrainer

__all__ = [
    "SITE_STATE_FILE",
    "BatchPlan",
    "LocalTrainer",
    "PairCollator",
    "TrainConfig",
    "collate_pairs",
    "encode_dataset",
    "retrieval_metrics",
]
