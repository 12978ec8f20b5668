"""EditParams is the one declaration of every edit parameter: the README table agrees."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.edit_params import (
    BATCH_FIELDS,
    EditParams,
    batch_key,
    markdown_rows,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_parameter_rows() -> dict[str, str]:
    lines = README.read_text().splitlines()
    start = lines.index("| field | default | meaning |")
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("| `"):
            break
        rows[line.split("`")[1]] = line
    return rows


def test_the_readme_table_is_the_declaration():
    rows = readme_parameter_rows()
    assert set(rows) == {"image", *EditParams.model_fields}
    expected = {row.split("`")[1]: row for row in markdown_rows()}
    for name, row in expected.items():
        assert rows[name] == row, (
            f"README row of {name} differs: `python -m services.common.edit_params` prints it"
        )


def test_rows_carry_default_description_and_bounds():
    rows = {row.split("`")[1]: row for row in markdown_rows()}
    assert (
        rows["num_inference_steps"]
        == "| `num_inference_steps` | 20 | denoising steps, 1\u2013100 |"
    )
    assert "| required |" in rows["prompt"] and "1\u2013500 characters" in rows["prompt"]
    assert "| random |" in rows["seed"] and "0\u20132^32-1" in rows["seed"]
    assert "| none |" in rows["negative_prompt"]


def test_prompts_are_stripped_and_a_blank_negative_prompt_is_none():
    params = EditParams(prompt="  make it red \n", negative_prompt="   ")
    assert params.prompt == "make it red"
    assert params.negative_prompt is None
    with pytest.raises(ValidationError):
        EditParams(prompt="   ")


def test_a_seed_is_drawn_when_none_is_given():
    seeds = {EditParams(prompt="x").seed for _ in range(20)}
    assert len(seeds) > 1


def test_batch_key_separates_exactly_the_batch_fields():
    base = EditParams(prompt="a", seed=1)
    same = EditParams(
        prompt="b", seed=2, guidance_scale=9.0, image_guidance_scale=1.2, num_outputs=3
    )
    assert batch_key((64, 48), base) == batch_key((64, 48), same)
    assert batch_key((64, 48), base) != batch_key((48, 64), base)
    unguided = EditParams(prompt="a", guidance_scale=1.0)
    assert batch_key((64, 48), base) != batch_key((64, 48), unguided)
    for name in BATCH_FIELDS:
        field = EditParams.model_fields[name]
        other = base.model_copy(update={name: _another_value(field, getattr(base, name))})
        assert batch_key((64, 48), base) != batch_key((64, 48), other), name


def _another_value(field, value):
    if isinstance(value, int):
        return value + 1
    choices = [c for c in field.annotation.__members__.values() if c != value]
    return choices[0]
