"""EditParams is the one declaration of every edit parameter: the README table agrees."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.edit_params import (
    BATCH_FIELDS,
    EditForm,
    EditParams,
    batch_key,
    markdown_rows,
    uses_guidance,
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
    assert set(rows) == {"image", "mask", *EditForm.model_fields}
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
    unguided = EditParams(prompt="a", guidance_scale=1.0, image_guidance_scale=1.0)
    assert batch_key((64, 48), base) != batch_key((64, 48), unguided)
    # Output size, format and the mask's options shape what is done after the loop.
    after = base.model_copy(
        update={"output_size": "model", "output_format": "webp", "mask_feather": 0}
    )
    assert batch_key((64, 48), base) == batch_key((64, 48), after)
    for name in BATCH_FIELDS:
        field = EditParams.model_fields[name]
        other = base.model_copy(update={name: _another_value(field, getattr(base, name))})
        assert batch_key((64, 48), base) != batch_key((64, 48), other), name


def _another_value(field, value):
    if value is None:  # an optional field unset (no adapter): any value of it
        return "x"
    if isinstance(value, int):
        return value + 1
    choices = [c for c in field.annotation.__members__.values() if c != value]
    return choices[0]


@pytest.mark.parametrize(
    "text,image,guided",
    [
        (7.5, 1.5, True),
        (7.5, 0.99, True),  # diffusers' rule drops all guidance here
        (1.0, 5.0, True),  # and here
        (0.5, 1.0, True),
        (1.0, 1.0, False),  # the formula is the first branch alone
    ],
)
def test_guidance_runs_unless_both_scales_are_one(text, image, guided):
    params = EditParams(prompt="a", guidance_scale=text, image_guidance_scale=image)
    assert uses_guidance(params) is guided


def test_output_and_mask_fields_have_bounds():
    params = EditParams(prompt="a")
    assert (params.output_size, params.output_format, params.output_quality) == (
        "input",
        "png",
        90,
    )
    assert (params.mask_invert, params.mask_feather) == (False, 8)
    for bad in ({"output_quality": 0}, {"output_quality": 101}, {"mask_feather": -1}):
        with pytest.raises(ValidationError):
            EditParams(prompt="a", **bad)
    with pytest.raises(ValidationError):
        EditParams(prompt="a", output_format="gif")
