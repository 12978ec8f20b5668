"""Fine-tune an InstructPix2Pix model on an edit dataset.

    python -m services.gpu_worker.finetune --dataset SRC --base MODEL --out DEST [options]
    accelerate launch -m services.gpu_worker.finetune ...   (data parallel)

Every hyper-parameter of `FinetuneConfig` is an option (--rank, --learning-rate, ...).
Run the same command again to resume from DEST's last checkpoint.

DEST is a local directory or a storage URL (`file://<dir>`, `s3://bucket/prefix`; S3
endpoint and region from INSTRUCTEDIT_S3_*). With a URL the run trains in a local work
directory (--work-dir, default one named after DEST under the system's temporary
directory) after downloading DEST's newest checkpoint, uploads each checkpoint as it is
written, and at the end the adapter (or pipeline), metrics.jsonl, finetune.json and the
latest validation renders to DEST: run it again, here or on another machine, to resume.
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
    parser.add_argument(
        "--out",
        required=True,
        help="output directory (checkpoints, result), or a file:// or s3:// storage URL",
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="local directory to train in when --out is a storage URL "
        "(default: one named after --out under the temporary directory)",
    )
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
    from services.gpu_worker.finetune import storage_sync
    from services.gpu_worker.finetune.train import FinetuneError, run_finetune

    to_storage = storage_sync.is_storage_url(args.out)
    if args.work_dir is not None and not to_storage:
        parser.error("--work-dir is for a storage URL --out")
    try:
        if to_storage:
            result = storage_sync.run_finetune_to_storage(
                config, args.dataset, args.base, args.out, work_dir=args.work_dir
            )
        else:
            result = run_finetune(config, args.dataset, args.base, args.out)
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output = result.adapter_dir or result.pipeline_dir
    if output is not None:
        if to_storage:
            output = f"{args.out.rstrip('/')}/{output.name}"
        print(f"fine-tuned {result.steps} steps (final loss {result.final_loss}): {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
