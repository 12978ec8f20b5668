"""Bring your own captions: services/datagen/text/user_captions.py and
``python -m services.datagen text --captions FILE``."""

from __future__ import annotations

import difflib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.datagen.__main__ import main
from services.datagen.audit import audit_rows
from services.datagen.text.articles import with_article
from services.datagen.text.user_captions import (
    CaptionFileError,
    CaptionInput,
    CaptionLine,
    CaptionParseError,
    map_caption_file,
    map_captions,
    parse_caption,
    read_captions,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "data" / "user_captions.jsonl"
GLUE = {"a", "an", "of", "next", "to", "with", "against", "on", "it", "them"}


def _words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", text.lower())


def _word_diff(before: str, after: str) -> tuple[list[str], list[str]]:
    """(removed words, inserted words) between two captions."""
    a, b = _words(before), _words(after)
    removed, inserted = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op != "equal":
            removed += a[i1:i2]
            inserted += b[j1:j2]
    return removed, inserted


def _assert_only_edited_words_change(row: dict) -> None:
    removed, inserted = _word_diff(row["input_caption"], row["output_caption"])
    changed = row["changed_slots"]
    old_words = {w for s in changed for w in _words(row["input_slots"][s])}
    new_words = {w for s in changed for w in _words(row["output_slots"][s])}
    assert set(removed) <= old_words | {"a", "an"}, row
    assert set(inserted) <= new_words | GLUE, row
    assert removed or inserted


def _by_type(rows: list[dict]) -> dict[str, dict]:
    return {row["edit_type"]: row for row in rows}


# --- parsing -----------------------------------------------------------------


def test_parses_attributes_product_and_scene(catalog):
    category = catalog.category("apparel")
    surface, companion = category.surfaces[0], category.companions[0]
    text = f"A black cotton hoodie next to {with_article(companion)} {surface}, at sunset"
    parsed = parse_caption(text, catalog)
    assert parsed.category.name == "apparel"
    assert parsed.slots["product"] == "hoodie"
    assert parsed.slots["color"] == "black" and parsed.slots["material"] == "cotton"
    assert parsed.slots["companion"] == companion and parsed.slots["surface"] == surface
    assert parsed.slots["lighting"] == "at sunset"
    piece = parsed.pieces["color"]
    assert text[piece.value_start : piece.value_end] == "black"
    assert text[parsed.pieces["surface"].start : parsed.pieces["surface"].end] == " " + surface
    assert not parsed.unknown_after and not parsed.unknown_before


def test_longest_noun_wins_and_companion_nouns_are_not_the_product(catalog):
    assert parse_caption("a black leather jacket", catalog).slots["product"] == "leather jacket"
    # "pair of sunglasses" is a product elsewhere, but here it is the apparel companion.
    parsed = parse_caption("a white t-shirt next to a pair of sunglasses", catalog)
    assert parsed.slots["product"] == "t-shirt"
    assert parsed.slots["companion"] == "pair of sunglasses"


def test_unknown_product_raises_a_clear_reason(catalog):
    with pytest.raises(CaptionParseError, match="no product noun the catalog knows"):
        parse_caption("my favourite gadget", catalog)
    with pytest.raises(CaptionParseError, match="unknown category"):
        parse_caption(CaptionInput(caption="a black hoodie", category="spaceships"), catalog)
    with pytest.raises(CaptionParseError, match="does not appear"):
        parse_caption(CaptionInput(caption="a black hoodie", product="sweater"), catalog)


# --- mapping -----------------------------------------------------------------


def test_black_hoodie_rows_change_only_the_edited_phrase(catalog):
    mapping = map_captions(["black hoodie"], seed=0, edits_per_caption=6, catalog=catalog)
    assert not mapping.problems
    rows = mapping.rows
    assert len(rows) == 6
    assert len({row["edit_type"] for row in rows}) == 6  # different edit types
    for row in rows:
        assert row["input_caption"] == "black hoodie"
        assert row["source_line"] == 1 and row["category"] == "apparel"
        assert "hoodie" in row["output_caption"]
        _assert_only_edited_words_change(row)


def test_color_change_replaces_the_color_in_place(catalog):
    for seed in range(5):
        (row,) = map_captions(
            ["A black hoodie on the floor."],
            seed=seed,
            edits_per_caption=1,
            edit_types={"color_change"},
            catalog=catalog,
        ).rows
        new = row["output_slots"]["color"]
        assert new != "black"
        expected = with_article(new)
        assert row["output_caption"] == f"{expected[0].upper()}{expected[1:]} hoodie on the floor."
        assert row["changed_slots"] == ["color"]


def test_weather_is_added_only_outdoors(catalog):
    category = catalog.category("apparel")
    outdoor, indoor = category.outdoor_places[0], category.indoor_places[0]
    sky = {"weather_change", "season_change"}
    mapping = map_captions(
        [f"a red t-shirt {outdoor}", f"a red t-shirt {indoor}", "a red t-shirt"],
        edit_types=sky,
        catalog=catalog,
    )
    assert {row["source_line"] for row in mapping.rows} == {1}
    for row in mapping.rows:
        clause = row["output_slots"]["weather"] or row["output_slots"]["season"]
        assert row["output_caption"] == f"a red t-shirt {outdoor}, {clause}"
    assert [(p.line, p.reason) for p in mapping.problems] == [
        (2, "no edit type applies to this caption"),
        (3, "no edit type applies to this caption"),
    ]


def test_art_style_prefixes_the_medium_and_keeps_casing(catalog):
    (row,) = map_captions(
        ["A Black hoodie"], edit_types={"art_style"}, edits_per_caption=1, catalog=catalog
    ).rows
    medium = row["output_slots"]["medium"]
    article = with_article(medium)
    assert row["output_caption"] == f"{article[0].upper()}{article[1:]} of a Black hoodie"


def test_a_caption_without_an_article_gets_one_under_a_medium(catalog):
    (row,) = map_captions(
        ["black hoodie"], edit_types={"art_style"}, edits_per_caption=1, catalog=catalog
    ).rows
    assert row["output_caption"].endswith(" of a black hoodie")


def test_removal_takes_the_phrase_and_its_glue(catalog):
    companion = catalog.category("apparel").companions[0]
    text = f"a red hoodie next to {with_article(companion)}, in black and white"
    (row,) = map_captions(
        [text], edit_types={"object_removal"}, edits_per_caption=1, catalog=catalog
    ).rows
    assert row["output_caption"] == "a red hoodie, in black and white"


def test_article_follows_the_new_first_word(catalog):
    outputs = set()
    for seed in range(12):
        for row in map_captions(
            ["an orange hoodie"], seed=seed, edit_types={"color_change"}, catalog=catalog
        ).rows:
            new = row["output_slots"]["color"]
            assert row["output_caption"] == f"{with_article(new)} hoodie"
            outputs.add(row["output_caption"].split()[0])
    assert "a" in outputs


def test_unknown_words_after_the_product_block_scene_insertions(catalog):
    mapping = map_captions(["a black hoodie on my desk"], edits_per_caption=30, catalog=catalog)
    assert mapping.rows
    for row in mapping.rows:
        assert row["output_caption"].count(" on my desk") == 1
        assert not {"surface", "place", "companion", "weather", "season"} & set(
            row["changed_slots"]
        )


def test_json_attributes_override_and_locate_their_words(catalog):
    (row,) = map_captions(
        [{"caption": "a hoodie in black", "attributes": {"color": "black"}}],
        edit_types={"color_change"},
        edits_per_caption=1,
        catalog=catalog,
    ).rows
    assert row["input_slots"]["color"] == "black"
    assert row["output_caption"] == f"a hoodie in {row['output_slots']['color']}"


def test_bad_fields_are_reported_with_their_line(catalog):
    items = [
        {"caption": "a black hoodie", "attributes": {"color": "plutonium"}},
        {"caption": "a black hoodie", "attributes": {"sparkle": "yes"}},
        {"caption": "a black hoodie", "colour": "red"},
        {"caption": "a red hoodie", "category": "toys"},
        "my favourite gadget",
        "black hoodie",
        "Black  hoodie",
        42,
    ]
    mapping = map_captions(items, catalog=catalog)
    reasons = {problem.line: problem.reason for problem in mapping.problems}
    assert "not a color the catalog allows for hoodie" in reasons[1]
    assert "unknown attribute slot 'sparkle'" in reasons[2]
    assert "unknown key 'colour'" in reasons[3]
    assert "no product noun the catalog knows" in reasons[4]
    assert "no product noun the catalog knows" in reasons[5]
    assert reasons[7] == "same caption as line 6"
    assert "expected a caption text or object" in reasons[8]
    assert {row["source_line"] for row in mapping.rows} == {6}
    assert mapping.captions == 8 and mapping.mapped == 1


def test_same_seed_same_rows_and_rows_do_not_depend_on_other_captions(catalog):
    captions = ["black hoodie", "a red skateboard", "a white ceramic coffee mug"]
    first = map_captions(captions, seed=3, catalog=catalog).rows
    assert first == map_captions(captions, seed=3, catalog=catalog).rows
    assert first != map_captions(captions, seed=4, catalog=catalog).rows
    # Caption i's rows depend on (seed, i, caption) only.
    alone = map_captions(["black hoodie"], seed=3, catalog=catalog).rows
    strip = ("index", "source_line")
    assert [{k: v for k, v in r.items() if k not in strip} for r in alone] == [
        {k: v for k, v in r.items() if k not in strip} for r in first[: len(alone)]
    ]


def test_arguments_are_checked(catalog):
    with pytest.raises(ValueError, match="unknown edit types"):
        map_captions(["black hoodie"], edit_types={"teleport"}, catalog=catalog)
    with pytest.raises(ValueError, match="at least 1"):
        map_captions(["black hoodie"], edits_per_caption=0, catalog=catalog)


def test_fixture_captions_all_map_to_rows_the_audit_passes(catalog):
    mapping = map_caption_file(FIXTURE, seed=0, catalog=catalog)
    assert mapping.problems == []
    assert mapping.captions >= 30 and mapping.mapped == mapping.captions
    rows = mapping.rows
    assert len(rows) == 3 * mapping.captions
    assert len({row["category"] for row in rows}) >= 8
    report = audit_rows(rows)
    assert report.clean, report.format_table()
    for row in rows:
        assert row["output_caption"] != row["input_caption"]
        assert row["changed_slots"]
        assert all(row["input_slots"][s] != row["output_slots"][s] for s in row["changed_slots"])
    assert [row["index"] for row in rows] == list(range(len(rows)))
    assert {row.get("caption_id") for row in rows} >= {"sku-1001", 7}


# --- reading -------------------------------------------------------------------


def test_reads_plain_text_skipping_blanks_and_comments(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("# my shop\nblack hoodie\n\n  a red skateboard  \n", encoding="utf-8")
    source = read_captions(path)
    assert source.captions == [CaptionLine(2, "black hoodie"), CaptionLine(4, "a red skateboard")]
    assert source.problems == []


def test_reads_json_lines_and_reports_broken_lines(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text(
        '"black hoodie"\n{"caption": "a red skateboard", "id": "x"}\n{"caption": \n[1, 2]\n',
        encoding="utf-8",
    )
    source = read_captions(path)
    assert [c.line for c in source.captions] == [1, 2]
    assert source.captions[1].value == {"caption": "a red skateboard", "id": "x"}
    assert [(p.line, p.reason.split(":")[0]) for p in source.problems] == [
        (3, "not valid JSON"),
        (4, "expected a JSON object or string, got list"),
    ]


def test_a_missing_file_raises(tmp_path):
    with pytest.raises(CaptionFileError, match="cannot read"):
        read_captions(tmp_path / "nope.jsonl")


# --- command line ---------------------------------------------------------------


def test_cli_maps_a_file_as_a_subprocess(tmp_path):
    out = tmp_path / "rows.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "services.datagen", "text", "--captions", str(FIXTURE),
         "--edits-per-caption", "2", "--seed", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == map_caption_file(FIXTURE, seed=1, edits_per_caption=2).rows
    assert f"wrote {len(rows)} rows" in result.stderr


def test_cli_reports_problems_and_exit_codes(tmp_path, capsys):
    captions = tmp_path / "mine.txt"
    captions.write_text("black hoodie\nmy favourite gadget\n", encoding="utf-8")
    out = tmp_path / "rows.jsonl"
    assert main(["text", "--captions", str(captions), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{captions}:2: no product noun" in err and "my favourite gadget" in err
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3
    assert main(["text", "--captions", str(captions), "--out", str(out), "--strict"]) == 1

    useless = tmp_path / "useless.txt"
    useless.write_text("my favourite gadget\n", encoding="utf-8")
    assert main(["text", "--captions", str(useless), "--out", str(tmp_path / "none.jsonl")]) == 2
    assert not (tmp_path / "none.jsonl").exists()
    assert main(["text", "--captions", str(tmp_path / "missing.txt"), "--out", str(out)]) == 2
    assert "cannot read" in capsys.readouterr().err
