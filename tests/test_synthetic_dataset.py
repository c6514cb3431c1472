"""FolderPairDataset: the trainer's item contract, patient-level splits, label sources, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vilref_fed.data.folder_dataset import ConcatPairs, FolderPairDataset, patient_split
from vilref_fed.data.preprocess import canonical_image, to_model_tensor
from vilref_fed.data.synthetic import generate_site
from vilref_fed.model import build_model
from vilref_fed.train.data import check_item, collate_pairs

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp")
    generate_site(d, n=40, profile="glaucoma-center", seed=9, image_size=96)
    return d


def test_items_follow_the_trainer_contract_and_the_shared_preprocessing(site):
    ds = FolderPairDataset(site, 32, MEAN, STD)
    assert len(ds) == 40
    item = ds[0]
    check_item(item, 32, len(ds.label_ids))
    # Same pixels as the ingestion path: canonical crop at 256, then to_model_tensor's resize.
    raw = np.asarray(Image.open(site / ds.image_ids[0]).convert("RGB"))
    ref = to_model_tensor(canonical_image(raw), 32, MEAN, STD)
    torch.testing.assert_close(item["image"], ref)
    batch = collate_pairs(build_model("tiny"))([ds[i] for i in range(4)])
    assert batch["images"].shape == (4, 3, 32, 32) and batch["labels"].shape == (4, 19)


def test_patient_split_is_disjoint_stable_and_complete(site):
    tr = FolderPairDataset(site, 32, MEAN, STD, split="train", val_fraction=0.3)
    va = FolderPairDataset(site, 32, MEAN, STD, split="val", val_fraction=0.3)
    assert not set(tr.patient_ids) & set(va.patient_ids)
    assert len(tr) + len(va) == 40 and len(va) > 0
    again = FolderPairDataset(site, 32, MEAN, STD, split="val", val_fraction=0.3)
    assert again.image_ids == va.image_ids
    assert patient_split("P1", 0.3) == patient_split("P1", 0.3)


def test_label_sources(site):
    truth = FolderPairDataset(site, 32, MEAN, STD, labels_from="truth")
    stated = FolderPairDataset(site, 32, MEAN, STD, labels_from="report")
    extracted = FolderPairDataset(site, 32, MEAN, STD, labels_from="extractor")
    assert np.array_equal(truth.train_labels, truth.truth)
    # What the report states covers every drawn finding (reports may add hedged suspicions).
    assert np.all(stated.train_labels >= truth.truth * (1 - np.eye(19)[0]))
    # The product's extractor reads the generated reports nearly as the generator wrote them.
    agree = np.mean(np.all(extracted.train_labels == stated.train_labels, axis=1))
    assert agree >= 0.9
    np.testing.assert_array_equal(extracted.truth, truth.truth)  # evaluation truth never changes


def test_bad_directory_and_arguments(tmp_path, site):
    with pytest.raises(FileNotFoundError, match="not a synthetic site"):
        FolderPairDataset(tmp_path, 32)
    with pytest.raises(ValueError):
        FolderPairDataset(site, 32, split="everything")
    with pytest.raises(ValueError):
        FolderPairDataset(site, 32, labels_from="guess")


def test_concat_pairs(site, tmp_path):
    other = tmp_path / "other"
    generate_site(other, n=10, profile="myopia-clinic", seed=1, image_size=96)
    a = FolderPairDataset(site, 32, MEAN, STD)
    b = FolderPairDataset(other, 32, MEAN, STD)
    both = ConcatPairs([a, b])
    assert len(both) == 50
    assert both[45]["image_id"] == b[5]["image_id"] and both[3]["image_id"] == a[3]["image_id"]
    assert both.truth.shape == (50, 19)
