"""The caption-row audit: each rule on hand-made rows, the CLI, the bundled catalog."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.datagen.audit import RULES, AuditInputError, audit_rows, read_rows
from services.datagen.text import synthesize

REPO = Path(__file__).resolve().parents[2]

GOOD = {
    "input_caption": "a navy blue external hard drive on a marble countertop",
    "instruction": "make it red",
    "output_caption": "a red external hard drive on a marble countertop",
}

BAD = {
    "setting_contradiction": {
        "input_caption": "a navy blue external hard drive on a marble countertop",
        "instruction": "make it rain",
        "output_caption": "a navy blue external hard drive on a marble countertop, in the rain",
    },
    "duplicated_words": {
        "input_caption": "a wool scarf on a wooden shelf",
        "instruction": "give it a textured texture",
        "output_caption": "a textured wool scarf on a wooden shelf",
    },
    "stacked_adjectives": {
        "input_caption": "a vintage distressed red floral leather tote bag on a desk",
        "instruction": "make it blue",
        "output_caption": "a vintage distressed blue floral leather tote bag on a desk",
    },
    "impossible_material_colour": {
        "input_caption": "a pearl white 18k gold anklet on a wrist",
        "instruction": "give it a black color",
        "output_caption": "a black 18k gold anklet on a wrist",
    },
    "over_token_limit": {
        "input_caption": "a red mug " + "with a very long and winding description, " * 12,
        "instruction": "make it blue",
        "output_caption": "a blue mug",
    },
}


def counts(*rows: dict) -> dict[str, int]:
    return audit_rows(rows).counts()


def test_rules_have_names_and_descriptions():
    names = [rule.name for rule in RULES]
    assert names == [
        "setting_contradiction",
        "duplicated_words",
        "stacked_adjectives",
        "impossible_material_colour",
        "over_token_limit",
        "near_duplicates",
    ]
    assert all(rule.description for rule in RULES)


def test_good_row_is_clean():
    report = audit_rows([GOOD])
    assert report.clean, report.format_table()


@pytest.mark.parametrize("rule", sorted(BAD))
def test_each_rule_fires_on_its_bad_row(rule):
    report = audit_rows([GOOD, BAD[rule]])
    result = next(r for r in report.results if r.name == rule)
    assert result.count == 1
    assert result.examples[0].row == 1
    assert not report.clean


@pytest.mark.parametrize(
    "row",
    [
        {  # indoor lighting outdoors
            "input_caption": "a red kayak paddle on a riverbank",
            "instruction": "change the lighting to warm indoor light",
            "output_caption": "a red kayak paddle on a riverbank, under warm indoor light",
        },
        {  # phrase repeated
            "input_caption": "a lamp against the wall against the wall",
            "instruction": "make it blue",
            "output_caption": "a blue lamp",
        },
    ],
)
def test_more_bad_rows(row):
    assert sum(counts(row).values()) >= 1


def test_conservative_on_plausible_rows():
    rows = [
        {  # weather outdoors is fine
            "input_caption": "a red umbrella in a city park",
            "instruction": "make it rain",
            "output_caption": "a red umbrella in a city park, in the rain",
        },
        {  # white/rose gold and gold-tone are real
            "input_caption": "a white gold ring and a black gold-tone bangle on a vanity",
            "instruction": "make it rose gold",
            "output_caption": "a rose gold ring on a vanity",
        },
        {  # product nouns naming weather stay allowed indoors
            "input_caption": "a pair of snow boots on a bedroom floor",
            "instruction": "make them black",
            "output_caption": "a pair of black snow boots on a bedroom floor",
        },
    ]
    assert audit_rows(rows).clean, audit_rows(rows).format_table()


def test_near_duplicates_ignore_case_and_punctuation():
    other = {
        **GOOD,
        "input_caption": GOOD["input_caption"].upper() + ".",
        "instruction": "Make it red!",
    }
    result = audit_rows([GOOD, other]).results[-1]
    assert (result.name, result.count, result.examples[0].row) == ("near_duplicates", 1, 1)


def test_examples_are_capped():
    report = audit_rows([BAD["duplicated_words"]] * 5, examples=2)
    result = next(r for r in report.results if r.name == "duplicated_words")
    assert result.count == 5 and len(result.examples) == 2


def test_rows_need_the_text_fields(tmp_path):
    with pytest.raises(AuditInputError):
        audit_rows([{"input_caption": "x"}])
    path = tmp_path / "bad.jsonl"
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(AuditInputError):
        read_rows(path)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.datagen", "audit", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [GOOD, BAD["setting_contradiction"], BAD["impossible_material_colour"]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_cli_reports_broken_rules(rows_file):
    done = run_cli(str(rows_file))
    assert done.returncode == 1, done.stderr
    assert "setting_contradiction" in done.stdout
    assert "impossible_material_colour" in done.stdout
    assert "row 1" in done.stdout


def test_cli_json(rows_file):
    done = run_cli(str(rows_file), "--json", "--examples", "1")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    by_name = {rule["name"]: rule for rule in report["rules"]}
    assert report["rows"] == 3 and not report["clean"]
    assert by_name["setting_contradiction"]["count"] == 1
    assert by_name["setting_contradiction"]["examples"][0]["row"] == 1


def test_cli_clean_and_missing(tmp_path):
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    assert run_cli(str(clean)).returncode == 0
    missing = run_cli(str(tmp_path / "missing.jsonl"))
    assert missing.returncode == 2 and "error:" in missing.stderr


def test_the_old_sampler_s_flaws_are_still_seen():
    # Rows as the catalog made them before scenes carried settings (issue 15's examples):
    # the audit must keep seeing them, whatever the catalog does now.
    old = [
        {
            "input_caption": "a teacup and saucer on a bathroom vanity",
            "instruction": "cover the scene in snow",
            "output_caption": "a teacup and saucer on a bathroom vanity, in falling snow",
        },
        {
            "input_caption": "a pair of skis on a pebbled riverbank, under warm indoor light",
            "instruction": "place the skis on a ski slope",
            "output_caption": "a pair of skis on a ski slope, under warm indoor light",
        },
    ]
    assert audit_rows(old).counts()["setting_contradiction"] == 2


@pytest.mark.parametrize(
    "row",
    [
        # Scene words inside product and look phrases are not the scene.
        {
            "input_caption": "a pair of yellow rain boots on a wooden shelf",
            "instruction": "make them snow white",
            "output_caption": "a pair of snow white rain boots on a wooden shelf",
        },
        {
            "input_caption": "a hoodie on a bed",
            "instruction": "add a retro sunset graphic to it",
            "output_caption": "a hoodie with a retro sunset graphic printed on it on a bed",
        },
        {
            "input_caption": "an emerald green table lamp on a patio",
            "instruction": "recolor the table lamp light gray",
            "output_caption": "a light gray table lamp on a patio",
        },
        # A beach house is a room.
        {
            "input_caption": "a sofa in a beach house",
            "instruction": "light it with warm indoor light",
            "output_caption": "a sofa in a beach house, under warm indoor light",
        },
    ],
)
def test_scene_words_in_product_names_are_not_the_scene(row):
    assert counts(row)["setting_contradiction"] == 0


def test_bundled_catalog_is_clean_at_the_paper_s_size():
    # 100,000 rows per seed, several seeds: tests/datagen/test_catalog_quality.py.
    report = audit_rows(synthesize(3000, seed=0))
    assert report.rows == 3000
    assert report.clean, report.format_table()
