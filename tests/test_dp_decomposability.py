"""Per-sample independence: the property Opacus's epsilon rests on.

For every objective the toolkit runs under Opacus: change sample j, and sample i's per-sample gradient
(what Opacus clips, computed by Opacus's own GradSampleModule) does not move. The same test on the CLIP
loss and on WSCL (with its memory queue) shows a large change: that is why the guard refuses them.
All models are the real `tiny` ViLReF model; the losses are the real objectives.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vilref_fed.memory import BatchExpansion
from vilref_fed.model import build_model, load_model_config
from vilref_fed.objectives import WSCLLoss, clip_loss
from vilref_fed.train.head import (
    FineTuneClassifier,
    ImageFeatures,
    MultiLabelHead,
    head_loss,
)
from vilref_fed.train.privacy import (
    DPSGDConfig,
    PrivacyGuardError,
    make_private,
    per_sample_coupling,
    per_sample_gradients,
    prepare_module_for_dp,
    registered_objectives,
    require_per_sample_decomposable,
)

B, L = 6, 5
TOL = 1e-6


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _tiny(learn_logit_scale: bool = True) -> nn.Module:
    cfg = load_model_config("tiny")
    if not learn_logit_scale:
        cfg.learn_logit_scale = False
    torch.manual_seed(0)
    return build_model(cfg)


def _images(seed: int, n: int = B) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _labels(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


# --------------------------------------------------------------------------- decomposable objectives
def _probe_head_bce():
    """Frozen-feature head: a patient = up to K images' features [K, D]; BCE per image, masked mean."""
    torch.manual_seed(1)
    head = MultiLabelHead(32, L)
    nn.init.normal_(head.linear.weight, std=0.5)
    x = F.normalize(torch.randn(B, 3, 32), dim=-1)
    y = _labels(2, (B, 3, L))
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)
    x2, y2, m2 = x.clone(), y.clone(), m.clone()
    x2[3] = F.normalize(torch.randn(3, 32), dim=-1)  # patient 3: other images, other labels, other count
    y2[3] = 1 - y2[3]
    m2[3] = torch.tensor([1.0, 1.0, 1.0])

    def loss(mod, batch):
        return head_loss(mod(batch[0]), batch[1], batch[2]) * batch[0].shape[0]

    return head, loss, (x, y, m), (x2, y2, m2)


def _probe_head_bce_finetune():
    """Fine-tuned image tower (real tiny ViT) + projection + head, one image per patient."""
    model = _tiny()
    classifier = FineTuneClassifier(ImageFeatures(model, "embedding"), MultiLabelHead(32, L))
    classifier = prepare_module_for_dp(classifier)
    nn.init.normal_(classifier.head.linear.weight, std=0.5)
    x, y = _images(3), _labels(4, (B, L))
    x2, y2 = x.clone(), y.clone()
    x2[3] = _images(5, 1)[0]
    y2[3] = 1 - y2[3]

    def loss(mod, batch):
        return head_loss(mod(batch[0]), batch[1]) * batch[0].shape[0]

    return classifier, loss, (x, y), (x2, y2)


DECOMPOSABLE_PROBES = {"head-bce": _probe_head_bce, "head-bce-finetune": _probe_head_bce_finetune}


def test_every_objective_declared_decomposable_has_an_independence_test():
    declared = {name for name, spec in registered_objectives().items() if spec.per_sample_decomposable}
    assert declared == set(DECOMPOSABLE_PROBES)


@pytest.mark.parametrize("objective", sorted(DECOMPOSABLE_PROBES))
def test_changing_sample_j_leaves_sample_i_gradient_unchanged(objective):
    module, loss, batch, changed = DECOMPOSABLE_PROBES[objective]()
    grads = per_sample_gradients(module, loss, batch)
    assert grads, "no per-sample gradients: nothing would be trained"
    for name, g in grads.items():
        assert g.shape[0] == B, name
    assert max(float(g[0].abs().max()) for g in grads.values()) > 1e-4  # sample 0 really has a gradient
    for i in (0, 1, 5):
        assert per_sample_coupling(module, loss, batch, changed, i) < TOL
    # ... while sample 3's own gradient does change (the test can see a change when there is one)
    assert per_sample_coupling(module, loss, batch, changed, 3) > 1e-2


# --------------------------------------------------------------------------- coupled objectives
def _two_tower_batch(seed: int):
    model = _tiny(learn_logit_scale=False)  # a fixed temperature: Opacus refuses a bare parameter
    texts = [f"report {k}: {'microaneurysms' if k % 2 else 'normal fundus'} {k * 7}" for k in range(B)]
    tok = model.tokenize(texts)
    return model, _images(seed), tok["input_ids"], tok["attention_mask"]


def test_clip_loss_fails_the_independence_test():
    model, x, ids, mask = _two_tower_batch(6)

    def loss(mod, batch):
        out = mod(*batch)
        return clip_loss(out["image_features"], out["text_features"], out["logit_scale"]) * batch[0].shape[0]

    x2 = x.clone()
    x2[3] = _images(7, 1)[0]  # only patient 3's image changes
    coupling = per_sample_coupling(model, loss, (x, ids, mask), (x2, ids, mask), 0)
    assert coupling > 1e-3, coupling  # patient 0's "per-sample" gradient moved because of patient 3


def test_wscl_with_its_memory_queue_fails_the_independence_test():
    model, x, ids, mask = _two_tower_batch(8)
    labels = _labels(9, (B, 19))
    labels[0, :3] = 1.0
    labels[1] = labels[0]  # a false negative for anchor 0: its vacancy is refilled from the queue
    wscl = WSCLLoss(delta=1.0, gamma=1.0, lam=1.0, refill=True)
    memory = BatchExpansion(model, queue_size=16, embed_dim=32, num_labels=19)
    with torch.no_grad():  # earlier patients' features in the queue (as after a few steps)
        qi, qt = memory.encode(_images(10, 12), *model.tokenize([f"earlier {k}" for k in range(12)]).values())
        memory.enqueue(qi, qt, _labels(11, (12, 19)))
    queue = memory.queue_kwargs()

    def loss_with(queue_kwargs):
        def loss(mod, batch):
            out = mod(*batch[:3])
            return wscl(out["image_features"], out["text_features"], out["logit_scale"], batch[3],
                        **queue_kwargs)["loss"] * batch[0].shape[0]
        return loss

    x2 = x.clone()
    x2[3] = _images(12, 1)[0]
    batch, changed = (x, ids, mask, labels), (x2, ids, mask, labels)
    in_batch = per_sample_coupling(model, loss_with(queue), batch, changed, 0)
    assert in_batch > 1e-3, in_batch

    # The queue couples too: the same batch, but the earlier patients' queued features changed.
    queue2 = {k: v.clone() for k, v in queue.items()}
    for key in ("queue_text_features", "queue_image_features"):
        queue2[key] = F.normalize(torch.randn_like(queue2[key]), dim=-1)
    a = per_sample_gradients(model, loss_with(queue), (x, ids, mask, labels))
    b = per_sample_gradients(model, loss_with(queue2), (x, ids, mask, labels))
    moved = sum(float((a[k][0] - b[k][0]).norm() ** 2) for k in a) ** 0.5
    assert moved > 1e-4, moved


# --------------------------------------------------------------------------- the guard
@pytest.mark.parametrize("objective", ["wscl", "clip"])
def test_guard_refuses_contrastive_pretraining_and_says_why(objective):
    with pytest.raises(PrivacyGuardError) as err:
        require_per_sample_decomposable(objective)
    msg = str(err.value)
    assert f"refused for the {objective!r} objective" in msg
    assert "couples the samples of a batch" in msg and "not a valid guarantee" in msg
    assert "site-level DP" in msg and "supervised head" in msg
    if objective == "wscl":
        assert "memory queue" in msg


def test_guard_refuses_unknown_objectives():
    with pytest.raises(PrivacyGuardError, match="not registered with the privacy layer"):
        require_per_sample_decomposable("my-new-loss")


def test_make_private_refuses_wscl_before_touching_the_model():
    model = _tiny(learn_logit_scale=False)
    data = torch.utils.data.TensorDataset(torch.zeros(8, 3, 32, 32))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PrivacyGuardError, match="refused for the 'wscl' objective"):
        make_private(model, opt, loader, "wscl", DPSGDConfig(noise_multiplier=1.0))
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_prepare_module_refuses_a_bare_logit_scale_and_fixes_batchnorm():
    with pytest.raises(PrivacyGuardError, match="logit_scale"):
        prepare_module_for_dp(_tiny(learn_logit_scale=True))
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    fixed = prepare_module_for_dp(net.eval())
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    assert fixed.training  # .train() after loading: Opacus records nothing in eval mode


def test_unused_trainable_parameters_are_frozen_before_dp():
    """Opacus refuses a step when a trainable parameter gets no per-sample gradient (a BERT pooler, a
    text tower when only images train); freezing them is correct since they would not change."""
    from vilref_fed.train.privacy import freeze_unused_parameters

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 2)
            self.pooler = nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    net = TwoHeads()
    x = torch.randn(3, 4)
    frozen = freeze_unused_parameters(net, lambda m: m(x).sum())
    assert frozen == ["pooler.weight", "pooler.bias"]
    assert all(p.requires_grad for p in net.used.parameters())
    assert per_sample_gradients(net, lambda m, b: m(b).sum(), x).keys() == {"used.weight", "used.bias"}
