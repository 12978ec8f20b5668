"""Fine-tune an InstructPix2Pix model on an edit dataset.

    python -m services.gpu_worker.finetune --dataset SRC --base MODEL --out DEST [options]
    accelerate launch -m services.gpu_worker.finetune ...   (data parallel)

Every hyper-parameter of `FinetuneConfig` is an option (--rank, --learning-rate, ...).
Run the same command again to resume from DEST's last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from typing import Any

from pydantic import ValidationError

from services.gpu_worker.finetune.config import FinetuneConfig


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def _allows_none(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _choices(annotation: Any) -> list[str] | None:
    """The values of a Literal (also inside `Literal[...] | None`)."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is typing.Literal:
            return list(typing.get_args(arg))
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.gpu_worker.finetune",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="datagen export directory, Parquet file, file:// or s3:// URL, or a Hub id",
    )
    parser.add_argument(
        "--base", required=True, help="InstructPix2Pix pipeline: Hub id or local directory"
    )
    parser.add_argument("--out", required=True, help="output directory (checkpoints, result)")
    options = parser.add_argument_group("hyper-parameters (FinetuneConfig)")
    for name, field in FinetuneConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        help_text = field.description or ""
        if field.annotation is bool:
            options.add_argument(
                _option(name),
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
        elif _is_list(field.annotation):
            options.add_argument(_option(name), nargs="+", default=default, help=help_text)
        else:
            choices = _choices(field.annotation)
            if _allows_none(field.annotation):
                help_text += " ('none' for the default)"
                choices = choices and [*choices, "none"]
            options.add_argument(_option(name), default=default, choices=choices, help=help_text)
    return parser


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    values = {}
    for name, field in FinetuneConfig.model_fields.items():
        value = getattr(args, name)
        if isinstance(value, str) and value.lower() == "none" and _allows_none(field.annotation):
            value = None
        values[name] = value
    return FinetuneConfig.model_validate(values)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from services.gpu_worker.finetune.train import FinetuneError, run_finetune

    try:
        result = run_finetune(config, args.dataset, args.base, args.out)
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output = result.adapter_dir or result.pipeline_dir
    if output is not None:
        print(f"fine-tuned {result.steps} steps (final loss {result.final_loss}): {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
