"""A supervised multi-label head on extracted labels: the objective patient-level DP-SGD can protect.

Binary cross-entropy of a linear head is a sum of per-record terms, so Opacus's per-sample clipping
bounds one record's influence and its epsilon is a true statement (tests/test_dp_decomposability.py
checks exactly that). Two modes:

- "frozen": the image tower of the (pre-trained, federated) model is fixed; features are extracted once
  in eval mode (no batch statistics) and L2-normalised per image (no dataset statistics, which would
  themselves leak); only the linear head trains. Cheap: a DP linear probe.
- "finetune": the image tower + projection train with the head (GroupNorm towers only under DP).

The privacy unit is the PATIENT when the dataset tells us who the patient is (two eyes and several
visits are one person): in frozen mode a training example is a patient with all their images (up to
`max_images_per_patient`), in finetune mode it is a patient and one of their images drawn afresh each
time. Per-sample clipping then bounds the whole patient. Without patient keys, every image is its own
unit and the reported unit says "image".
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vilref_fed.train.privacy import (
    DPSGDConfig,
    PrivacyBudgetExhausted,
    default_delta,
    make_private,
    prepare_module_for_dp,
    projected_epsilon,
    require_per_sample_decomposable,
)

MODES = ("frozen", "finetune")
FEATURES = ("backbone", "embedding")
HEAD_PREFIX = "head."
ENCODER_PREFIX = "encoder."


@dataclass
class HeadConfig:
    """How to train the head. `dp=None` trains without DP (the utility baseline)."""

    mode: str = "frozen"
    feature: str = "backbone"
    epochs: int = 20
    batch_size: int = 64
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_images_per_patient: int = 8
    feature_batch_size: int = 64
    seed: int = 0
    dp: DPSGDConfig | None = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"head mode must be one of {MODES}, got {self.mode!r}")
        if self.feature not in FEATURES:
            raise ValueError(f"head feature must be one of {FEATURES}, got {self.feature!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be >= 1")
        if self.max_images_per_patient < 1:
            raise ValueError("max images per patient must be >= 1")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if self.dp is not None:
            self.dp.validate()

    @property
    def objective(self) -> str:
        return "head-bce" if self.mode == "frozen" else "head-bce-finetune"

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 0.5 if self.mode == "frozen" else 1e-3

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dp"] = None if self.dp is None else self.dp.to_dict()
        return d


# --------------------------------------------------------------------------- modules
class MultiLabelHead(nn.Module):
    """A linear layer over image features; accepts [..., D] (patients x images x D included)."""

    def __init__(self, in_dim: int, num_labels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num_labels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features)


class ImageFeatures(nn.Module):
    """The image side of a ViLReF model as a module of its own (the text tower is not part of it).

    Opacus wraps this (plus the head) in finetune mode; it never sees the text tower or the logit scale.
    """

    def __init__(self, model: nn.Module, feature: str) -> None:
        super().__init__()
        self.tower = model.image_tower
        self.proj = model.image_proj if feature == "embedding" else None
        self.feature = feature

    @property
    def out_dim(self) -> int:
        return int(self.proj.out_features if self.proj is not None else self.tower.width)

    def forward(self, images: Tensor) -> Tensor:
        z = self.tower(images)
        if self.proj is not None:
            z = self.proj(z)
        return F.normalize(z, dim=-1)


class FineTuneClassifier(nn.Module):
    def __init__(self, encoder: ImageFeatures, head: MultiLabelHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(images))


def head_loss(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over the batch of per-unit losses; a unit's loss depends on that unit only.

    logits/labels: [B, L] (one image per unit) or [B, K, L] with mask [B, K] (a patient's images).
    An empty Poisson batch gives a zero loss that still reaches every parameter.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    per_image = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=-1)
    if mask is None:
        per_unit = per_image
    else:
        per_unit = (per_image * mask).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1.0)
    return per_unit.mean()


# --------------------------------------------------------------------------- data
@dataclass
class FeatureTable:
    """Per-image features, labels and the unit (patient) each image belongs to."""

    features: Tensor
    labels: Tensor
    unit_keys: list[str]
    unit: str


def _item_unit_key(item: Mapping[str, Any], index: int) -> tuple[str, bool]:
    for key in ("patient_key", "patient_id", "patient"):
        value = item.get(key)
        if value is not None and str(value) != "":
            return str(value), True
    image_id = item.get("image_id")
    return (str(image_id) if image_id is not None else f"#{index}"), False


def dataset_unit_keys(dataset: Dataset) -> tuple[list[str], str] | None:
    """Patient keys the dataset exposes without loading images, if any.

    Understood: `patient_keys` / `patient_ids` (list or method) and SiteDataset's `groups()` (the
    keyed patient; an image without a patient ID falls back to its study, then to itself).
    """
    for attr in ("patient_keys", "patient_ids", "groups"):
        keys = getattr(dataset, attr, None)
        if callable(keys):
            keys = keys()
        if keys is None:
            continue
        keys = [str(k) for k in keys]
        if len(keys) != len(dataset):
            raise ValueError(f"the dataset's {attr} do not match its length")
        return keys, "patient"
    return None


def _collate_items(items: list[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "image": torch.stack([it["image"] for it in items]),
        "labels": torch.stack([torch.as_tensor(it["labels"], dtype=torch.float32) for it in items]),
    }
    if all("truth" in it for it in items):
        out["truth"] = torch.stack([torch.as_tensor(it["truth"], dtype=torch.float32) for it in items])
    out["items"] = [
        {k: v for k, v in it.items() if k not in ("image", "labels", "text", "truth")} for it in items
    ]
    return out


@torch.no_grad()
def extract_features(
    model: nn.Module, dataset: Dataset, feature: str = "backbone", batch_size: int = 64,
    progress: Callable[[int], None] | None = None, target: str = "labels",
) -> FeatureTable:
    """Features of every image, extracted in eval mode (BatchNorm uses running statistics, so one
    image's feature never depends on the others in its batch). `target="truth"` keeps a synthetic
    hospital's ground truth instead of the report-extracted labels (for evaluation)."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: no labelled images to train a head on")
    encoder = ImageFeatures(model, feature)
    was_training = model.training
    model.eval()
    feats, labels, keys = [], [], []
    any_patient = False
    exposed = dataset_unit_keys(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate_items)
    index = 0
    try:
        for batch in loader:
            if target == "truth" and "truth" not in batch:
                raise ValueError("this dataset has no ground truth; evaluate against its labels instead")
            feats.append(encoder(batch["image"]).float())
            labels.append(batch["truth"] if target == "truth" else batch["labels"])
            for item in batch["items"]:
                key, is_patient = _item_unit_key(item, index)
                keys.append(key)
                any_patient |= is_patient
                index += 1
            if progress is not None:
                progress(len(batch["items"]))
    finally:
        model.train(was_training)
    unit = "patient" if any_patient else "image"
    if exposed is not None:
        keys, unit = exposed
    return FeatureTable(torch.cat(feats), torch.cat(labels), keys, unit)


def group_by_unit(keys: Sequence[str]) -> list[list[int]]:
    """Indices of each unit's images, units in first-seen order."""
    groups: OrderedDict[str, list[int]] = OrderedDict()
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.values())


class PatientFeatureSet(Dataset):
    """One item per patient: features [K, D], labels [K, L], mask [K] (padding beyond their images)."""

    def __init__(self, table: FeatureTable, max_images_per_patient: int, seed: int = 0) -> None:
        groups = group_by_unit(table.unit_keys)
        k = max(1, min(max_images_per_patient, max(len(g) for g in groups)))
        rng = random.Random(seed)
        p, d, n_labels = len(groups), table.features.shape[1], table.labels.shape[1]
        self.x = torch.zeros(p, k, d)
        self.y = torch.zeros(p, k, n_labels)
        self.mask = torch.zeros(p, k)
        self.dropped_images = 0
        for i, g in enumerate(groups):
            if len(g) > k:  # capping bounds what one patient can contribute; which images is random
                self.dropped_images += len(g) - k
                g = sorted(rng.sample(g, k))
            self.x[i, : len(g)] = table.features[g]
            self.y[i, : len(g)] = table.labels[g]
            self.mask[i, : len(g)] = 1.0

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.x[i], self.y[i], self.mask[i]


class PatientImageSet(Dataset):
    """One item per patient: one of their images (drawn afresh each time) and its labels."""

    def __init__(self, dataset: Dataset, unit_keys: Sequence[str], seed: int = 0) -> None:
        self.dataset = dataset
        self.groups = group_by_unit(unit_keys)
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        item = self.dataset[self.rng.choice(self.groups[i])]
        return item["image"], torch.as_tensor(item["labels"], dtype=torch.float32)


def _unit_keys_for_finetune(dataset: Dataset) -> tuple[list[str], str]:
    exposed = dataset_unit_keys(dataset)
    if exposed is not None:
        return exposed
    keys, any_patient = [], False
    for i in range(len(dataset)):
        key, is_patient = _item_unit_key(dataset[i], i)
        keys.append(key)
        any_patient |= is_patient
    return keys, ("patient" if any_patient else "image")


# --------------------------------------------------------------------------- metrics
def multilabel_auc(y_true: Tensor, scores: Tensor, label_ids: Sequence[str]) -> dict[str, Any]:
    """Macro AUC over labels with both classes present (the eval package's metrics when installed)."""
    try:
        from vilref_fed.eval import multilabel_metrics  # type: ignore[attr-defined]

        out = multilabel_metrics(y_true, scores, list(label_ids))
        if isinstance(out, dict) and "macro_auc" in out:
            return out
    except ImportError:
        pass
    from sklearn.metrics import roc_auc_score

    y, s = y_true.numpy(), scores.numpy()
    per_label: dict[str, float] = {}
    for j, label in enumerate(label_ids):
        if 0 < y[:, j].sum() < len(y):
            per_label[label] = float(roc_auc_score(y[:, j], s[:, j]))
    macro = sum(per_label.values()) / len(per_label) if per_label else float("nan")
    return {"macro_auc": macro, "per_label_auc": per_label}


# --------------------------------------------------------------------------- training
@dataclass
class HeadResult:
    head: MultiLabelHead
    encoder: ImageFeatures | None
    metrics: dict[str, float]
    unit: str
    accountant_state: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def _optimizer(params: Sequence[nn.Parameter], config: HeadConfig) -> torch.optim.Optimizer:
    if config.mode == "frozen":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def train_head(
    model: nn.Module,
    dataset: Dataset,
    config: HeadConfig,
    *,
    num_labels: int | None = None,
    head: MultiLabelHead | None = None,
    accountant_state: Mapping[str, Any] | None = None,
    planned_epochs: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    deterministic_seed: int | None = None,
) -> HeadResult:
    """Train the head (and, in finetune mode, the image tower) on a site's labelled images.

    With `config.dp`, DP-SGD (Opacus, Poisson sampling, per-unit clipping) runs after the guard has
    accepted the objective; a target epsilon is solved for `planned_epochs` (default: config.epochs;
    federated rounds pass rounds x epochs) and `accountant_state` continues an earlier budget.
    `progress(stage, done, total)` is called as work proceeds (the CLI draws a bar from it).
    """
    config.validate()
    require_per_sample_decomposable(config.objective)  # always true here; keeps the registry honest
    torch.manual_seed(config.seed)
    if config.mode == "frozen":
        return _train_frozen(model, dataset, config, num_labels=num_labels, head=head,
                             accountant_state=accountant_state, planned_epochs=planned_epochs,
                             progress=progress, deterministic_seed=deterministic_seed)
    return _train_finetune(model, dataset, config, num_labels=num_labels, head=head,
                           accountant_state=accountant_state, planned_epochs=planned_epochs,
                           progress=progress, deterministic_seed=deterministic_seed)


def _run_epochs(
    module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, config: HeadConfig,
    loss_of: Callable[[nn.Module, Any], Tensor], progress: Callable[[str, int, int], None] | None,
    epsilon_now: Callable[[], float] | None = None,
) -> tuple[float, int, list[dict[str, float]]]:
    """Train; the history holds each epoch's loss and, under DP, the epsilon spent by its end."""
    module.train()
    steps, total_loss, seen, history = 0, 0.0, 0, []
    total = config.epochs * len(loader)
    for epoch in range(config.epochs):
        epoch_loss, epoch_batches = 0.0, 0
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(module, batch)
            with warnings.catch_warnings():
                # Opacus's hooks on a head over fixed features: no input needs a gradient, which is fine.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            optimizer.step()
            steps += 1
            epoch_loss += float(loss.detach())
            epoch_batches += 1
            seen += int(batch[0].shape[0])
            if progress is not None:
                progress("train", steps, total)
        total_loss = epoch_loss / max(1, epoch_batches)
        entry = {"epoch": float(epoch + 1), "loss": total_loss}
        if epsilon_now is not None:
            entry["epsilon"] = epsilon_now()
        history.append(entry)
    return total_loss, steps, history


def _frozen_loss(module: nn.Module, batch: Any) -> Tensor:
    x, y, m = batch
    return head_loss(module(x), y, m)


def _finetune_loss(module: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return head_loss(module(x), y)


def _dp_attach(
    module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, config: HeadConfig,
    planned_epochs: int | None, accountant_state: Mapping[str, Any] | None, deterministic_seed: int | None,
):
    assert config.dp is not None
    epochs_total = planned_epochs if planned_epochs is not None else config.epochs
    planned_steps = int(epochs_total * len(loader))
    dp = make_private(module, optimizer, loader, config.objective, config.dp,
                      planned_steps=planned_steps, accountant_state=accountant_state,
                      deterministic_seed=deterministic_seed)
    if config.dp.epsilon is not None:
        projected = projected_epsilon(dp, config.epochs * len(dp.data_loader))
        if projected > config.dp.epsilon * 1.01:
            raise PrivacyBudgetExhausted(
                f"this site has spent epsilon={dp.epsilon():.3f} of its budget {config.dp.epsilon}; "
                f"this round would bring it to {projected:.3f}; stop, or start a new run with a new budget"
            )
    return dp


def _train_frozen(model, dataset, config, *, num_labels, head, accountant_state, planned_epochs, progress,
                  deterministic_seed) -> HeadResult:
    n_items = len(dataset)
    done = [0]

    def feature_progress(k: int) -> None:
        done[0] += k
        if progress is not None:
            progress("features", done[0], n_items)

    table = extract_features(model, dataset, config.feature, config.feature_batch_size, feature_progress)
    return train_head_on_features(table, config, num_labels=num_labels, head=head,
                                  accountant_state=accountant_state, planned_epochs=planned_epochs,
                                  progress=progress, deterministic_seed=deterministic_seed)


def train_head_on_features(
    table: FeatureTable,
    config: HeadConfig,
    *,
    num_labels: int | None = None,
    head: MultiLabelHead | None = None,
    accountant_state: Mapping[str, Any] | None = None,
    planned_epochs: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    deterministic_seed: int | None = None,
) -> HeadResult:
    """The frozen-mode training on features already extracted (`extract_features`): lets a site that
    trains several heads, or many federated rounds, extract its features once."""
    config.validate()
    if config.mode != "frozen":
        raise ValueError("train_head_on_features is the frozen mode; finetune needs the images")
    torch.manual_seed(config.seed)
    n_labels = num_labels or table.labels.shape[1]
    units = PatientFeatureSet(table, config.max_images_per_patient, seed=config.seed)
    head = head if head is not None else MultiLabelHead(table.features.shape[1], n_labels)
    batch = min(config.batch_size, len(units))
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(units, batch_size=batch, shuffle=True, generator=generator)
    optimizer = _optimizer(list(head.parameters()), config)
    dp = None
    module: nn.Module = head
    if config.dp is not None:
        dp = _dp_attach(head, optimizer, loader, config, planned_epochs, accountant_state, deterministic_seed)
        module, optimizer, loader = dp.module, dp.optimizer, dp.data_loader
    loss, steps, history = _run_epochs(module, optimizer, loader, config, _frozen_loss, progress,
                                       dp.epsilon if dp is not None else None)
    metrics = {"train_loss": loss, "steps": float(steps), "units": float(len(units)),
               "images": float(len(table.unit_keys)), "images_dropped": float(units.dropped_images)}
    if dp is not None:
        metrics.update(dp.metrics())
        _cleanup(dp.module)
    metrics["privacy_unit_patient"] = 1.0 if table.unit == "patient" else 0.0
    return HeadResult(head, None, metrics, table.unit,
                      dp.accountant_state() if dp is not None else None, history)


def _cleanup(dp_module: nn.Module) -> None:
    """Remove Opacus hooks so the trained module is a plain module again (saving, evaluation)."""
    close = getattr(dp_module, "_close", None)
    if callable(close):
        close()


def _train_finetune(model, dataset, config, *, num_labels, head, accountant_state, planned_epochs, progress,
                    deterministic_seed) -> HeadResult:
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: no labelled images to train a head on")
    keys, unit = _unit_keys_for_finetune(dataset)
    first = dataset[0]
    n_labels = num_labels or int(torch.as_tensor(first["labels"]).numel())
    encoder = ImageFeatures(model, config.feature)
    head = head if head is not None else MultiLabelHead(encoder.out_dim, n_labels)
    classifier: nn.Module = FineTuneClassifier(encoder, head)
    if config.dp is not None:
        classifier = prepare_module_for_dp(classifier)
    classifier.train()
    units = PatientImageSet(dataset, keys, seed=config.seed)
    batch = min(config.batch_size, len(units))
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(units, batch_size=batch, shuffle=True, generator=generator)
    optimizer = _optimizer([p for p in classifier.parameters() if p.requires_grad], config)
    dp = None
    module = classifier
    if config.dp is not None:
        dp = _dp_attach(classifier, optimizer, loader, config, planned_epochs, accountant_state,
                        deterministic_seed)
        module, optimizer, loader = dp.module, dp.optimizer, dp.data_loader
    loss, steps, history = _run_epochs(module, optimizer, loader, config, _finetune_loss, progress,
                                       dp.epsilon if dp is not None else None)
    metrics = {"train_loss": loss, "steps": float(steps), "units": float(len(units)),
               "images": float(len(dataset)), "images_dropped": 0.0}
    if dp is not None:
        metrics.update(dp.metrics())
        _cleanup(dp.module)
    metrics["privacy_unit_patient"] = 1.0 if unit == "patient" else 0.0
    return HeadResult(classifier.head, classifier.encoder, metrics, unit,
                      dp.accountant_state() if dp is not None else None, history)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: nn.Module, head: MultiLabelHead, dataset: Dataset, config: HeadConfig,
            encoder: ImageFeatures | None = None, target: str = "labels") -> tuple[Tensor, Tensor]:
    """(targets [N, L], probabilities [N, L]) for every image of the dataset.

    target "labels" compares with the training labels (extracted from reports); "truth" with the
    image-level ground truth a synthetic hospital carries (what the utility table reports).
    """
    encoder = encoder if encoder is not None else ImageFeatures(model, config.feature)
    was = encoder.training
    encoder.eval()
    feats, targets = [], []
    try:
        for batch in DataLoader(dataset, batch_size=config.feature_batch_size, collate_fn=_collate_items):
            if target == "truth" and "truth" not in batch:
                raise ValueError("this dataset has no ground truth; evaluate against its labels instead")
            feats.append(encoder(batch["image"]).float())
            targets.append(batch["truth"] if target == "truth" else batch["labels"])
    finally:
        encoder.train(was)
    return torch.cat(targets), torch.sigmoid(head(torch.cat(feats)))


def evaluate_head(model: nn.Module, head: MultiLabelHead, dataset: Dataset, config: HeadConfig,
                  label_ids: Sequence[str], encoder: ImageFeatures | None = None,
                  target: str = "labels") -> dict[str, Any]:
    """Macro AUC (and per-label AUC) of the head's probabilities on a dataset."""
    targets, scores = predict(model, head, dataset, config, encoder, target)
    return multilabel_auc(targets, scores, label_ids)


# --------------------------------------------------------------------------- federation helpers
def head_arrays(head: MultiLabelHead, encoder: ImageFeatures | None = None) -> dict[str, Tensor]:
    """What a federated head round sends: the head, plus the image encoder in finetune mode."""
    out = {HEAD_PREFIX + k: v.detach().clone() for k, v in head.state_dict().items()}
    if encoder is not None:
        out.update({ENCODER_PREFIX + k: v.detach().clone() for k, v in encoder.state_dict().items()})
    return out


def initial_head_arrays(model: nn.Module, num_labels: int, mode: str = "frozen",
                        feature: str = "backbone", include_encoder: bool | None = None) -> dict[str, Tensor]:
    """The arrays a federated head run starts from: a zero head, plus the image encoder (always in
    finetune mode; in frozen mode too with `include_encoder=True`, so that every site extracts its
    features with the coordinator's tower; the sites send it back unchanged)."""
    encoder = ImageFeatures(model, feature)
    head = MultiLabelHead(encoder.out_dim, num_labels)
    with_encoder = (mode == "finetune") if include_encoder is None else bool(include_encoder)
    return head_arrays(head, encoder if with_encoder else None)


def load_head_arrays(arrays: Mapping[str, Tensor], model: nn.Module, config: HeadConfig,
                     num_labels: int) -> tuple[MultiLabelHead, ImageFeatures]:
    encoder = ImageFeatures(model, config.feature)
    head = MultiLabelHead(encoder.out_dim, num_labels)
    head_sd = {k[len(HEAD_PREFIX):]: v for k, v in arrays.items() if k.startswith(HEAD_PREFIX)}
    if set(head_sd) != set(head.state_dict()):
        raise ValueError(
            "the federated head arrays do not match this site's head (label count or feature size differ); "
            "check the run's model and ontology"
        )
    head.load_state_dict({k: torch.as_tensor(v) for k, v in head_sd.items()})
    enc_sd = {k[len(ENCODER_PREFIX):]: v for k, v in arrays.items() if k.startswith(ENCODER_PREFIX)}
    if enc_sd:
        encoder.load_state_dict({k: torch.as_tensor(v) for k, v in enc_sd.items()})
    elif config.mode == "finetune":
        raise ValueError("finetune mode needs the image encoder's weights in the federated arrays")
    return head, encoder


def _accountant_path(state_dir: Path, run_key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(run_key)) or "default"
    return Path(state_dir) / "privacy" / f"head-dp-{safe}.json"


def train_head_round(
    arrays: Mapping[str, Tensor],
    model: nn.Module,
    train_set: Dataset,
    config: HeadConfig,
    *,
    num_labels: int,
    label_ids: Sequence[str] | None = None,
    val_set: Dataset | None = None,
    state_dir: Path | None = None,
    run_key: str = "default",
    total_rounds: int = 1,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """One federated round of the supervised head at a site; returns (new arrays, scalar metrics).

    `model` supplies the architecture (and, in frozen mode, the image tower if `arrays` holds no
    encoder). Under DP the site's accountant history persists in `state_dir` between rounds, keyed by
    `run_key`, and the noise multiplier is solved once for `total_rounds x config.epochs` epochs, so the
    reported epsilon is this site's cumulative spend for the run. Metrics hold only numbers:
    num-examples, train_loss, units (patients), under DP epsilon / delta / dp_sigma / dp_clip /
    dp_patient (1 when the unit is the patient), and val_macro_auc.
    """
    config.validate()
    head, encoder = load_head_arrays(arrays, model, config, num_labels)
    if config.mode == "finetune":
        model.image_tower.load_state_dict(encoder.tower.state_dict())
        if encoder.proj is not None:
            model.image_proj.load_state_dict(encoder.proj.state_dict())
    acc_path = _accountant_path(state_dir, run_key) if state_dir is not None else None
    acc_state = None
    if config.dp is not None and acc_path is not None and acc_path.exists():
        acc_state = json.loads(acc_path.read_text())
    result = train_head(model, train_set, config, num_labels=num_labels, head=head,
                        accountant_state=acc_state, planned_epochs=max(1, total_rounds) * config.epochs,
                        progress=progress)
    if result.accountant_state is not None and acc_path is not None:
        acc_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = acc_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.accountant_state))
        tmp.replace(acc_path)
    # Short scalar keys (the coordinator accepts metric names up to 13 characters, server/protocol.py).
    metrics: dict[str, float] = {"num-examples": float(result.metrics["images"]),
                                 "train_loss": float(result.metrics["train_loss"]),
                                 "units": float(result.metrics["units"])}
    if config.dp is not None:
        metrics.update({"epsilon": float(result.metrics["epsilon"]), "delta": float(result.metrics["delta"]),
                        "dp_sigma": float(result.metrics["noise_multiplier"]),
                        "dp_clip": float(result.metrics["max_grad_norm"]),
                        "dp_patient": float(result.metrics["privacy_unit_patient"])})
    if val_set is not None and len(val_set) > 0 and label_ids is not None:
        auc = evaluate_head(model, result.head, val_set, config, label_ids,
                            result.encoder if config.mode == "finetune" else None)
        if not math.isnan(auc["macro_auc"]):
            metrics["val_macro_auc"] = float(auc["macro_auc"])
    new_arrays = head_arrays(result.head, result.encoder if config.mode == "finetune" else None)
    if config.mode == "frozen" and any(k.startswith(ENCODER_PREFIX) for k in arrays):
        new_arrays.update({k: torch.as_tensor(v) for k, v in arrays.items() if k.startswith(ENCODER_PREFIX)})
    return new_arrays, metrics


# --------------------------------------------------------------------------- files
def save_head(path: str | Path, result: HeadResult, config: HeadConfig, label_ids: Sequence[str],
              model_config: Mapping[str, Any] | None = None, base_checkpoint: str | None = None) -> Path:
    """A torch file with the head (and the fine-tuned encoder) plus what produced it (DP included)."""
    from vilref_fed.model.checkpoint import atomic_torch_save

    payload = {
        "kind": "vilref-head",
        "head": result.head.state_dict(),
        "encoder": result.encoder.state_dict() if result.encoder is not None else None,
        "meta": {
            "label_ids": list(label_ids),
            "config": config.to_dict(),
            "metrics": {k: float(v) for k, v in result.metrics.items()},
            "privacy_unit": result.unit,
            "model_config": dict(model_config) if model_config is not None else None,
            "base_checkpoint": base_checkpoint,
            "delta_default": default_delta(int(result.metrics.get("units", 1))),
        },
    }
    path = Path(path)
    atomic_torch_save(payload, path)
    return path
