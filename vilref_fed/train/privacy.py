"""Patient-level DP-SGD with Opacus, and the guard that keeps it off objectives where it would lie.

Opacus bounds one record's influence by clipping *per-sample* gradients and adding Gaussian noise. That
bound is only true when the loss is a sum of per-record terms: record i's gradient must not depend on
record j. The CLIP loss and WSCL are not: every anchor's softmax denominator holds the other samples of
the batch (and, for WSCL, the memory queue filled with earlier records' features, and the label-similarity
coupling term), so the "per-sample" gradient Opacus clips for record i moves when record j changes.
Clipping it does not bound j's influence, and the epsilon Opacus prints would be false. Hence a registry
of objectives with a `per_sample_decomposable` flag and a guard that refuses the rest with the reason
and the alternatives (site-level DP in federation, or the supervised head on extracted labels).

Everything Opacus needs from a model is prepared here: BatchNorm -> GroupNorm (ModuleValidator.fix),
no bare trainable `nn.Parameter` on the wrapped top module, `.train()` mode (from_pretrained returns
`eval()` and Opacus then records no activations), and frozen parameters the objective does not use
(Opacus fails on parameters without per-sample gradients).
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

PRIVACY_UNITS = ("patient", "image")


class PrivacyGuardError(ValueError):
    """Raised when a requested privacy guarantee would not hold (the message says why and what to do)."""


class PrivacyBudgetExhausted(RuntimeError):
    """Raised before a training round that would take a site past its epsilon budget."""


# --------------------------------------------------------------------------- the objective registry
@dataclass(frozen=True)
class ObjectiveSpec:
    """What the privacy layer must know about a training objective."""

    name: str
    per_sample_decomposable: bool
    why: str
    alternative: str = ""


_WHY_CONTRASTIVE = (
    "its loss couples the samples of a batch: each anchor's softmax denominator holds the other samples "
    "as negatives{extra}, so the 'per-sample' gradient Opacus would clip for one patient changes when "
    "another patient changes. Clipping it does not bound one patient's influence, and the epsilon "
    "Opacus would report is not a valid guarantee."
)
_ALTERNATIVE = (
    "Use site-level DP in federation instead (run config [privacy] mode = 'site-server-fixed' or another "
    "'site-*' mode: clipping + Gaussian noise on each hospital's whole update, valid for any loss), or "
    "train the supervised head on extracted labels with patient-level DP "
    "(`vilref-client train-head --dp`, or federated task = 'head')."
)

_REGISTRY: dict[str, ObjectiveSpec] = {}


def register_objective(spec: ObjectiveSpec) -> None:
    """Declare an objective. Declaring one decomposable is a claim a test must back (see tests)."""
    _REGISTRY[spec.name] = spec


def objective_spec(name: str) -> ObjectiveSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PrivacyGuardError(
            f"objective {name!r} is not registered with the privacy layer, so it is not known to be "
            f"per-sample decomposable; registered objectives: {', '.join(sorted(_REGISTRY))}"
        ) from None


def registered_objectives() -> dict[str, ObjectiveSpec]:
    return dict(_REGISTRY)


def require_per_sample_decomposable(objective: str) -> ObjectiveSpec:
    """THE GUARD: refuse patient-level DP-SGD for an objective whose per-sample gradients are coupled."""
    spec = objective_spec(objective)
    if not spec.per_sample_decomposable:
        raise PrivacyGuardError(
            f"patient-level DP (Opacus DP-SGD) is refused for the {spec.name!r} objective: {spec.why} "
            f"{spec.alternative}"
        )
    return spec


register_objective(
    ObjectiveSpec(
        "wscl",
        False,
        _WHY_CONTRASTIVE.format(
            extra=(", the memory queue refills them with features of earlier patients that enter later "
                   "losses without clipping or noise, and the coupling term pulls every pair's similarity "
                   "toward their label similarity")
        ),
        _ALTERNATIVE,
    )
)
register_objective(ObjectiveSpec("clip", False, _WHY_CONTRASTIVE.format(extra=""), _ALTERNATIVE))
register_objective(
    ObjectiveSpec(
        "head-bce",
        True,
        "multi-label binary cross-entropy of a linear head on frozen image features: each patient's loss "
        "depends only on that patient's images and labels.",
    )
)
register_objective(
    ObjectiveSpec(
        "head-bce-finetune",
        True,
        "multi-label binary cross-entropy with the image tower fine-tuned (GroupNorm, no batch statistics): "
        "each patient's loss depends only on that patient's image and labels.",
    )
)


# --------------------------------------------------------------------------- DP-SGD configuration
@dataclass
class DPSGDConfig:
    """Patient-level DP-SGD settings. Give either a target epsilon or a noise multiplier.

    With `epsilon`, the noise multiplier is solved once for the whole planned training (`epochs`,
    across every federated round), so a run that stops early has spent less, never more.
    """

    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    # The head's per-patient gradient (BCE averaged over 19 labels, L2-normalised features) has norm
    # ~0.1; a clip far above it clips nothing and only adds noise (bench/privacy_utility.py).
    max_grad_norm: float = 0.1
    epochs: int = 1
    accountant: str = "rdp"
    grad_sample_mode: str = "hooks"
    unit: str = "patient"

    def validate(self) -> None:
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("DP needs exactly one of --epsilon or --noise-multiplier")
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon must be a positive number, got {self.epsilon}")
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0
        ):
            raise ValueError(f"noise multiplier must be a positive number, got {self.noise_multiplier}")
        if self.delta is not None and not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be strictly between 0 and 1, got {self.delta}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max grad norm must be a positive number, got {self.max_grad_norm}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.accountant not in ("rdp", "prv"):
            raise ValueError(f"accountant must be 'rdp' or 'prv', got {self.accountant!r}")
        if self.unit not in PRIVACY_UNITS:
            raise ValueError(f"privacy unit must be one of {PRIVACY_UNITS}, got {self.unit!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_delta(num_units: int) -> float:
    """delta well below 1/n (the usual rule: a delta near 1/n allows leaking one record in full)."""
    return float(min(1e-5, 1.0 / (10.0 * max(1, num_units) ** 1.1)))


def noise_multiplier_for(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The noise multiplier that spends exactly (epsilon, delta) over `steps` Poisson-sampled steps."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        sigma = get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    return float(sigma)


# --------------------------------------------------------------------------- model preparation
def bare_trainable_parameters(module: nn.Module) -> list[str]:
    """Trainable parameters registered directly on `module` (not on a child), e.g. a CLIP logit scale."""
    return [name for name, p in module.named_parameters(recurse=False) if p.requires_grad]


def prepare_module_for_dp(module: nn.Module) -> nn.Module:
    """Make a module Opacus-ready or say precisely why it cannot be.

    Returns a (possibly new) module: BatchNorm layers become GroupNorm; the module is put in train mode.
    Raises PrivacyGuardError for a bare trainable parameter on the top module (Opacus crashes on it when
    the module also holds buffers, and a learnable temperature couples samples anyway) or for layers
    Opacus still cannot handle.
    """
    from opacus.validators import ModuleValidator

    bare = bare_trainable_parameters(module)
    if bare:
        raise PrivacyGuardError(
            "the module given to DP-SGD has trainable parameters directly on its top level "
            f"({', '.join(bare)}); "
            "freeze them (requires_grad_(False)) or move them into a submodule before enabling DP"
        )
    module.train()  # from_pretrained returns eval(); Opacus records no activations then
    if not ModuleValidator.is_valid(module):
        module = ModuleValidator.fix(module)
    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        raise PrivacyGuardError(
            "the model still has layers Opacus cannot make private after ModuleValidator.fix: "
            + "; ".join(str(e) for e in errors[:3])
        )
    module.train()
    return module


def freeze_unused_parameters(module: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor]) -> list[str]:
    """Freeze trainable parameters that receive no gradient from the objective; returns their names.

    Opacus refuses a step when a trainable parameter has no per-sample gradient (e.g. a BERT pooler, or
    the text tower when only the image tower is trained). Freezing them is correct: they do not change.
    """
    module.zero_grad(set_to_none=True)
    loss_of(module).backward()
    frozen = []
    for name, p in module.named_parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
            frozen.append(name)
    module.zero_grad(set_to_none=True)
    return frozen


# --------------------------------------------------------------------------- attaching DP-SGD
@dataclass
class DPTraining:
    """The private training objects, plus what the accountant says."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: torch.utils.data.DataLoader
    engine: Any
    config: DPSGDConfig
    delta: float
    noise_multiplier: float
    sample_rate: float

    def epsilon(self) -> float:
        """Epsilon spent so far (all rounds whose accountant history was restored included)."""
        if len(self.engine.accountant) == 0:
            return 0.0
        with warnings.catch_warnings():
            # at the edge of the RDP order grid the bound is valid, only looser
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return float(self.engine.get_epsilon(self.delta))

    def accountant_state(self) -> dict[str, Any]:
        """JSON-able accountant history, to persist in the site's state between federated rounds."""
        return {
            "mechanism": self.engine.accountant.mechanism(),
            "history": [list(h) for h in self.engine.accountant.history],
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
        }

    def metrics(self) -> dict[str, float]:
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": float(self.config.max_grad_norm),
            "sample_rate": self.sample_rate,
        }


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    objective: str,
    config: DPSGDConfig,
    *,
    planned_steps: int | None = None,
    accountant_state: Mapping[str, Any] | None = None,
    deterministic_seed: int | None = None,
) -> DPTraining:
    """Wrap (module, optimizer, loader) for DP-SGD after the guard has accepted the objective.

    The loader is replaced by Poisson sampling (sample rate = batch_size / n). With a target epsilon the
    noise multiplier is solved for `planned_steps` (default: epochs x steps per epoch) from zero spent;
    a restored `accountant_state` continues an earlier budget (federated rounds) at the same noise.
    """
    from opacus import PrivacyEngine

    require_per_sample_decomposable(objective)
    config.validate()
    if bare_trainable_parameters(module):
        raise PrivacyGuardError(
            "the module given to DP-SGD has trainable parameters on its top level; call "
            "prepare_module_for_dp first"
        )
    n = len(data_loader.dataset)
    if n == 0:
        raise ValueError("no training examples: DP-SGD needs at least one labelled example")
    sample_rate = 1.0 / len(data_loader)
    delta = config.delta if config.delta is not None else default_delta(n)
    with warnings.catch_warnings():
        # Opacus warns that its secure RNG (torchcsprng) is off; we draw our generators' seeds from the OS.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        engine = PrivacyEngine(accountant=config.accountant)
    if accountant_state:
        if accountant_state.get("mechanism") != config.accountant:
            raise ValueError(
                f"the saved privacy budget was accounted with {accountant_state.get('mechanism')!r}, "
                f"this run uses {config.accountant!r}; keep the accountant for the whole run"
            )
        engine.accountant.history = [tuple(h) for h in accountant_state.get("history", [])]
    if config.noise_multiplier is not None:
        sigma = float(config.noise_multiplier)
    elif accountant_state and accountant_state.get("noise_multiplier"):
        sigma = float(accountant_state["noise_multiplier"])
    else:
        steps = planned_steps if planned_steps is not None else int(config.epochs * len(data_loader))
        sigma = noise_multiplier_for(
            float(config.epsilon), delta, sample_rate, max(1, steps), config.accountant
        )
    # The noise and the Poisson sample must be unpredictable: a noise stream seeded from a config seed
    # could be regenerated and subtracted. Only tests ask for `deterministic_seed`.
    base = int(deterministic_seed) if deterministic_seed is not None else secrets.randbits(62)
    noise_generator = torch.Generator().manual_seed(base)
    with warnings.catch_warnings():
        # Opacus warns that its secure RNG (torchcsprng) is off; we draw our generators' seeds from the OS.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*Optimal order is the (largest|smallest) alpha.*")
        dp_module, dp_optimizer, dp_loader = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=float(config.max_grad_norm),
            poisson_sampling=True,
            grad_sample_mode=config.grad_sample_mode,
            noise_generator=noise_generator,
        )
    sampler = getattr(dp_loader, "batch_sampler", None)
    if sampler is not None and hasattr(sampler, "generator"):
        sampler.generator = torch.Generator().manual_seed(base ^ 0x5DEECE66D)
    return DPTraining(dp_module, dp_optimizer, dp_loader, engine, config, float(delta), sigma, sample_rate)


def projected_epsilon(dp: DPTraining, steps: int) -> float:
    """Epsilon after `steps` more steps at this training's noise and sample rate (nothing is spent)."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=dp.engine.accountant.mechanism())
    acc.history = [*dp.engine.accountant.history, (dp.noise_multiplier, dp.sample_rate, int(steps))]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(acc.get_epsilon(dp.delta))


# --------------------------------------------------------------------------- the independence probe
def per_sample_gradients(
    module: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any
) -> dict[str, torch.Tensor]:
    """What Opacus would clip: its per-sample gradients of `loss_fn` on `batch` (summed loss).

    The module is wrapped in Opacus's GradSampleModule exactly as make_private does (hooks, functorch
    for layers without a hook), so the probe tests the numbers DP-SGD really uses.
    """
    from opacus import GradSampleModule

    gsm = GradSampleModule(module, batch_first=True, loss_reduction="sum")
    try:
        gsm.zero_grad(set_to_none=True)
        loss = loss_fn(gsm, batch)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        out = {}
        for name, p in gsm.named_parameters():
            if p.requires_grad and getattr(p, "grad_sample", None) is not None:
                out[name.removeprefix("_module.")] = p.grad_sample.detach().clone()
            p.grad_sample = None
        return out
    finally:
        gsm._close()


def per_sample_coupling(
    module: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    changed_batch: Any,
    i: int,
) -> float:
    """Relative L2 change of sample i's per-sample gradient when only other samples changed.

    0 (to float tolerance) for a per-sample decomposable objective; clearly > 0 for a coupled one.
    """
    a = per_sample_gradients(module, loss_fn, batch)
    b = per_sample_gradients(module, loss_fn, changed_batch)
    if a.keys() != b.keys() or not a:
        raise RuntimeError("per-sample gradients missing: is any parameter trainable?")
    num = sum(float((a[k][i] - b[k][i]).pow(2).sum()) for k in a)
    den = sum(float(a[k][i].pow(2).sum()) for k in a)
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)
