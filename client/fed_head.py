"""One round of a federated supervised-head run (`task = "head"`) at a hospital.

The same checks as pre-training (toolkit version, model config, ontology) come first; then the site
trains the head on its report-extracted labels with `vilref_fed.train.head.train_head_round`, with
patient-level DP-SGD (Opacus) when the coordinator's instruction carries `dp.*` settings. The site's
privacy accountant persists in its state directory for the run, so the epsilon it reports is its
cumulative spend; a round that would exceed its budget is refused with a message saying so.
Only the head (and the image encoder arrays it was sent) and scalar metrics go back.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from client.fed_train import check_compatibility
from client.site_state import append_federation_log, federation_state_dir
from server import protocol
from server.head_task import DP_PREFIX, TOTAL_ROUNDS
from server.protocol import SiteRefusal

_HEAD_FIELDS = ("mode", "feature", "epochs", "batch_size", "lr", "momentum", "weight_decay",
                "max_images_per_patient")


def head_config(cfg: dict[str, Any]) -> Any:
    """HeadConfig from the instruction: [train] head settings, run.local_epochs, dp.* settings."""
    from vilref_fed.train.head import HeadConfig
    from vilref_fed.train.privacy import DPSGDConfig

    values: dict[str, Any] = {}
    for k, v in cfg.items():
        if k.startswith(protocol.TRAIN_PREFIX) and k[len(protocol.TRAIN_PREFIX):] in _HEAD_FIELDS:
            values[k[len(protocol.TRAIN_PREFIX):]] = v
    if "epochs" not in values:
        values["epochs"] = max(1, int(cfg.get(protocol.LOCAL_EPOCHS, 1)))
    values["seed"] = int(cfg.get(protocol.SEED, 0))
    dp = None
    if any(k.startswith(DP_PREFIX) for k in cfg):
        dp = DPSGDConfig(
            epsilon=cfg.get(DP_PREFIX + "epsilon"),
            delta=cfg.get(DP_PREFIX + "delta"),
            noise_multiplier=cfg.get(DP_PREFIX + "noise-multiplier"),
            max_grad_norm=float(cfg.get(DP_PREFIX + "max-grad-norm", 1.0)),
        )
    try:
        hc = HeadConfig(**values, dp=dp)
        hc.validate()
    except (TypeError, ValueError) as err:
        raise SiteRefusal(f"head settings rejected: {err}") from None
    return hc


def run_head_round(site_dir: Path, arrays: Any, cfg: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """Train the head one round; returns (arrays, scalar metrics). Raises SiteRefusal to decline."""
    import torch

    from vilref_fed.data.site import SiteError, open_site
    from vilref_fed.data.site_dataset import SiteDataset
    from vilref_fed.model import build_model
    from vilref_fed.train.head import train_head_round
    from vilref_fed.train.privacy import PrivacyBudgetExhausted, PrivacyGuardError

    round_no = int(cfg.get(protocol.ROUND, 0))
    run_uid = str(cfg.get(protocol.RUN_UID, ""))
    try:
        site = open_site(site_dir)
    except SiteError as err:
        raise SiteRefusal(f"site directory cannot be opened: {err}") from None
    logs_dir = site.logs_dir
    try:
        check_compatibility(site, cfg)
        hc = head_config(cfg)
        torch.manual_seed(hc.seed)
        model = build_model(str(cfg[protocol.MODEL_NAME]), pretrained=False)
        mc = model.config
        norm = dict(image_size=mc.image_size, mean=mc.image_mean, std=mc.image_std)
        train_ds = SiteDataset(site_dir, split="train", **norm)
        val_ds = SiteDataset(site_dir, split="val", **norm)
        if len(train_ds) == 0:
            raise SiteRefusal("no labelled training images at this site; ingest reports first")
        state_dir = federation_state_dir(site.state_dir, run_uid)
        append_federation_log(
            logs_dir, f"run {run_uid} round {round_no}: head training on {len(train_ds)} images"
            + (" with patient-level DP" if hc.dp is not None else "")
        )
        t0 = time.perf_counter()
        try:
            new_arrays, metrics = train_head_round(
                {k: torch.as_tensor(v) for k, v in arrays.items()}, model, train_ds, hc,
                num_labels=len(train_ds.label_ids), label_ids=train_ds.label_ids, val_set=val_ds,
                state_dir=state_dir, run_key=run_uid or "default",
                total_rounds=int(cfg.get(TOTAL_ROUNDS, 1)),
            )
        except PrivacyBudgetExhausted as err:
            raise SiteRefusal(f"privacy budget: {err}") from None
        except (PrivacyGuardError, ValueError) as err:
            raise SiteRefusal(f"head training refused: {err}") from None
        metrics["num-examples"] = int(metrics["num-examples"])
        metrics["train_s"] = float(time.perf_counter() - t0)
        append_federation_log(
            logs_dir,
            f"run {run_uid} round {round_no}: head done, loss {metrics['train_loss']:.4f}"
            + (f", epsilon {metrics['epsilon']:.3f}" if "epsilon" in metrics else ""),
        )
        return OrderedDict(sorted(new_arrays.items())), metrics
    except SiteRefusal as err:
        append_federation_log(logs_dir, f"run {run_uid} round {round_no}: refused: {err}")
        raise
    finally:
        site.close()
