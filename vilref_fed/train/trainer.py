"""The local trainer: one hospital's training, used by the federated client and `vilref-client train`.

One optimiser step (per micro-batch, `grad_accum` of them):
  1. online forward -> image_features, text_features, logit_scale (the loss's argument names);
  2. under DDP, features and labels of all ranks are gathered, so the loss sees the global batch;
  3. loss = WSCL (with the memory queue as refill candidates) or CLIP; backward;
  4. the momentum encoders encode the same micro-batch (no grad);
then: clip, AdamW step, clamp the logit scale, momentum update, enqueue the momentum features
(BatchExpansion.enqueue gathers across ranks itself, so every rank keeps the same queue).

Exact resume: the data order is a pure function of (seed, epoch, position), the learning rate a
pure function of (step, plan), and the randomness inside a step (dropout, drop-connect) is seeded
from (seed, rank, step) in a forked RNG; a checkpoint stores the weights, optimiser, scaler,
queues, counters and the global RNG state (for datasets that augment with it).

Site state (`state_dir/site_state.pt`): everything above except the online weights. In federation
the online weights come from the server each round; the momentum encoders, queues, optimiser
moments and counters stay on the site and are never sent.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vilref_fed.logs import get_logger
from vilref_fed.model import ViLReFModel, unwrap
from vilref_fed.model.checkpoint import atomic_torch_save
from vilref_fed.train import distributed as D
from vilref_fed.train.config import TrainConfig
from vilref_fed.train.data import BatchPlan, check_item, collate_pairs
from vilref_fed.train.optim import build_optimizer, lr_at, set_lr
from vilref_fed.train.progress import TrainProgress
from vilref_fed.train.rng import capture_rng, restore_rng

log = get_logger("train")

SITE_STATE_FILE = "site_state.pt"
TRAINER_FORMAT = "vilref-fed-trainer"
TRAINER_VERSION = 1
LOSS_KEYS = ("loss", "loss_i2t", "loss_t2i", "loss_couple")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            import os

            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"train config: unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"train config asks for device {spec!r} but no CUDA device is available; use 'auto'"
            )
        if device.index is None:  # DDP and autocast want an explicit index
            device = torch.device("cuda", torch.cuda.current_device())
    return device


class LocalTrainer:
    """Trains a ViLReFModel in place on a local dataset; see the module docstring for the step.

    Construction loads `state_dir/site_state.pt` when present (momentum encoders, queues,
    optimiser, counters); the online weights in `model` are left as given.
    """

    def __init__(
        self, model: torch.nn.Module, config: TrainConfig, state_dir: Path | str | None = None
    ) -> None:
        from vilref_fed.memory import BatchExpansion
        from vilref_fed.objectives import ClipLoss, WSCLLoss

        self.config = config
        self.model: ViLReFModel = unwrap(model)
        if not isinstance(self.model, ViLReFModel):
            raise TypeError("LocalTrainer trains a ViLReFModel (build it with vilref_fed.model.build_model)")
        self.device = resolve_device(config.device)
        self.model.to(self.device)
        self.world = D.world_size()
        self.rank = D.rank()
        self.state_dir = Path(state_dir) if state_dir is not None else None

        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        if D.is_distributed():
            if self.device.type == "cuda" and any(
                isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules()
            ):
                # One batch statistic over the global batch, as a single process would compute.
                torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )  # the constructor broadcasts rank 0's weights: build the momentum copy after it

        self.uses_queue = config.objective == "wscl" and config.refill
        self.memory: BatchExpansion | None = None
        if self.uses_queue:
            self.memory = BatchExpansion(
                self.model,
                queue_size=config.queue_size,
                embed_dim=self.model.config.embed_dim,
                num_labels=config.num_labels,
                momentum=config.momentum,
            ).to(self.device)
        if config.objective == "wscl":
            self.loss_fn: torch.nn.Module = WSCLLoss(
                delta=config.delta, gamma=config.gamma, lam=config.lam, refill=config.refill
            )
        else:
            self.loss_fn = ClipLoss()

        self.optimizer = build_optimizer(self.model, config)
        self.amp_enabled = bool(config.amp and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if config.amp_dtype == "bfloat16" else torch.float16
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_enabled and self.amp_dtype == torch.float16
        )

        self.global_step = 0  # optimiser steps taken
        self.epoch = 0  # data position: epoch ...
        self.batch_in_epoch = 0  # ... and next micro-batch within it
        self.samples_seen = 0  # global pairs consumed
        self.plan_start = 0
        self.plan_end = 0
        self.dataset_len = -1

        if self.state_dir is not None and (self.state_dir / SITE_STATE_FILE).is_file():
            self.load_site_state()

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------
    def _plan(self, dataset: Dataset) -> BatchPlan:
        n = len(dataset)
        if n == 0:
            raise ValueError("the training dataset is empty: ingest images with reports first")
        check_item(dataset[0], self.model.config.image_size, self.config.num_labels)
        plan = BatchPlan(n, self.config.batch_size, self.world, self.config.drop_last, self.config.seed)
        if plan.batches_per_epoch() == 0:
            raise ValueError(
                f"the training dataset has {n} pairs: too few for a contrastive batch across {self.world} "
                "process(es); at least 2 pairs per process are needed"
            )
        if self.dataset_len not in (-1, n) and self.batch_in_epoch:
            # The dataset changed since the saved position: start the next epoch cleanly.
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.dataset_len = n
        return plan

    def _batches(self, dataset: Dataset, plan: BatchPlan):
        collate = collate_pairs(self.model)
        while True:
            index_lists = plan.epoch_batches(self.epoch, self.rank)
            remaining = index_lists[self.batch_in_epoch :]
            if remaining:
                loader = DataLoader(
                    dataset,
                    batch_sampler=remaining,
                    collate_fn=collate,
                    num_workers=self.config.num_workers,
                    pin_memory=self.device.type == "cuda",
                    # Its own generator: creating a loader must not consume the global RNG, or a
                    # resumed run (which creates one mid-epoch) would drift from an uninterrupted one.
                    generator=torch.Generator().manual_seed(self.config.seed * 7_919 + self.epoch),
                )
                for batch in loader:
                    self.batch_in_epoch += 1
                    yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _steps_for(self, plan: BatchPlan, epochs: int | None, max_steps: int | None) -> int:
        """Optimiser steps for `max_steps`, else `epochs`, else the config's max_steps or epochs."""
        if max_steps:
            return int(max_steps)
        if epochs is None:
            if self.config.max_steps:
                return self.config.max_steps
            epochs = self.config.epochs
        if not epochs:
            return 0
        return max(1, (int(epochs) * plan.batches_per_epoch()) // self.config.grad_accum)

    def _rng_scope(self):
        """Randomness inside a step depends only on (seed, rank, step): resume is exact."""
        devices = [self.device] if self.device.type == "cuda" else []
        scope = torch.random.fork_rng(devices=devices)
        seed = (int(self.config.seed) * 1_000_003 + self.rank * 7_919 + self.global_step) % (2**63 - 1)
        return scope, seed

    def _autocast(self):
        if self.amp_enabled:
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def fit(
        self,
        dataset: Dataset,
        epochs: int | None = None,
        max_steps: int | None = None,
        progress: bool = True,
        checkpoint_path: Path | str | None = None,
        checkpoint_every: int = 0,
    ) -> dict[str, float]:
        """Train for `max_steps` optimiser steps, or `epochs` epochs, or the config's amount
        (config.max_steps, else config.epochs). Returns scalar metrics only.

        The learning-rate plan spans `config.total_steps` steps from step 0 when that is set.
        Otherwise a call that finds no unfinished plan starts one over its own steps (so each
        federated round, one fit call, gets its own warm-restarted cosine that ends with the
        round), and a call that finds an unfinished plan (a run resumed from a checkpoint written
        mid-way, see `checkpoint_path`) continues it, so the resumed run ends exactly where the
        uninterrupted one would have. With `checkpoint_path`, a resume checkpoint is written
        every `checkpoint_every` steps and at the end.
        """
        plan = self._plan(dataset)
        steps = self._steps_for(plan, epochs, max_steps)
        if self.config.total_steps:
            self.plan_start, self.plan_end = 0, self.config.total_steps
        elif self.plan_end <= self.global_step:
            self.plan_start, self.plan_end = self.global_step, self.global_step + steps
        target = self.global_step + steps
        sums = {k: torch.zeros((), device=self.device) for k in (*LOSS_KEYS, "false_negatives", "refilled")}
        last_loss = float("nan")
        samples = 0
        start_step = self.global_step
        t0 = time.perf_counter()
        batches = self._batches(dataset, plan)
        self.model.train()
        with TrainProgress(steps, enabled=progress and self.rank == 0) as bar:
            while self.global_step < target:
                step_losses, step_samples = self._train_step(batches)
                for k, v in step_losses.items():
                    sums[k] += v
                samples += step_samples
                done = self.global_step - start_step
                if checkpoint_path is not None and checkpoint_every and done % checkpoint_every == 0:
                    self.save_checkpoint(checkpoint_path)
                if done % self.config.log_every == 0 or self.global_step == target:
                    last_loss = float(step_losses["loss"])
                    bar.update(
                        done, loss=last_loss, samples_per_s=samples / max(time.perf_counter() - t0, 1e-9)
                    )
        elapsed = time.perf_counter() - t0
        done = self.global_step - start_step
        metrics: dict[str, float] = {k: float(v) / max(done, 1) for k, v in sums.items()}
        if not self.uses_queue:
            metrics.pop("refilled")
        if self.config.objective == "clip":
            metrics.pop("false_negatives")
        metrics.update(
            last_loss=last_loss,
            steps=float(done),
            samples=float(samples),
            seconds=elapsed,
            samples_per_s=samples / elapsed if elapsed > 0 else 0.0,
            lr=float(self.optimizer.param_groups[0]["lr"]),
            logit_scale=float(self.model.kappa().detach()),
            global_step=float(self.global_step),
            epoch=float(self.epoch + self.batch_in_epoch / max(plan.batches_per_epoch(), 1)),
        )
        if checkpoint_path is not None:
            self.save_checkpoint(checkpoint_path)
        if self.state_dir is not None:
            self.save_site_state()
        return metrics

    def _train_step(self, batches) -> tuple[dict[str, torch.Tensor], int]:
        cfg = self.config
        set_lr(self.optimizer, lr_at(self.global_step, cfg, self.plan_start, self.plan_end))
        forward = self.ddp if self.ddp is not None else self.model
        queue_kwargs = self.memory.queue_kwargs() if self.memory is not None else {}
        pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        totals = {k: torch.zeros((), device=self.device) for k in (*LOSS_KEYS, "false_negatives", "refilled")}
        samples = 0
        scope, seed = self._rng_scope()
        with scope:
            torch.manual_seed(seed)
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
                sync = self.ddp is None or micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if sync else self.ddp.no_sync():
                    with self._autocast():
                        out = forward(batch["images"], batch["input_ids"], batch["attention_mask"])
                    image = D.gather_with_grad(out["image_features"].float())
                    text = D.gather_with_grad(out["text_features"].float())
                    labels = D.gather_no_grad(batch["labels"])
                    scale = out["logit_scale"].float()
                    if self.rank != 0:
                        # Every rank computes the full global loss; only rank 0 may contribute the
                        # logit-scale gradient, or DDP's sum would count it world-size times.
                        scale = scale.detach() + 0.0 * scale
                    losses = self.loss_fn(image, text, scale, labels, **queue_kwargs)
                    loss = losses["loss"] * (self.world / cfg.grad_accum)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"the training loss became {float(loss.detach())} at step {self.global_step}; "
                            "lower lr or check the data (no weights were updated by this step)"
                        )
                    self.scaler.scale(loss).backward()
                if self.memory is not None:
                    with torch.no_grad(), self._autocast():
                        m_image, m_text = self.memory.encode(
                            batch["images"], batch["input_ids"], batch["attention_mask"]
                        )
                    pending.append((m_image.float(), m_text.float(), batch["labels"]))
                for k in LOSS_KEYS:
                    totals[k] += losses[k].detach() / cfg.grad_accum
                stats = getattr(self.loss_fn, "last_stats", {}) or {}
                for k in ("false_negatives", "refilled"):
                    if k in stats:
                        totals[k] += stats[k].detach().float() / cfg.grad_accum
                samples += image.shape[0]
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.model.logit_scale, torch.nn.Parameter):
            self.model.clamp_logit_scale_()
        if self.memory is not None:
            self.memory.momentum_update(self.model)
            for m_image, m_text, labels in pending:
                self.memory.enqueue(m_image, m_text, labels)
        self.global_step += 1
        self.samples_seen += samples
        return totals, samples

    @torch.no_grad()
    def evaluate(self, dataset: Dataset, batch_size: int | None = None) -> dict[str, float]:
        """Retrieval metrics of the online model on `dataset` (see train.metrics)."""
        from vilref_fed.train.metrics import encode_dataset, retrieval_metrics

        enc = encode_dataset(self.model, dataset, batch_size or self.config.batch_size, self.device)
        return retrieval_metrics(enc["image"], enc["text"], enc["labels"])

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    def state_dict(self, include_model: bool = True) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": TRAINER_FORMAT,
            "version": TRAINER_VERSION,
            "model_config": self.model.config.to_dict(),
            "train_config": self.config.to_dict(),
            "counters": {
                "global_step": self.global_step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "samples_seen": self.samples_seen,
                "plan_start": self.plan_start,
                "plan_end": self.plan_end,
                "dataset_len": self.dataset_len,
            },
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "memory": self.memory.site_state_dict() if self.memory is not None else {},
            "rng": capture_rng(),
        }
        if include_model:
            state["model"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any], source: str = "trainer state") -> None:
        if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
            raise ValueError(f"{source} is not a vilref-fed trainer state")
        if state["model_config"] != self.model.config.to_dict():
            raise ValueError(
                f"{source} was saved for model config {state['model_config'].get('name')!r}, this run uses "
                f"{self.model.config.name!r}; use the same model or remove the saved state to start afresh"
            )
        if "model" in state:
            self.model.load_state_dict(state["model"])
        if self.memory is not None:
            if state.get("memory"):
                self.memory.load_site_state_dict(state["memory"])
            else:
                log.info(
                    "no momentum encoders/queues in %s (it was a CLIP run): starting them afresh", source
                )
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:
            raise ValueError(f"{source}: the optimiser state does not fit this model ({exc})") from None
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        c = state["counters"]
        self.global_step = int(c["global_step"])
        self.epoch = int(c["epoch"])
        self.batch_in_epoch = int(c["batch_in_epoch"])
        self.samples_seen = int(c["samples_seen"])
        self.plan_start = int(c["plan_start"])
        self.plan_end = int(c["plan_end"])
        self.dataset_len = int(c["dataset_len"])
        restore_rng(state["rng"])

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path} is not a readable trainer state ({type(exc).__name__})") from None

    def save_checkpoint(self, path: str | Path) -> Path:
        """Everything needed to resume exactly, online weights included (rank 0 writes)."""
        path = Path(path)
        state = self.state_dict(include_model=True)
        if self.rank == 0:
            atomic_torch_save(state, path)
        D.barrier()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"trainer checkpoint {path} does not exist")
        self.load_state_dict(self._read(path), source=str(path))

    def save_site_state(self) -> Path:
        """Write state_dir/site_state.pt: everything but the online weights (never sent anywhere)."""
        if self.state_dir is None:
            raise ValueError("this trainer has no state_dir to save its site state in")
        path = self.state_dir / SITE_STATE_FILE
        state = self.state_dict(include_model=False)
        if self.rank == 0:
            atomic_torch_save(state, path)
        D.barrier()
        return path

    def load_site_state(self) -> None:
        if self.state_dir is None:
            raise ValueError("this trainer has no state_dir to load site state from")
        path = self.state_dir / SITE_STATE_FILE
        self.load_state_dict(self._read(path), source=str(path))

    def reset_optimizer(self) -> None:
        """Fresh AdamW moments (e.g. when a federated round replaced the weights wholesale)."""
        self.optimizer = build_optimizer(self.model, self.config)
