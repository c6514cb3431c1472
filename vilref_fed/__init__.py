"""vilref-fed: federated, on-premise pre-training of the ViLReF retinal vision-language model.

This package is role-agnostic: it knows nothing of Flower, of the coordinator or of the hospital CLI.
Importing it first pins the offline environment, so that transformers and huggingface_hub never try
the network (they read these variables at import time).
"""

from vilref_fed.offline import apply_offline_env

__version__ = "0.1.0"

apply_offline_env()

__all__ = ["__version__"]
