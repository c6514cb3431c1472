"""What differential privacy costs on synthetic hospitals: head AUC with and without DP at two epsilons.

Three non-IID synthetic hospitals (urban-dr, myopia-clinic, glaucoma-center). Each trains a linear
multi-label head on frozen image features (the `small` model's ImageNet EfficientNet-Lite0 tower,
through its fixed, seeded 256-d projection: fewer dimensions, less DP noise) with labels extracted
from its reports by the label extractor, and is scored against the image-level ground truth of its
held-out patients (macro AUC over labels with positives). Rows:
- local: each hospital alone; no DP, then patient-level DP-SGD (Opacus) at epsilon 8 and 1;
- federated: FedAvg of the heads over the three hospitals, each site under its own patient-level
  budget (epsilon per site for the whole run), scored on the pooled held-out patients;
- federated + site-level DP: the same FedAvg with clipping + Gaussian noise on each site's update
  (the only DP that pre-training can have), at two noise multipliers, with the epsilon per site.
DP noise is random by design, so each DP row is the mean and standard deviation over `--seeds` runs.

    .venv/bin/python bench/privacy_utility.py            # writes bench/results/privacy_utility.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vilref_fed  # noqa: E402,F401  (offline environment first)
from vilref_fed.data.folder_dataset import FolderPairDataset  # noqa: E402
from vilref_fed.data.synthetic import generate_site  # noqa: E402
from vilref_fed.model import build_model  # noqa: E402
from vilref_fed.privacy.accounting import site_level_epsilon  # noqa: E402
from vilref_fed.train.head import (  # noqa: E402
    FeatureTable,
    HeadConfig,
    MultiLabelHead,
    extract_features,
    multilabel_auc,
    train_head_on_features,
)
from vilref_fed.train.privacy import DPSGDConfig  # noqa: E402

PROFILES = ("urban-dr", "myopia-clinic", "glaucoma-center")


def auc_on(head: MultiLabelHead, table: FeatureTable, label_ids) -> float:
    with torch.no_grad():
        scores = torch.sigmoid(head(table.features))
    return float(multilabel_auc(table.labels, scores, label_ids)["macro_auc"])


def pooled(tables: list[FeatureTable]) -> FeatureTable:
    return FeatureTable(torch.cat([t.features for t in tables]), torch.cat([t.labels for t in tables]),
                        [k for t in tables for k in t.unit_keys], tables[0].unit)


def fedavg(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}


def site_dp_fedavg(global_sd, states, sigma: float, clip: float, gen: torch.Generator):
    """Site-level DP exactly as server/privacy.py does it: clip each update, equal-weight mean,
    Gaussian noise sigma*clip/m on the mean."""
    keys = list(global_sd)
    updates = []
    for s in states:
        u = torch.cat([(s[k] - global_sd[k]).flatten() for k in keys])
        updates.append(u * min(1.0, clip / max(float(u.norm()), 1e-12)))
    mean = torch.stack(updates).mean(0)
    mean = mean + torch.randn(mean.shape, generator=gen) * sigma * clip / len(states)
    out, i = {}, 0
    for k in keys:
        n = global_sd[k].numel()
        out[k] = global_sd[k] + mean[i:i + n].view_as(global_sd[k])
        i += n
    return out


def load_tables(data_dir: Path, feature: str) -> tuple[list[FeatureTable], list[FeatureTable], tuple]:
    """Per hospital: train features with report-extracted labels, val features with ground truth.
    Cached next to the generated hospital: the tower is frozen, so the features never change."""
    train, val, label_ids, model = [], [], (), None
    for profile in PROFILES:
        cache = data_dir / profile / f"features-{feature}.pt"
        if not cache.exists():
            if model is None:
                torch.manual_seed(0)
                model = build_model("small", pretrained=True)
            mc = model.config
            norm = (mc.image_size, tuple(mc.image_mean), tuple(mc.image_std))
            tr = FolderPairDataset(data_dir / profile, *norm, split="train", labels_from="extractor")
            va = FolderPairDataset(data_dir / profile, *norm, split="val")
            torch.save({"train": extract_features(model, tr, feature, 32),
                        "val": extract_features(model, va, feature, 32, target="truth"),
                        "label_ids": list(tr.label_ids)}, cache)
        saved = torch.load(cache, weights_only=False)
        train.append(saved["train"])
        val.append(saved["val"])
        label_ids = tuple(saved["label_ids"])
    return train, val, label_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=240, help="images per hospital")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40, help="local epochs (local rows)")
    ap.add_argument("--rounds", type=int, default=5, help="federated rounds")
    ap.add_argument("--round-epochs", type=int, default=8, help="local epochs per federated round")
    ap.add_argument("--data", type=Path, default=None, help="cache directory for the generated hospitals")
    ap.add_argument("--feature", default="embedding", choices=("backbone", "embedding"))
    ap.add_argument("--clip", type=float, default=0.1, help="per-patient clipping norm C")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "privacy_utility.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    data_dir = args.data or Path(tempfile.mkdtemp(prefix="vilref-privacy-bench-"))
    for k, profile in enumerate(PROFILES):
        d = data_dir / profile
        if not (d / "manifest.json").exists():
            generate_site(d, n=args.n, profile=profile, seed=100 + k)
    train, val, label_ids = load_tables(data_dir, args.feature)
    t_features = time.perf_counter() - t0
    n_labels = len(label_ids)
    delta = 1e-5
    base = dict(mode="frozen", batch_size=32, lr=0.5)

    def dp_cfg(eps: float | None, epochs: int) -> DPSGDConfig | None:
        return None if eps is None else DPSGDConfig(epsilon=eps, delta=delta, max_grad_norm=args.clip)

    rows = []
    # ---- local heads, each hospital alone
    for eps in (None, 8.0, 1.0):
        per_seed, eps_seen = [], []
        for seed in range(args.seeds if eps is not None else 1):
            aucs = []
            for tr, va in zip(train, val, strict=True):
                cfg = HeadConfig(**base, epochs=args.epochs, seed=seed, dp=dp_cfg(eps, args.epochs))
                res = train_head_on_features(tr, cfg, num_labels=n_labels)
                aucs.append(auc_on(res.head, va, label_ids))
                if eps is not None:
                    eps_seen.append(res.metrics["epsilon"])
            per_seed.append(statistics.mean(aucs))
        rows.append({"setting": "local (each hospital alone)", "dp": "none" if eps is None else "patient",
                     "epsilon": eps, "epsilon_reported_max": max(eps_seen) if eps_seen else None,
                     "macro_auc_mean": statistics.mean(per_seed),
                     "macro_auc_sd": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0})

    pooled_val = pooled(val)
    d = train[0].features.shape[1]

    # ---- federated heads, patient-level DP at every site
    for eps in (None, 8.0, 1.0):
        per_seed, eps_seen = [], []
        for seed in range(args.seeds if eps is not None else 1):
            torch.manual_seed(seed)
            global_sd = MultiLabelHead(d, n_labels).state_dict()
            acc_states: list[dict | None] = [None] * len(train)
            for _ in range(args.rounds):
                states = []
                for i, tr in enumerate(train):
                    head = MultiLabelHead(d, n_labels)
                    head.load_state_dict(global_sd)
                    cfg = HeadConfig(**base, epochs=args.round_epochs, seed=seed,
                                     dp=dp_cfg(eps, args.round_epochs))
                    res = train_head_on_features(tr, cfg, num_labels=n_labels, head=head,
                                                 accountant_state=acc_states[i],
                                                 planned_epochs=args.rounds * args.round_epochs)
                    acc_states[i] = res.accountant_state
                    states.append({k: v.detach().clone() for k, v in res.head.state_dict().items()})
                    if eps is not None:
                        eps_seen.append(res.metrics["epsilon"])
                global_sd = fedavg(states)
            head = MultiLabelHead(d, n_labels)
            head.load_state_dict(global_sd)
            per_seed.append(auc_on(head, pooled_val, label_ids))
        rows.append({"setting": f"federated FedAvg, 3 sites, {args.rounds} rounds",
                     "dp": "none" if eps is None else "patient (per site)",
                     "epsilon": eps, "epsilon_reported_max": max(eps_seen) if eps_seen else None,
                     "macro_auc_mean": statistics.mean(per_seed),
                     "macro_auc_sd": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0})

    # ---- federated heads, site-level DP (clip + noise on each site's update), no patient-level DP
    clip = 0.5
    for sigma in (0.3, 1.0):
        per_seed = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(10_000 + seed)
            global_sd = MultiLabelHead(d, n_labels).state_dict()
            for _ in range(args.rounds):
                states = []
                for tr in train:
                    head = MultiLabelHead(d, n_labels)
                    head.load_state_dict(global_sd)
                    cfg = HeadConfig(**base, epochs=args.round_epochs, seed=seed)
                    res = train_head_on_features(tr, cfg, num_labels=n_labels, head=head)
                    states.append({k: v.detach().clone() for k, v in res.head.state_dict().items()})
                global_sd = site_dp_fedavg(global_sd, states, sigma, clip, gen)
            head = MultiLabelHead(d, n_labels)
            head.load_state_dict(global_sd)
            per_seed.append(auc_on(head, pooled_val, label_ids))
        rows.append({"setting": f"federated FedAvg, 3 sites, {args.rounds} rounds",
                     "dp": f"site-level (sigma={sigma}, clip={clip})",
                     "epsilon": site_level_epsilon(sigma, args.rounds, delta), "epsilon_reported_max": None,
                     "macro_auc_mean": statistics.mean(per_seed), "macro_auc_sd": statistics.stdev(per_seed)})

    result = {
        "bench": "privacy_utility",
        "model": f"small (EfficientNet-Lite0 ImageNet tower, frozen; {args.feature} features)",
        "patient_clip": args.clip,
        "head": "linear, SGD lr 0.5 momentum 0.9, expected batch 32 patients",
        "hospitals": list(PROFILES),
        "images_per_hospital": args.n,
        "train_patients": [len(set(t.unit_keys)) for t in train],
        "val_images": [len(v.unit_keys) for v in val],
        "delta": delta,
        "seeds": args.seeds,
        "local_epochs": args.epochs,
        "rounds": args.rounds,
        "round_epochs": args.round_epochs,
        "rows": rows,
        "feature_extraction_s": round(t_features, 1),
        "total_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
