"""Batch expansion: momentum encoders and dynamic memory queues that refill removed false negatives."""

from vilref_fed.memory.batch_expansion import BatchExpansion
from vilref_fed.memory.distributed import concat_all_gather, distributed_world_size

__all__ = ["BatchExpansion", "concat_all_gather", "distributed_world_size"]
