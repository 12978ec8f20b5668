"""The denoising samplers a job may ask for, by name.

Each is a diffusers scheduler class, with the options that make it that sampler, built
with `from_config` of the model's own scheduler config so it keeps the model's noise
schedule. The API validates the name (it never imports diffusers); the worker builds the
scheduler (`build_scheduler`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Scheduler(StrEnum):
    euler_ancestral = "euler_ancestral"
    euler = "euler"
    dpmpp_2m = "dpmpp_2m"
    dpmpp_2m_karras = "dpmpp_2m_karras"
    unipc = "unipc"
    ddim = "ddim"
    lcm = "lcm"


# name -> (diffusers class, options over the model's scheduler config)
SCHEDULERS: dict[Scheduler, tuple[str, dict[str, Any]]] = {
    # InstructPix2Pix's own sampler (timbrooks' edit_cli.py, the released pipeline).
    Scheduler.euler_ancestral: ("EulerAncestralDiscreteScheduler", {}),
    Scheduler.euler: ("EulerDiscreteScheduler", {}),
    Scheduler.dpmpp_2m: (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    Scheduler.dpmpp_2m_karras: (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    Scheduler.unipc: ("UniPCMultistepScheduler", {}),
    # Stable Diffusion's DDIM settings: latents are not clipped like pixels.
    Scheduler.ddim: ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    Scheduler.lcm: ("LCMScheduler", {}),
}

# LCM picks its steps from a 50-step schedule (LCMScheduler's original_inference_steps).
MAX_STEPS: dict[Scheduler, int] = {Scheduler.lcm: 50}


def build_scheduler(name: Scheduler | str, model_config: Any):
    """A new scheduler `name` on the noise schedule of `model_config` (the model's
    `pipe.scheduler.config`)."""
    import diffusers

    class_name, options = SCHEDULERS[Scheduler(name)]
    return getattr(diffusers, class_name).from_config(model_config, **options)
