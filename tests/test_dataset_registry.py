"""A named data set is one entry in ``diffmic.data.sources.REGISTRY`` (issue 24 section 2): a throw-away
entry registered here is accepted by the config, loaded, split and grouped by the data module, and
found by the download command, the lesion masks, the report's original images and the model card,
with no other code touched. A branch on a data-set name anywhere else fails this test."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffmic.config import ConfigError, load_config
from diffmic.data import DiffMICDataModule, download
from diffmic.data.records import DatasetIndex, Record
from diffmic.data.remote import ManualSource
from diffmic.data.sources import (
    DATASETS,
    REGISTRY,
    DatasetSpec,
    LoadRequest,
    dataset_spec,
    find_dataset,
    load_image_folder,
)
from diffmic.inference.explain import _original_path
from diffmic.inference.export import _card_training
from diffmic.trust.lesions import lesion_mask_dir

from conftest import write_synthetic_folder

NOTE = "Note: the toy split is made up."


def _load_toy(req: LoadRequest) -> dict[str, DatasetIndex]:
    """A class-folder tree whose images come in pairs of one patient (``Record.group``)."""
    (ix,) = load_image_folder(req.folder("toy")).values()
    recs = [Record(r.id, r.label, r.path, group=f"patient{i // 2}") for i, r in enumerate(ix.records)]
    return {"all": DatasetIndex(recs, list(ix.class_names))}


def _toy_original(root: Path | None, image_id: str) -> Path | None:
    p = (root or Path()) / image_id
    return p if p.is_file() else None


@pytest.fixture
def toy(tmp_path, monkeypatch) -> Path:
    root = write_synthetic_folder(tmp_path / "toy", n=40, size=16)
    (root / "lesions").mkdir()
    spec = DatasetSpec(
        name="toy",
        title="Toy",
        load=_load_toy,
        splits=("authors", "lesion"),
        aliases=("toyset",),
        group_column="patient",
        public_benchmark=True,
        downloads=(ManualSource("toy", "get the toy set and put it in {root}/toy"),),
        mask_folder="lesions",
        original_image=_toy_original,
        split_notes={"lesion": NOTE},
    )
    monkeypatch.setitem(REGISTRY, "toy", spec)
    return root


def test_a_registered_data_set_is_one_of_the_choices(toy):
    assert "toy" in DATASETS and DATASETS[-1] == "toy" and find_dataset("TOYSET") is REGISTRY["toy"]
    cfg = load_config("cpu", ["data.dataset=toy", f"data.root={toy}", "data.split=lesion"])
    assert cfg.data.dataset == "toy"
    # a split the entry does not list is refused by the data module, naming the data set
    with pytest.raises(ValueError, match="Toy supports split=authors / lesion, not 'random'"):
        DiffMICDataModule(dataset="toy", root=toy, split="random")


def test_lesion_split_follows_the_registry(toy):
    with pytest.raises(ConfigError, match=r"only data.dataset=ham10000 or data.dataset=toy have them"):
        load_config("cpu", ["data.dataset=folder", "data.split=lesion"])
    with pytest.raises(ValueError, match="which only HAM10000 and Toy has"):
        DiffMICDataModule(dataset="folder", root=toy, split="lesion")


def test_the_data_module_loads_splits_and_groups_a_registered_data_set(toy):
    dm = DiffMICDataModule(dataset="toyset", root=toy, split="lesion", image_size=16, val_fraction=0.2, seed=3)
    assert dm.dataset == "toy" and dm.duplicate_content_policy == "warning" == dm.label_conflict_policy
    src = dm._load_sources()
    groups = {k: {r.group for r in ix.records} for k, ix in src.items()}
    assert set(src) == {"train", "test"} and not groups["train"] & groups["test"]
    assert sum(len(ix) for ix in src.values()) == 40


def test_masks_originals_card_and_download_read_the_entry(toy, tmp_path):
    assert lesion_mask_dir("toy", toy) == toy / "lesions"
    cfg = load_config("cpu", ["data.dataset=toy", f"data.root={toy}"])
    image_id = "benign/0000.png" if (toy / "benign" / "0000.png").is_file() else "malignant/0000.png"
    assert _original_path(cfg, image_id) == toy / image_id
    card = _card_training(
        {"dataset": "toy", "root": str(toy), "split": "lesion", "test_fraction": 0.3, "val_fraction": 0.1}
        | {"image_size": 16, "in_chans": 3},
        None,
    )
    assert NOTE in card
    assert "toy" in download.available_datasets()
    with pytest.raises(download.ManualDownloadRequired, match="get the toy set"):
        download.download_dataset("toy", tmp_path)


def test_the_built_in_entries():
    assert tuple(DATASETS) == ("ham10000", "aptos2019", "csv", "folder", "medmnist")
    assert dataset_spec("ISIC").name == "ham10000" and dataset_spec("npz").name == "medmnist"
    with pytest.raises(ValueError, match=r"dataset must be one of \('ham10000', 'aptos2019'"):
        dataset_spec("imagenet")
    # every download of `diffmic data download` belongs to a data set's entry
    owned = {d.name for spec in REGISTRY.values() for d in spec.downloads}
    assert owned == set(download.SOURCES)
    with pytest.raises(ValueError, match="needs a group_column"):
        DatasetSpec(name="x", title="X", load=_load_toy, splits=("lesion",))
