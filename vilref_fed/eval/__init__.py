"""Evaluation: zero-shot classification with ontology prompts, metrics, linear probe, HTML/JSON reports.

Public API (imported lazily, so `import vilref_fed.eval.thresholds` does not pull in torch):
`build_zeroshot_classifier`, `zeroshot_scores`, `zeroshot_softmax`, `zeroshot_predict`,
`evaluate_zeroshot`, `label_text_embeddings`, `multilabel_metrics`, `roc_auc`, `average_precision`,
`roc_curve`, `linear_probe`, `fit_logistic`, `extract_features`, `write_eval_report`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "build_zeroshot_classifier": "vilref_fed.eval.zeroshot",
    "zeroshot_scores": "vilref_fed.eval.zeroshot",
    "zeroshot_softmax": "vilref_fed.eval.zeroshot",
    "zeroshot_predict": "vilref_fed.eval.zeroshot",
    "evaluate_zeroshot": "vilref_fed.eval.zeroshot",
    "label_text_embeddings": "vilref_fed.eval.zeroshot",
    "multilabel_metrics": "vilref_fed.eval.metrics",
    "roc_auc": "vilref_fed.eval.metrics",
    "average_precision": "vilref_fed.eval.metrics",
    "roc_curve": "vilref_fed.eval.metrics",
    "linear_probe": "vilref_fed.eval.probe",
    "fit_logistic": "vilref_fed.eval.probe",
    "extract_features": "vilref_fed.eval.probe",
    "write_eval_report": "vilref_fed.eval.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vilref_fed.eval' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
