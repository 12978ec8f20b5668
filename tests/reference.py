"""What diffusers' own pipeline makes of an edit: the reference the engine must equal.

One difference is deliberate, InstructPix2Pix's guidance rule: the paper's three-branch
formula runs whenever either scale differs from 1 (timbrooks' edit_cli.py always runs
it), where diffusers' pipeline drops all guidance for S_T <= 1 or S_I < 1. The reference
is the stock pipeline with its rule replaced by the paper's, so for those scales it
computes the paper's formula from the three branches, in the stock loop.
"""

from __future__ import annotations

from PIL import Image

from services.common.diffusion import pipeline_class_name
from services.common.edit_params import EditParams
from services.common.schedulers import build_scheduler

SDXL_PIPELINE = "StableDiffusionXLInstructPix2PixPipeline"


def stock_edit(model_dir: str, image: Image.Image, params: EditParams | dict) -> list:
    """The stock pipeline of the model's family (the class its model_index.json names)
    with the job's sampler set, run on `image` as the job asks; a list of PIL images."""
    import torch
    from diffusers import DiffusionPipeline

    params = EditParams.model_validate(params)
    sdxl = pipeline_class_name(model_dir) == SDXL_PIPELINE
    # SDXL: no invisible watermark (nor do we add one), and the image's own size rather
    # than the pipeline's native default.
    options = {"add_watermarker": False} if sdxl else {}
    size = {"height": image.height, "width": image.width} if sdxl else {}
    pipe = DiffusionPipeline.from_pretrained(model_dir, **options)
    _follow_the_papers_guidance_rule(pipe)
    pipe.scheduler = build_scheduler(params.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt=params.prompt,
        image=image,
        negative_prompt=params.negative_prompt,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        image_guidance_scale=params.image_guidance_scale,
        num_images_per_prompt=params.num_outputs,
        generator=torch.Generator().manual_seed(params.seed),
        **size,
    ).images


def _paper_rule(pipe) -> bool:
    return pipe.guidance_scale != 1.0 or pipe.image_guidance_scale != 1.0


def _follow_the_papers_guidance_rule(pipe) -> None:
    stock = type(pipe)
    if not isinstance(getattr(stock, "do_classifier_free_guidance", None), property):
        # SDXL's pipeline decides in a local variable of __call__: its reference holds
        # only where both rules agree (S_T > 1 and S_I >= 1, or both 1).
        return
    pipe.__class__ = type(
        stock.__name__, (stock,), {"do_classifier_free_guidance": property(_paper_rule)}
    )
