"""What diffusers' own pipeline makes of an edit: the reference the engine must equal."""

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
