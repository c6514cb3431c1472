"""The consortium ontology file and its loader: content, hash, prompts, validation, site extensions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vilref_fed.labels import LabelExtractor
from vilref_fed.ontology import DEFAULT_PATH, Ontology, OntologyError, load_ontology

DESIGN_LABELS = (
    "normal, diabetic_retinopathy, age_related_macular_degeneration, glaucoma, rnfl_defect, "
    "pathological_myopia, tessellated_fundus, retinal_vein_occlusion, retinal_artery_occlusion, "
    "hypertensive_retinopathy, macular_edema, central_serous_chorioretinopathy, epiretinal_membrane, "
    "macular_hole, retinal_detachment, optic_disc_edema, optic_atrophy, media_opacity, laser_scars"
).split(", ")
_CJK = re.compile(r"[\u4e00-\u9fff]")


def _copy(tmp_path: Path, edit=None) -> Path:
    text = DEFAULT_PATH.read_text(encoding="utf-8")
    if edit is not None:
        text = edit(text)
    path = tmp_path / "onto.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_v1_has_the_19_design_labels_in_order():
    onto = load_ontology()
    assert isinstance(onto, Ontology)
    assert list(onto.label_ids) == DESIGN_LABELS
    assert onto.index("glaucoma") == 3 and onto.label("glaucoma").name_zh == "青光眼"
    assert onto.version == "1.0.0"


def test_every_label_has_both_languages_synonyms_and_2_to_5_descriptors():
    for lab in load_ontology().labels:
        assert lab.name_en and _CJK.search(lab.name_zh), lab.id
        assert lab.synonyms_en and lab.synonyms_zh, lab.id
        assert all(_CJK.search(s) for s in lab.synonyms_zh if not s.isascii()), lab.id
        assert 2 <= len(lab.descriptors_en) <= 5 and 2 <= len(lab.descriptors_zh) <= 5, lab.id


def test_standard_abbreviations_are_present():
    onto = load_ontology()
    abbrevs = {a for lab in onto.labels for a in lab.abbreviations}
    assert {"NPDR", "PDR", "BRVO", "CRVO", "CRAO", "ARMD", "CSCR", "ERM", "CME", "DME"} <= abbrevs
    zh = {s for lab in onto.labels for s in lab.synonyms_zh}
    assert {"糖网", "中浆", "黄斑前膜", "视盘水肿"} <= zh


def test_prompts_are_name_plus_descriptors():
    onto = load_ontology()
    lab = onto.label("macular_hole")
    assert onto.prompts("macular_hole") == [lab.name_en, *lab.descriptors_en]
    assert onto.prompts("macular_hole", "zh") == [lab.name_zh, *lab.descriptors_zh]
    with pytest.raises(ValueError, match="language"):
        onto.prompts("macular_hole", "fr")
    with pytest.raises(KeyError, match="unknown label"):
        onto.prompts("cataract")


def test_hash_is_stable_and_tracks_content(tmp_path):
    onto = load_ontology()
    assert re.fullmatch(r"[0-9a-f]{64}", onto.hash)
    assert load_ontology(path=DEFAULT_PATH).hash == onto.hash  # a fresh parse gives the same hash
    changed = load_ontology(path=_copy(tmp_path, lambda t: t.replace('"tigroid fundus", ', "")))
    assert changed.hash != onto.hash
    comments = load_ontology(path=_copy(tmp_path, lambda t: "# a comment\n" + t.replace("\n\n", "\n\n\n")))
    assert comments.hash == onto.hash  # formatting is not content


def test_default_ontology_is_cached():
    assert load_ontology() is load_ontology()


# ---- validation -------------------------------------------------------------------------------------


def _error(tmp_path: Path, edit) -> str:
    with pytest.raises(OntologyError) as info:
        load_ontology(path=_copy(tmp_path, edit))
    return str(info.value)


def _line_of(path_text: str, needle: str) -> int:
    return next(i for i, line in enumerate(path_text.splitlines(), 1) if needle in line)


def test_unknown_label_key_is_an_error_with_its_line(tmp_path):
    text = DEFAULT_PATH.read_text(encoding="utf-8")
    msg = _error(
        tmp_path, lambda t: t.replace('name_zh = "青光眼"', 'name_zh = "青光眼"\nsynonym_en = ["x"]')
    )
    edited = text.replace('name_zh = "青光眼"', 'name_zh = "青光眼"\nsynonym_en = ["x"]')
    assert "unknown key 'synonym_en'" in msg and "'glaucoma'" in msg
    assert f"line {_line_of(edited, 'synonym_en = ')}" in msg


def test_unknown_top_level_key_is_an_error(tmp_path):
    def edit(t: str) -> str:
        return t.replace('version = "1.0.0"', 'version = "1.0.0"\nlabel_order = []')

    msg = _error(tmp_path, edit)
    line = _line_of(edit(DEFAULT_PATH.read_text(encoding="utf-8")), "label_order")
    assert "unknown top-level key 'label_order'" in msg and f"line {line}:" in msg


def test_duplicate_synonym_across_labels_is_an_error(tmp_path):
    def edit(t: str) -> str:
        return t.replace('"tessellated fundus", "fundus tessellation"', '"tessellated fundus", "Drusen"')

    msg = _error(tmp_path, edit)
    assert "'Drusen'" in msg and "tessellated_fundus" in msg and "age_related_macular_degeneration" in msg
    line = _line_of(edit(DEFAULT_PATH.read_text(encoding="utf-8")), '"Drusen"')
    assert f"line {line}" in msg


def test_empty_label_is_an_error(tmp_path):
    def edit(t: str) -> str:
        t = re.sub(r'synonyms_en = \[\n  "laser scars".*?\]\n', "synonyms_en = []\n", t, flags=re.S)
        t = re.sub(r'synonyms_zh = \["激光斑".*?\]\n', "synonyms_zh = []\n", t)
        return t

    msg = _error(tmp_path, edit)
    assert "'laser_scars' is empty" in msg and "line" in msg


def test_other_validation_errors(tmp_path):
    assert "invalid TOML" in _error(tmp_path, lambda t: t + "\n[[labels\n")
    assert "descriptors_en" in _error(
        tmp_path, lambda t: re.sub(r"descriptors_en = \[.*?\]", "descriptors_en = []", t, count=1, flags=re.S)
    )
    assert "appears twice" in _error(tmp_path, lambda t: t.replace('id = "laser_scars"', 'id = "normal"'))
    assert "no [[labels]]" in _error(tmp_path, lambda t: t[: t.index("[[labels]]")])
    with pytest.raises(OntologyError, match="file not found"):
        load_ontology(path=tmp_path / "missing.toml")


# ---- site extensions --------------------------------------------------------------------------------


def _ext(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "site_synonyms.toml"
    path.write_text(body, encoding="utf-8")
    return path


def test_extension_adds_synonyms_without_changing_the_hash(tmp_path):
    ext = _ext(
        tmp_path,
        '[synonyms.diabetic_retinopathy]\nen = ["sugar retinopathy"]\nzh = ["糖眼"]\n'
        '[synonyms.glaucoma]\nuncertain_en = ["disc at risk"]\n',
    )
    onto = load_ontology(extension=ext)
    assert onto.hash == load_ontology().hash and onto.extension_hash
    assert onto.label_ids == load_ontology().label_ids
    x = LabelExtractor(onto)
    assert x.extract("Sugar retinopathy, no macular oedema.").positive == ("diabetic_retinopathy",)
    assert x.extract("右眼糖眼").positive == ("diabetic_retinopathy",)
    assert x.extract("disc at risk").uncertain == ("glaucoma",)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('[synonyms.cataract]\nen = ["lens clouding"]\n', "not in the consortium ontology"),
        ('[[labels]]\nid = "cataract"\n', "may only add synonyms"),
        ('remove = ["glaucoma"]\n', "may only add synonyms"),
        ('[synonyms.glaucoma]\nremove = ["cupping"]\n', "unknown key 'remove'"),
        ('[synonyms.glaucoma]\nen = ["drusen"]\n', "already a synonym of 'age_related_macular_degeneration'"),
    ],
)
def test_extension_can_only_add_synonyms(tmp_path, body, expected):
    with pytest.raises(OntologyError, match=re.escape(expected)) as info:
        load_ontology(extension=_ext(tmp_path, body))
    assert "site_synonyms.toml line" in str(info.value) or "site_synonyms.toml" in str(info.value)


def test_extension_synonym_that_collides_with_a_cue_is_refused(tmp_path):
    onto = load_ontology(extension=_ext(tmp_path, '[synonyms.glaucoma]\nen = ["suspected"]\n'))
    with pytest.raises(OntologyError, match="collides with cue 'suspected'"):
        LabelExtractor(onto)
