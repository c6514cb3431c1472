"""Privacy accounting shared by the coordinator and the sites (no Flower, no CLI).

Site-level DP (the unit is a whole hospital) lives here because both the server's strategy wrapper and
the documentation's parameter tables need the same arithmetic; patient-level DP-SGD with Opacus lives in
`vilref_fed.train.privacy`.
"""

from vilref_fed.privacy.accounting import (
    RoundPrivacy,
    SiteLevelAccountant,
    site_level_epsilon,
    site_level_noise_multiplier,
)

__all__ = ["RoundPrivacy", "SiteLevelAccountant", "site_level_epsilon", "site_level_noise_multiplier"]
