"""The reference for edits with an adapter: diffusers' stock pipeline after
`load_lora_weights` of the adapter, run as tests/reference.py runs it."""

from __future__ import annotations

from unittest import mock

from PIL import Image

from services.common.edit_params import EditParams
from tests.reference import stock_edit


def stock_edit_with_lora(model_dir: str, image: Image.Image, params, lora_dir) -> list:
    """stock_edit's pipeline with the LoRA in `lora_dir` loaded (`load_lora_weights`, at
    its default weight of 1) before it runs."""
    from diffusers import DiffusionPipeline

    load = DiffusionPipeline.from_pretrained

    def with_lora(*args, **kwargs):
        pipe = load(*args, **kwargs)
        pipe.load_lora_weights(str(lora_dir))
        return pipe

    params = EditParams.model_validate(params).model_copy(update={"adapter": None})
    with mock.patch.object(DiffusionPipeline, "from_pretrained", with_lora):
        return stock_edit(model_dir, image, params)
