"""The caption rows of a dataset spec, checked before a run is made of them.

Rows a client writes are audited (``services.datagen.audit``) and refused, with each
broken rule's rows, when any rule finds something: a run spends GPU hours on every
row, so a flawed row is cheaper to fix before than after. Captions a client gives are
mapped to rows by the text synthesizer (the paper's "bring your own captions"); every
caption that cannot be mapped is reported, and the request refused, rather than
dropped.
"""

from __future__ import annotations

from services.api.errors import APIError
from services.common.datasets import DatasetSpec, RowInput
from services.datagen.audit import audit_rows
from services.datagen.text.user_captions import map_captions

# Examples per broken rule in a refusal: enough to see the pattern, bounded in size.
AUDIT_EXAMPLES = 5


def checked_rows(spec: DatasetSpec) -> DatasetSpec:
    """The spec with its captions mapped to rows, its given rows audited; raises a 422
    APIError naming every problem."""
    if spec.captions is not None:
        return spec.with_rows(_mapped(spec))
    if spec.rows is not None:
        _audit(spec.rows)
    return spec


def _mapped(spec: DatasetSpec) -> list[RowInput]:
    captions = [c if isinstance(c, str) else c.model_dump(exclude_none=True) for c in spec.captions]
    mapping = map_captions(
        captions,
        seed=spec.seed,
        edits_per_caption=spec.edits_per_caption,
        edit_types=spec.edit_types,
    )
    if mapping.problems:
        raise APIError(
            422,
            "captions_unmapped",
            f"{len(mapping.problems)} of {len(captions)} captions could not be mapped to edit "
            "rows; details lists each (index from 0) with the reason",
            details=[
                {"index": problem.line - 1, "caption": problem.caption, "reason": problem.reason}
                for problem in mapping.problems
            ],
        )
    return [
        RowInput(
            input_caption=row["input_caption"],
            instruction=row["instruction"],
            output_caption=row["output_caption"],
            category=row["category"],
            edit_type=row["edit_type"],
        )
        for row in mapping.rows
    ]


def _audit(rows: list[RowInput]) -> None:
    report = audit_rows((row.model_dump() for row in rows), examples=AUDIT_EXAMPLES)
    if report.clean:
        return
    broken = [result for result in report.results if result.count]
    summary = ", ".join(f"{result.name} ({result.count})" for result in broken)
    raise APIError(
        422,
        "rows_fail_audit",
        f"rows break the data audit: {summary}; details gives each rule's rows by index "
        "(python -m services.datagen audit runs the same audit locally)",
        # The audit's own JSON (as `python -m services.datagen audit --json` prints it),
        # for the broken rules only.
        details=[rule for rule in report.to_dict()["rules"] if rule["count"]],
    )
