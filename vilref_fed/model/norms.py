"""BatchNorm -> GroupNorm conversion for the CNN towers.

DP-SGD (Opacus) cannot use BatchNorm, because its statistics mix samples; and under non-IID
federated averaging, BatchNorm running statistics from different hospitals average into
nonsense. GroupNorm keeps the same affine parameters with per-sample statistics.
"""

from __future__ import annotations

import math

from torch import nn


def group_count(channels: int, groups: int) -> int:
    """The largest divisor of `channels` that is at most `groups` (GroupNorm needs a divisor)."""
    g = math.gcd(channels, groups)
    return max(g, 1)


def batchnorm_to_groupnorm(module: nn.Module, groups: int = 32) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place) by a GroupNorm with the same affine weights."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            c = child.num_features
            gn = nn.GroupNorm(group_count(c, groups), c, eps=child.eps, affine=True)
            if child.affine:
                gn.weight.data.copy_(child.weight.data)
                gn.bias.data.copy_(child.bias.data)
            setattr(module, name, gn)
        else:
            batchnorm_to_groupnorm(child, groups)
    return module
