"""One federated round at a hospital: check, load the global weights, train, evaluate, reply.

Order matters:
1. Refuse early, with a message the coordinator records, when the site cannot take part honestly:
   a different toolkit version, model configuration or ontology (the consortium's label list and
   the hash the site's labels were extracted with), or no training data.
2. Global weights into the online towers, then the LocalTrainer loads this run's site state
   (momentum encoders, queues, optimiser moments) from the site directory: site state never leaves.
3. Local training (WSCL + batch expansion by default), with the FedProx proximal term when the
   strategy sends `proximal-mu`.
4. Zero-shot evaluation on the site's validation split inside the same reply (no separate evaluate
   message: each message costs a full Flower cycle, DESIGN.md §5).
5. The reply: exactly the shared parameters and scalar metrics (server/protocol.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from client.site_state import (
    SITE_LOCAL_TRAIN_KEYS,
    SITE_TRAIN_TOML,
    append_federation_log,
    federation_state_dir,
    label_ontology_hashes,
)
from server import protocol
from server.protocol import SiteRefusal


def _short(h: str) -> str:
    return (h or "none")[:12]


def check_compatibility(site: Any, cfg: dict[str, Any]) -> None:
    """Raise SiteRefusal when this site must not train in this run, saying what differs."""
    import vilref_fed
    from vilref_fed.model import load_model_config
    from vilref_fed.ontology import load_ontology

    theirs = str(cfg.get(protocol.TOOLKIT_VERSION, ""))
    if theirs and not protocol.compatible_versions(theirs, vilref_fed.__version__):
        raise SiteRefusal(
            f"toolkit version differs: the coordinator runs vilref-fed {theirs}, "
            f"this site {vilref_fed.__version__}; install the consortium's version"
        )
    name = str(cfg.get(protocol.MODEL_NAME, ""))
    try:
        mine = protocol.config_hash(load_model_config(name).to_dict())
    except (ValueError, FileNotFoundError, OSError):
        raise SiteRefusal(f"model config {name!r} is not known to this site's vilref-fed") from None
    expected = str(cfg.get(protocol.MODEL_CONFIG_HASH, ""))
    if expected and mine != expected:
        raise SiteRefusal(
            f"model config {name!r} differs: site hash {_short(mine)}, consortium hash {_short(expected)}; "
            "install the consortium's vilref-fed version"
        )
    onto = str(cfg.get(protocol.ONTOLOGY_HASH, ""))
    installed = load_ontology().hash
    if onto and installed != onto:
        raise SiteRefusal(
            f"ontology hash differs: this site's ontology is {_short(installed)}, the consortium's is "
            f"{_short(onto)}; install the consortium's ontology version"
        )
    labelled = label_ontology_hashes(site.engine)
    stale = sorted(h for h in labelled if onto and h != onto)
    if stale:
        raise SiteRefusal(
            f"ontology hash differs: this site's labels were extracted with ontology {_short(stale[0])}, the "
            f"consortium uses {_short(onto)}; re-ingest the reports with the consortium's vilref-fed version"
        )


def train_config(site_dir: Path, cfg: dict[str, Any]) -> Any:
    """TrainConfig: the coordinator's [train] settings, with the site's own hardware settings."""
    import tomllib

    from vilref_fed.train import TrainConfig

    values: dict[str, Any] = {}
    local = site_dir / SITE_TRAIN_TOML
    if local.is_file():
        try:
            data = tomllib.loads(local.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise SiteRefusal(f"{SITE_TRAIN_TOML} of this site is not valid TOML ({err})") from None
        data = data.get("train", data)
        values.update({k: v for k, v in data.items() if k in SITE_LOCAL_TRAIN_KEYS})
    for k, v in cfg.items():
        if k.startswith(protocol.TRAIN_PREFIX):
            key = k[len(protocol.TRAIN_PREFIX) :]
            if key in SITE_LOCAL_TRAIN_KEYS and key in values:
                continue
            values[key] = v
    values.setdefault("seed", int(cfg.get(protocol.SEED, 0)))
    try:
        return TrainConfig.from_dict(values)
    except ValueError as err:
        raise SiteRefusal(f"training settings rejected: {err}") from None


@contextlib.contextmanager
def proximal_term(model: Any, mu: float, grad_accum: int) -> Iterator[None]:
    """FedProx: add mu * (w - w_global) to every trainable parameter's gradient, i.e. the gradient
    of (mu/2) ||w - w_global||^2, without touching the trainer (a tensor hook per parameter)."""
    if mu <= 0:
        yield
        return
    import torch

    handles = []
    scale = mu / max(int(grad_accum), 1)
    for p in model.parameters():
        if not p.requires_grad:
            continue
        anchor = p.detach().clone()

        def hook(grad: torch.Tensor, p: torch.Tensor = p, anchor: torch.Tensor = anchor) -> torch.Tensor:
            return grad + scale * (p.detach() - anchor)

        handles.append(p.register_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _zero_shot(model: Any, dataset: Any, lang: str) -> dict[str, float]:
    """Macro AUC and mAP of zero-shot classification with the ontology's prompts on the val split
    (labels with fewer than 2 positives there are left out; NaN results are not sent)."""
    from vilref_fed.eval import evaluate_zeroshot
    from vilref_fed.ontology import load_ontology

    res = evaluate_zeroshot(model, dataset, load_ontology(), lang, min_positives=2)
    out: dict[str, float] = {}
    for src, dst in (("macro_auc", "val_macro_auc"), ("macro_ap", "val_map")):
        v = res.get(src)
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[dst] = float(v)
    return out


def run_round(site_dir: Path, arrays: Any, cfg: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """Train one round; returns (shared state dict, scalar metrics). Raises SiteRefusal to decline."""
    if cfg.get("task") == "head":  # federated supervised head (client/fed_head.py, docs/privacy.md)
        from client.fed_head import run_head_round

        return run_head_round(site_dir, arrays, cfg)
    import torch

    from vilref_fed.data.site import SiteError, open_site
    from vilref_fed.data.site_dataset import SiteDataset
    from vilref_fed.model import build_model, load_shared_state_dict, shared_state_dict
    from vilref_fed.train import LocalTrainer

    t_setup = time.perf_counter()
    round_no = int(cfg.get(protocol.ROUND, 0))
    run_uid = str(cfg.get(protocol.RUN_UID, ""))
    try:
        site = open_site(site_dir)
    except SiteError as err:
        raise SiteRefusal(f"site directory cannot be opened: {err}") from None
    logs_dir = site.logs_dir
    append_federation_log(logs_dir, f"run {run_uid} round {round_no}: received the global model")
    try:
        check_compatibility(site, cfg)
        tcfg = train_config(site_dir, cfg)
        model = build_model(str(cfg[protocol.MODEL_NAME]), pretrained=False)
        expected = cfg.get(protocol.PARAM_SPEC_HASH)
        if expected and protocol.spec_hash(protocol.param_spec(shared_state_dict(model))) != expected:
            raise SiteRefusal(
                "the shared parameters of this site's model (names, shapes, dtypes) differ from the "
                "consortium's; install the consortium's vilref-fed version"
            )
        try:
            load_shared_state_dict(model, arrays)
        except ValueError as err:
            raise SiteRefusal(f"global weights do not fit this site's model: {err}") from None
        mc = model.config
        train_ds = SiteDataset(
            site_dir, split="train", image_size=mc.image_size, mean=mc.image_mean, std=mc.image_std
        )
        if len(train_ds) < tcfg.batch_size:
            raise SiteRefusal(
                f"only {len(train_ds)} training pairs, fewer than the batch size {tcfg.batch_size}; "
                "ingest more data or lower batch_size in the site's train.toml"
            )
        state_dir = federation_state_dir(site.state_dir, run_uid)
        append_federation_log(logs_dir, f"run {run_uid} round {round_no}: training on {len(train_ds)} pairs")
        trainer = LocalTrainer(model, tcfg, state_dir=state_dir)
        setup_s = time.perf_counter() - t_setup
        t0 = time.perf_counter()
        epochs = int(cfg.get(protocol.LOCAL_EPOCHS, 1))
        steps = int(cfg.get(protocol.LOCAL_STEPS, 0))
        with proximal_term(model, float(cfg.get(protocol.PROXIMAL_MU, 0.0)), tcfg.grad_accum):
            fit = trainer.fit(
                train_ds, epochs=None if steps > 0 else epochs, max_steps=steps or None, progress=False
            )
        train_s = time.perf_counter() - t0
        metrics: dict[str, float] = {
            protocol.NUM_EXAMPLES: int(len(train_ds)),
            "train_loss": float(fit.get("loss", math.nan)),
            "train_steps": float(fit.get("steps", 0.0)),
            "setup_s": float(setup_s),
            "train_s": float(train_s),
        }
        if bool(cfg.get(protocol.EVALUATE, False)):
            t1 = time.perf_counter()
            val_ds = SiteDataset(
                site_dir, split="val", image_size=mc.image_size, mean=mc.image_mean, std=mc.image_std
            )
            if len(val_ds) > 0:
                model.eval()
                with torch.no_grad():
                    metrics.update(_zero_shot(model, val_ds, str(cfg.get(protocol.PROMPT_LANGUAGE, "en"))))
                metrics["val_examples"] = int(len(val_ds))
            metrics["eval_s"] = float(time.perf_counter() - t1)
        sd = OrderedDict(sorted(shared_state_dict(model).items()))
        append_federation_log(
            logs_dir,
            f"run {run_uid} round {round_no}: done in {train_s:.1f} s, loss {metrics['train_loss']:.4f}"
            + (f", val AUC {metrics['val_macro_auc']:.3f}" if "val_macro_auc" in metrics else ""),
        )
        return sd, metrics
    except SiteRefusal as err:
        append_federation_log(logs_dir, f"run {run_uid} round {round_no}: refused: {err}")
        raise
    finally:
        site.close()
