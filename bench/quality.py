"""The quality table: does the product learn, and does WSCL + batch expansion beat the CLIP loss?

Three non-IID synthetic hospitals (urban-dr in English, myopia-clinic in Chinese, glaucoma-center in
English) and a held-out test set drawn from all three (other patients: generated with other seeds).
Every row trains the same model (`tiny` by default) for the same number of steps with the same batch
size, learning rate and seeds, then is scored zero-shot on the pooled held-out images against the
generator's truth (macro AUC over labels with >= 5 positives; prompts in English and Chinese, since
the consortium reports in both). Rows:

- centralised_wscl   all three hospitals pooled, WSCL + batch expansion (the paper's objective)
- centralised_clip   all three hospitals pooled, plain CLIP loss
- site_alone_<site>  one hospital's data only, WSCL + batch expansion
- federated_wscl     the same three hospitals federated (FedAvg over Flower): provided by the
                     federation bench through a hook, see `federated_hook` below; skipped until then.

Training labels (used by WSCL only) are what the product would have: the label extractor's reading
of each report (`--labels extractor`); `--labels truth` trains WSCL on the drawn truth instead.
For each seed s the hospitals are generated with seed 1000 + s and the model/batch order is seeded
with s, so rows are paired per seed; the JSON holds the per-seed values, the mean, the standard
deviation, and the paired WSCL - CLIP differences.

    .venv/bin/python bench/quality.py                       # full run (see docs/benchmarks.md)
    .venv/bin/python bench/quality.py --steps 20 --n-train 60 --n-test 30 --seeds 0   # smoke test

Writes bench/results/quality.json; `--update-docs` rewrites the table between the quality markers
of docs/benchmarks.md (and nothing else).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vilref_fed  # noqa: E402,F401  (offline environment first)

SITES = ("urban-dr", "myopia-clinic", "glaucoma-center")
DOC_BEGIN = "<!-- quality-table:begin -->"
DOC_END = "<!-- quality-table:end -->"


@dataclass
class QualityContext:
    """Everything a row needs; the federated hook receives the same object."""

    seed: int
    data_dir: Path
    site_dirs: dict[str, Path]
    sites: dict[str, Any]  # site name -> FolderPairDataset (training data)
    test: Any  # pooled held-out ConcatPairs
    model_config: Any  # vilref_fed.model.ModelConfig
    train_config: Any  # vilref_fed.train.TrainConfig (objective wscl, seed = self.seed)
    steps: int
    extras: dict[str, Any] = field(default_factory=dict)

    def new_model(self):
        import torch

        from vilref_fed.model import build_model

        torch.manual_seed(self.seed)
        return build_model(self.model_config)


def federated_hook() -> Callable[[QualityContext], Any] | None:
    """The federated_wscl row's trainer, supplied by the federation bench (not this file).

    Contract: a module `bench/quality_federated.py` defining `train(ctx: QualityContext) -> model`
    that federates `ctx.sites` (one client per hospital, FedAvg) starting from `ctx.new_model()`,
    with `ctx.train_config` for local training and `ctx.steps` optimiser steps in total across
    rounds per site budget as documented there, and returns the global model. Returns None while
    that module does not exist, and the row is reported as skipped.
    """
    try:
        mod = importlib.import_module("quality_federated")
    except ModuleNotFoundError:
        return None
    return getattr(mod, "train", None)


def _train(ctx: QualityContext, dataset: Any, objective: str):
    from vilref_fed.train import LocalTrainer

    model = ctx.new_model()
    cfg = ctx.train_config.replace(objective=objective, seed=ctx.seed)
    LocalTrainer(model, cfg).fit(dataset, max_steps=ctx.steps, progress=False)
    return model


def _score(model: Any, ctx: QualityContext, ontology: Any, lang: str) -> dict[str, Any]:
    from vilref_fed.data.synth_profiles import COARSE_LABELS
    from vilref_fed.eval.zeroshot import evaluate_zeroshot

    out: dict[str, Any] = {}
    for scheme in ("anchor", "raw"):
        ev = evaluate_zeroshot(model, ctx.test, ontology, lang=lang, scheme=scheme, min_positives=5)
        key = "" if scheme == "anchor" else "_raw"
        out[f"macro_auc{key}"] = ev["macro_auc"]
        coarse = [ev["per_label"][x]["auc"] for x in ("normal", *COARSE_LABELS)]
        coarse = [a for a in coarse if not math.isnan(a)]
        out[f"macro_auc_coarse{key}"] = statistics.fmean(coarse) if coarse else float("nan")
        if scheme == "anchor":
            out["per_label"] = {x: p["auc"] for x, p in ev["per_label"].items()}
            out["n_labels_evaluated"] = ev["n_labels_evaluated"]
    return out


def _context(args: argparse.Namespace, seed: int) -> QualityContext:
    import dataclasses

    from vilref_fed.data.folder_dataset import ConcatPairs, FolderPairDataset
    from vilref_fed.data.synthetic import generate_site
    from vilref_fed.model import load_model_config
    from vilref_fed.train import TrainConfig

    data_dir = Path(args.data) / f"seed{seed}"
    mcfg = load_model_config(args.model)
    if args.image_size:
        mcfg = dataclasses.replace(mcfg, image_size=args.image_size)
    norm = (mcfg.image_size, tuple(mcfg.image_mean), tuple(mcfg.image_std))
    site_dirs, sites, tests = {}, {}, []
    for i, name in enumerate(SITES):
        tr, te = data_dir / f"{name}-train", data_dir / f"{name}-test"
        for d, n, s in ((tr, args.n_train, 1000 + seed * 10 + i), (te, args.n_test, 5000 + seed * 10 + i)):
            if not _cached(d, name, n, s, args.gen_size):
                generate_site(d, n, name, seed=s, image_size=args.gen_size)
                (d / "bench_key.json").write_text(json.dumps(_cache_key(name, n, s, args.gen_size)))
        site_dirs[name] = tr
        sites[name] = FolderPairDataset(tr, *norm, labels_from=args.labels)
        tests.append(FolderPairDataset(te, *norm))
    tcfg = TrainConfig(
        objective="wscl",
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup,
        weight_decay=0.01,
        queue_size=args.queue_size,
        max_steps=args.steps,
        seed=seed,
        device="cpu",
    )
    return QualityContext(seed, data_dir, site_dirs, sites, ConcatPairs(tests), mcfg, tcfg, args.steps)


def _cache_key(profile: str, n: int, seed: int, gen_size: int) -> dict[str, Any]:
    from vilref_fed.data.synthetic import GENERATOR_VERSION

    return {"profile": profile, "n": n, "seed": seed, "gen_size": gen_size, "generator": GENERATOR_VERSION}


def _cached(d: Path, profile: str, n: int, seed: int, gen_size: int) -> bool:
    """A hospital generated earlier with exactly these settings and this generator version."""
    key = d / "bench_key.json"
    return key.is_file() and json.loads(key.read_text()) == _cache_key(profile, n, seed, gen_size)


def _summary(name: str, runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    vals = [r["macro_auc"] for r in runs]
    row: dict[str, Any] = {
        "name": name,
        "macro_auc": statistics.fmean(vals),
        "macro_auc_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "seeds": seeds,
        "per_seed": vals,
    }
    for key in ("macro_auc_raw", "macro_auc_coarse", "macro_auc_coarse_raw"):
        xs = [r[key] for r in runs]
        row[key] = statistics.fmean(xs)
        row[key + "_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
    labels = runs[0]["per_label"].keys()
    row["per_label_auc"] = {
        x: (
            statistics.fmean(v)
            if (v := [r["per_label"][x] for r in runs if not math.isnan(r["per_label"][x])])
            else None
        )
        for x in labels
    }
    row["train_seconds"] = statistics.fmean(r["seconds"] for r in runs)
    return row


def _paired(rows: dict[str, dict[str, Any]], a: str, b: str, key: str = "per_seed") -> dict[str, Any] | None:
    if a not in rows or b not in rows:
        return None
    d = [x - y for x, y in zip(rows[a][key], rows[b][key], strict=True)]
    mean = statistics.fmean(d)
    sd = statistics.stdev(d) if len(d) > 1 else float("nan")
    t = mean / (sd / math.sqrt(len(d))) if len(d) > 1 and sd > 0 else float("nan")
    return {"mean_diff": mean, "sd_diff": sd, "t": t, "n": len(d), "wins": sum(x > 0 for x in d), "diffs": d}


def markdown_table(result: dict[str, Any]) -> str:
    lines = [
        "| row | zero-shot macro AUC (mean ± sd) | seeds | coarse-label AUC | raw-scheme AUC |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['macro_auc']:.3f} ± {r['macro_auc_std']:.3f} | {len(r['seeds'])} | "
            f"{r['macro_auc_coarse']:.3f} ± {r['macro_auc_coarse_std']:.3f} | "
            f"{r['macro_auc_raw']:.3f} ± {r['macro_auc_raw_std']:.3f} |"
        )
    for s in result.get("skipped", []):
        lines.append(f"| {s['name']} | — (skipped: {s['reason']}) | | | |")
    return "\n".join(lines)


def update_docs(table: str, path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if DOC_BEGIN not in text or DOC_END not in text:
        raise SystemExit(
            f"{path} has no {DOC_BEGIN} ... {DOC_END} block; add it to the Quality section first"
        )
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    path.write_text(f"{head}{DOC_BEGIN}\n{table}\n{DOC_END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/tmp/vilref-quality", help="where the hospitals are generated (cached)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", default="centralised_wscl,centralised_clip,site_alone,federated_wscl")
    p.add_argument("--model", default="tiny")
    p.add_argument("--image-size", type=int, default=0, help="override the model's input size (0: keep)")
    p.add_argument("--gen-size", type=int, default=128, help="pixels of the generated photographs")
    p.add_argument("--n-train", type=int, default=600, help="training images per hospital")
    p.add_argument("--n-test", type=int, default=200, help="held-out images per hospital")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--queue-size", type=int, default=512)
    p.add_argument("--labels", choices=("extractor", "report", "truth"), default="extractor")
    p.add_argument("--lang", default="en+zh", help="prompt language(s) for zero-shot scoring")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    p.add_argument("--update-docs", action="store_true", help="rewrite the table in docs/benchmarks.md")
    args = p.parse_args(argv)

    import torch

    from vilref_fed.ontology import load_ontology

    torch.set_num_threads(args.threads)
    ontology = load_ontology()
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    names: list[str] = []
    for r in wanted:
        names += [f"site_alone_{s}" for s in SITES] if r == "site_alone" else [r]
    fed = federated_hook() if "federated_wscl" in names else None
    skipped = []
    if "federated_wscl" in names and fed is None:
        names.remove("federated_wscl")
        skipped.append({"name": "federated_wscl", "reason": "no bench/quality_federated.py hook yet"})

    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    t_start = time.perf_counter()
    for seed in args.seeds:
        ctx = _context(args, seed)
        for name in names:
            t0 = time.perf_counter()
            if name == "centralised_wscl":
                model = _train(ctx, _pooled(ctx), "wscl")
            elif name == "centralised_clip":
                model = _train(ctx, _pooled(ctx), "clip")
            elif name.startswith("site_alone_"):
                model = _train(ctx, ctx.sites[name.removeprefix("site_alone_")], "wscl")
            elif name == "federated_wscl":
                model = fed(ctx)
            else:
                raise SystemExit(f"unknown row {name!r}")
            seconds = time.perf_counter() - t0
            scored = _score(model, ctx, ontology, args.lang)
            scored["seconds"] = seconds
            runs[name].append(scored)
            print(
                json.dumps(
                    {
                        "seed": seed,
                        "row": name,
                        "macro_auc": round(scored["macro_auc"], 4),
                        "coarse": round(scored["macro_auc_coarse"], 4),
                        "train_s": round(seconds, 1),
                    }
                ),
                file=sys.stderr,
                flush=True,
            )

    rows = {n: _summary(n, runs[n], list(args.seeds)) for n in names}
    result = {
        "rows": list(rows.values()),
        "skipped": skipped,
        "comparisons": {
            "wscl_minus_clip": _paired(rows, "centralised_wscl", "centralised_clip"),
            "wscl_minus_clip_coarse": _paired_key(
                rows, "centralised_wscl", "centralised_clip", "macro_auc_coarse", runs
            ),
            "federated_minus_centralised": _paired(rows, "federated_wscl", "centralised_wscl"),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "update_docs", "data")},
        "test_images": len(ctx.test),
        "train_images_per_site": {k: len(v) for k, v in ctx.sites.items()},
        "wall_seconds": time.perf_counter() - t_start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(result)
    if args.update_docs:
        update_docs(table, ROOT / "docs" / "benchmarks.md")
    print(json.dumps(result, indent=2))
    print(table, file=sys.stderr)
    return result


def _pooled(ctx: QualityContext):
    from vilref_fed.data.folder_dataset import ConcatPairs

    return ConcatPairs([ctx.sites[s] for s in SITES])


def _paired_key(rows, a: str, b: str, key: str, runs) -> dict[str, Any] | None:
    if a not in rows or b not in rows:
        return None
    fake = {n: {"per_seed": [r[key] for r in runs[n]]} for n in (a, b)}
    return _paired(fake, a, b)


if __name__ == "__main__":
    main()
