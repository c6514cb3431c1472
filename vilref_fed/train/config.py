"""Training settings: one dataclass, loadable from a TOML file, every default documented here.

A site's `train.toml` may set any subset of the fields below (top level, or under a [train] table);
unknown keys are refused, so a typo never silently falls back to a default.

    objective = "wscl"      # "wscl" (DESIGN §4) or "clip" (the plain CLIP baseline, no queues)
    delta = 1.0             # false-negative threshold on label cosine (> 1 removes nothing)
    gamma = 1.0             # negative weight exponent alpha = (1 - w)^gamma (0 = unweighted)
    lam = 1.0               # weight of the similarity-coupling term (0 = off)
    refill = true           # refill removed false negatives from the memory queue
    queue_size = 4096       # K entries per queue (image features, text features, labels)
    momentum = 0.995        # EMA factor of the momentum encoders
    num_labels = 19         # length of the multi-hot label vector (ontology v1 has 19 labels)
    optimizer = "adamw"     # "adamw", or "sgd" (momentum sgd_momentum; common for federated local steps)
    sgd_momentum = 0.9      # momentum of the "sgd" optimiser
    lr = 1e-4               # peak learning rate
    weight_decay = 0.001    # decoupled decay on weights only (not on norms, biases, logit scale)
    betas = [0.9, 0.98]     # AdamW betas (CLIP's for transformers)
    eps = 1e-6              # AdamW epsilon
    warmup_steps = 100      # linear warm-up over the first optimiser steps of the run
    schedule = "cosine"     # "cosine" (to min_lr_ratio * lr) or "constant" after warm-up
    min_lr_ratio = 0.0      # floor of the cosine, as a fraction of lr
    total_steps = 0         # schedule horizon in optimiser steps; 0 = each fit() call's own length
    epochs = 1              # work per fit() call when neither epochs nor max_steps is passed
    max_steps = 0           # if > 0: work per fit() call in optimiser steps (overrides epochs)
    batch_size = 32         # pairs per process per micro-batch (global batch = x world size)
    grad_accum = 1          # micro-batches per optimiser step
    grad_clip = 1.0         # max global gradient norm (0 = off)
    amp = true              # mixed precision, on CUDA only (ignored on CPU)
    amp_dtype = "bfloat16"  # "bfloat16" or "float16" (float16 uses a gradient scaler)
    drop_last = true        # drop the incomplete last global batch of an epoch
    num_workers = 0         # DataLoader worker processes
    seed = 0                # data order, initialisation and dropout all derive from it
    device = "auto"         # "auto" (CUDA if present), "cpu", "cuda", "cuda:1", ...
    log_every = 10          # optimiser steps between progress/metric refreshes
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    """Local training settings (see the module docstring for each field's meaning and default)."""

    objective: str = "wscl"
    delta: float = 1.0
    gamma: float = 1.0
    lam: float = 1.0
    refill: bool = True
    queue_size: int = 4096
    momentum: float = 0.995
    num_labels: int = 19
    optimizer: str = "adamw"
    sgd_momentum: float = 0.9
    lr: float = 1e-4
    weight_decay: float = 0.001
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    total_steps: int = 0
    epochs: int = 1
    max_steps: int = 0
    batch_size: int = 32
    grad_accum: int = 1
    grad_clip: float = 1.0
    amp: bool = True
    amp_dtype: str = "bfloat16"
    drop_last: bool = True
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    log_every: int = 10

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"train config: {message}")

        need(
            self.objective in ("wscl", "clip"), f"objective must be 'wscl' or 'clip', not {self.objective!r}"
        )
        need(self.delta > 0, f"delta must be > 0 (got {self.delta})")
        need(self.gamma >= 0, f"gamma must be >= 0 (got {self.gamma})")
        need(self.lam >= 0, f"lam must be >= 0 (got {self.lam})")
        need(self.queue_size >= 1, f"queue_size must be >= 1 (got {self.queue_size})")
        need(0.0 <= self.momentum <= 1.0, f"momentum must be in [0, 1] (got {self.momentum})")
        need(self.num_labels >= 1, f"num_labels must be >= 1 (got {self.num_labels})")
        need(
            self.optimizer in ("adamw", "sgd"), f"optimizer must be 'adamw' or 'sgd', not {self.optimizer!r}"
        )
        need(0 <= self.sgd_momentum < 1, f"sgd_momentum must be in [0, 1) (got {self.sgd_momentum})")
        need(self.lr > 0, f"lr must be > 0 (got {self.lr})")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0 (got {self.weight_decay})")
        need(all(0 <= b < 1 for b in self.betas), f"betas must be in [0, 1) (got {list(self.betas)})")
        need(self.eps > 0, f"eps must be > 0 (got {self.eps})")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        need(
            self.schedule in ("cosine", "constant"),
            f"schedule must be 'cosine' or 'constant', not {self.schedule!r}",
        )
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        need(self.total_steps >= 0, f"total_steps must be >= 0 (got {self.total_steps})")
        need(self.epochs >= 0, f"epochs must be >= 0 (got {self.epochs})")
        need(self.max_steps >= 0, f"max_steps must be >= 0 (got {self.max_steps})")
        need(
            self.batch_size >= 2,
            f"batch_size must be >= 2: a contrastive loss needs negatives (got {self.batch_size})",
        )
        need(self.grad_accum >= 1, f"grad_accum must be >= 1 (got {self.grad_accum})")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (got {self.grad_clip})")
        need(
            self.amp_dtype in ("bfloat16", "float16"),
            f"amp_dtype must be 'bfloat16' or 'float16', not {self.amp_dtype!r}",
        )
        need(self.num_workers >= 0, f"num_workers must be >= 0 (got {self.num_workers})")
        need(self.log_every >= 1, f"log_every must be >= 1 (got {self.log_every})")

    # --- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"train config: unknown keys {unknown}; known keys: {sorted(known)}")
        clean: dict[str, Any] = {}
        for key, value in data.items():
            default = getattr(cls, key, None)
            if key == "betas":
                if not isinstance(value, list | tuple) or len(value) != 2:
                    raise ValueError("train config: betas must be a list of two numbers")
                clean[key] = (float(value[0]), float(value[1]))
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"train config: {key} must be true or false (got {value!r})")
                clean[key] = value
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"train config: {key} must be an integer (got {value!r})")
                clean[key] = value
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"train config: {key} must be a number (got {value!r})")
                clean[key] = float(value)
            else:
                if not isinstance(value, str):
                    raise ValueError(f"train config: {key} must be a string (got {value!r})")
                clean[key] = value
        return cls(**clean)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """Read a TOML file; its keys may sit at the top level or under a [train] table."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"train config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"train config file {path} is not valid TOML ({exc})") from None
        if "train" in data and isinstance(data["train"], dict):
            data = data["train"]
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with some fields changed (e.g. CLI overrides)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def to_toml(self) -> str:
        """The settings as a TOML [train] table (what `vilref-client train --print-config` writes)."""
        lines = ["[train]"]
        for key, value in self.to_dict().items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = f'"{value}"'
            elif isinstance(value, list):
                text = "[" + ", ".join(repr(float(v)) for v in value) + "]"
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        return "\n".join(lines) + "\n"
