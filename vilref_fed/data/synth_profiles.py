"""Synthetic hospital profiles: who the patients are (label priors, co-occurrence), which camera takes
the photographs, which language the reports are written in, and how the PACS exports them.

Federated learning is only interesting when sites differ (non-IID): a diabetic screening programme
sees mostly retinopathy, a myopia clinic sees tessellation and atrophy, a glaucoma centre sees big
cups. Each profile fixes those differences so that benchmarks are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vilref_fed.data.synth_draw import Camera, Color

LABEL_IDS: tuple[str, ...] = (
    "normal",
    "diabetic_retinopathy",
    "age_related_macular_degeneration",
    "glaucoma",
    "rnfl_defect",
    "pathological_myopia",
    "tessellated_fundus",
    "retinal_vein_occlusion",
    "retinal_artery_occlusion",
    "hypertensive_retinopathy",
    "macular_edema",
    "central_serous_chorioretinopathy",
    "epiretinal_membrane",
    "macular_hole",
    "retinal_detachment",
    "optic_disc_edema",
    "optic_atrophy",
    "media_opacity",
    "laser_scars",
)
"""DESIGN.md §3.1 order. The ontology is the authority; synthetic.py checks that the two agree."""

# Findings whose drawn signature is large enough to survive a 32-64 px model input (measured by
# tests/test_synthetic.py::test_every_label_is_visible_at_model_resolution: > 2.5 grey levels of mean
# change at 64 px); the others (microaneurysms, small drusen, cups) need larger inputs.
COARSE_LABELS: tuple[str, ...] = (
    "pathological_myopia",
    "tessellated_fundus",
    "retinal_artery_occlusion",
    "epiretinal_membrane",
    "retinal_detachment",
    "optic_disc_edema",
    "media_opacity",
)

# Findings that follow from others (parent, child, probability): realistic co-occurrence.
CO_OCCURRENCE: tuple[tuple[str, str, float], ...] = (
    ("diabetic_retinopathy", "macular_edema", 0.35),
    ("diabetic_retinopathy", "laser_scars", 0.22),
    ("retinal_vein_occlusion", "macular_edema", 0.30),
    ("retinal_vein_occlusion", "laser_scars", 0.10),
    ("pathological_myopia", "tessellated_fundus", 0.85),
    ("pathological_myopia", "retinal_detachment", 0.06),
    ("glaucoma", "rnfl_defect", 0.45),
    ("hypertensive_retinopathy", "retinal_vein_occlusion", 0.12),
    ("age_related_macular_degeneration", "media_opacity", 0.25),
    ("macular_hole", "epiretinal_membrane", 0.30),
)

# Pairs that do not happen together in one eye (the second is dropped).
EXCLUSIVE: tuple[tuple[str, str], ...] = (
    ("optic_disc_edema", "optic_atrophy"),
    ("optic_disc_edema", "glaucoma"),
    ("retinal_artery_occlusion", "retinal_vein_occlusion"),
    ("macular_hole", "central_serous_chorioretinopathy"),
)

# Findings of systemic or bilateral disease: when both eyes are photographed they usually agree.
BILATERAL = frozenset(
    {
        "diabetic_retinopathy",
        "hypertensive_retinopathy",
        "pathological_myopia",
        "tessellated_fundus",
        "age_related_macular_degeneration",
        "glaucoma",
        "media_opacity",
        "optic_disc_edema",
    }
)


@dataclass(frozen=True)
class SiteProfile:
    """Everything that makes one synthetic hospital differ from another."""

    name: str
    language: str  # "en" | "zh"
    priors: dict[str, float]  # per-eye probability of each primary finding
    camera: Camera
    pigment: Color = (0.80, 0.34, 0.16)
    real_background_p: float = 0.0  # share of eyes drawn over the real scikit-image fundus
    both_eyes_p: float = 0.3  # share of visits that photograph and report both eyes
    negation_p: float = 0.6  # share of reports that deny some findings explicitly
    hedge_p: float = 0.15  # share of positive findings written with a hedge ("suspected ...")
    false_hedge_p: float = 0.02  # share of reports that hedge a finding the eye does not have
    age_range: tuple[int, int] = (35, 85)
    diabetic_history_p: float = 0.3
    transfer_syntax: str = "jpeg"  # "jpeg" (JPEG baseline) | "explicit" (explicit VR little endian)
    institution: str = "Synthetic Hospital"
    accession_prefix: str = "ACC"
    description: str = ""
    co_occurrence_scale: float = 1.0
    extra: dict[str, float] = field(default_factory=dict)


PROFILES: dict[str, SiteProfile] = {
    "urban-dr": SiteProfile(
        name="urban-dr",
        language="en",
        description="city diabetic screening programme: much retinopathy, English reports, JPEG DICOM",
        priors={
            "diabetic_retinopathy": 0.34,
            "hypertensive_retinopathy": 0.08,
            "retinal_vein_occlusion": 0.05,
            "age_related_macular_degeneration": 0.06,
            "glaucoma": 0.05,
            "media_opacity": 0.08,
            "epiretinal_membrane": 0.03,
            "retinal_artery_occlusion": 0.015,
            "tessellated_fundus": 0.03,
            "optic_atrophy": 0.01,
            "macular_hole": 0.01,
            "laser_scars": 0.02,
        },
        camera=Camera(
            width=320,
            height=256,
            fov_fraction=0.96,
            cast=(1.05, 0.97, 0.90),
            brightness=1.02,
            gamma=1.0,
            blur=0.4,
            noise=0.012,
            vignette=0.35,
            notch=False,
            manufacturer="Topcon",
            model_name="TRC-NW400",
        ),
        pigment=(0.80, 0.34, 0.16),
        both_eyes_p=0.5,
        diabetic_history_p=0.8,
        transfer_syntax="jpeg",
        institution="Riverside General Hospital",
        accession_prefix="RGH",
    ),
    "myopia-clinic": SiteProfile(
        name="myopia-clinic",
        language="zh",
        description="myopia and macular clinic: tessellation, atrophy, detachment; Chinese reports",
        priors={
            "pathological_myopia": 0.25,
            "tessellated_fundus": 0.22,
            "retinal_detachment": 0.05,
            "central_serous_chorioretinopathy": 0.07,
            "epiretinal_membrane": 0.06,
            "macular_hole": 0.05,
            "glaucoma": 0.06,
            "rnfl_defect": 0.03,
            "diabetic_retinopathy": 0.06,
            "retinal_vein_occlusion": 0.03,
            "media_opacity": 0.04,
            "optic_disc_edema": 0.015,
        },
        camera=Camera(
            width=288,
            height=288,
            fov_fraction=0.93,
            cast=(0.93, 1.02, 1.06),
            brightness=0.92,
            gamma=1.08,
            blur=0.0,
            noise=0.008,
            vignette=0.45,
            notch=True,
            manufacturer="Canon",
            model_name="CR-2 AF",
        ),
        pigment=(0.72, 0.28, 0.13),
        age_range=(12, 70),
        both_eyes_p=0.35,
        diabetic_history_p=0.1,
        transfer_syntax="explicit",
        institution="Eastern Eye Hospital",
        accession_prefix="EEH",
    ),
    "glaucoma-center": SiteProfile(
        name="glaucoma-center",
        language="en",
        description="glaucoma and neuro-ophthalmology centre: big cups, nerve-fibre defects, disc disease",
        priors={
            "glaucoma": 0.32,
            "rnfl_defect": 0.06,
            "optic_atrophy": 0.06,
            "optic_disc_edema": 0.04,
            "age_related_macular_degeneration": 0.12,
            "retinal_artery_occlusion": 0.04,
            "retinal_vein_occlusion": 0.06,
            "hypertensive_retinopathy": 0.05,
            "media_opacity": 0.1,
            "diabetic_retinopathy": 0.08,
            "epiretinal_membrane": 0.03,
        },
        camera=Camera(
            width=384,
            height=320,
            fov_fraction=0.98,
            cast=(1.0, 0.95, 0.98),
            brightness=1.1,
            gamma=0.95,
            blur=0.9,
            noise=0.015,
            vignette=0.25,
            notch=False,
            manufacturer="Zeiss",
            model_name="VISUCAM 500",
        ),
        pigment=(0.84, 0.36, 0.17),
        real_background_p=0.3,
        age_range=(45, 90),
        both_eyes_p=0.3,
        diabetic_history_p=0.2,
        transfer_syntax="jpeg",
        institution="Northfield Glaucoma Centre",
        accession_prefix="NGC",
    ),
    "balanced": SiteProfile(
        name="balanced",
        language="en",
        description="every finding equally common: tests, held-out evaluation and learnability checks",
        priors={label: 0.09 for label in LABEL_IDS if label != "normal"},
        camera=Camera(
            width=256,
            height=256,
            fov_fraction=0.97,
            cast=(1.0, 1.0, 1.0),
            brightness=1.0,
            gamma=1.0,
            blur=0.3,
            noise=0.01,
            vignette=0.3,
            manufacturer="Synthetic Optics",
            model_name="FundusCam 1",
        ),
        both_eyes_p=0.0,
        negation_p=0.4,
        hedge_p=0.1,
        false_hedge_p=0.0,
        co_occurrence_scale=0.5,
        transfer_syntax="explicit",
        institution="Synthetic Reference Centre",
        accession_prefix="SRC",
    ),
    "coarse": SiteProfile(
        name="coarse",
        language="en",
        description=(
            "only findings whose signature survives downsampling to 32-64 px (haze, pale ischaemic "
            "retina, detachment, tessellation, myopic atrophy, membranes, disc swelling/pallor): "
            "the learnability check for tiny CPU models, which cannot see microaneurysms"
        ),
        priors={label: 0.13 for label in COARSE_LABELS},
        camera=Camera(
            width=256,
            height=256,
            fov_fraction=0.97,
            cast=(1.0, 1.0, 1.0),
            brightness=1.0,
            gamma=1.0,
            blur=0.3,
            noise=0.01,
            vignette=0.3,
            manufacturer="Synthetic Optics",
            model_name="FundusCam 1",
        ),
        both_eyes_p=0.0,
        negation_p=0.4,
        hedge_p=0.1,
        false_hedge_p=0.0,
        co_occurrence_scale=0.5,
        transfer_syntax="explicit",
        institution="Synthetic Reference Centre",
        accession_prefix="SRC",
    ),
}


def get_profile(name: str) -> SiteProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown synthetic profile {name!r}; choose one of: {', '.join(PROFILES)}") from None


def sample_eye_labels(rng: np.random.Generator, profile: SiteProfile) -> frozenset[str]:
    """Draw one eye's findings: independent primaries, then co-occurring findings, then exclusions."""
    found = {label for label, p in profile.priors.items() if rng.random() < p}
    for parent, child, p in CO_OCCURRENCE:
        if parent in found and rng.random() < min(p * profile.co_occurrence_scale, 1.0):
            found.add(child)
    for keep, drop in EXCLUSIVE:
        if keep in found and drop in found:
            found.discard(drop)
    return frozenset(found) if found else frozenset({"normal"})


def sample_fellow_eye(
    rng: np.random.Generator, profile: SiteProfile, first: frozenset[str]
) -> frozenset[str]:
    """The other eye of the same visit: systemic/bilateral findings usually recur, the rest is redrawn."""
    other = set(sample_eye_labels(rng, profile)) - {"normal"}
    other = {label for label in other if label not in BILATERAL}
    for label in first & BILATERAL:
        if rng.random() < 0.75:
            other.add(label)
    for keep, drop in EXCLUSIVE:
        if keep in other and drop in other:
            other.discard(drop)
    return frozenset(other) if other else frozenset({"normal"})
