"""Each sampler name builds the diffusers scheduler it stands for, on the model's schedule."""

import diffusers
import pytest

from services.common.schedulers import SCHEDULERS, Scheduler, build_scheduler
from services.common.tiny_components import build_euler_ancestral_scheduler

MODEL_CONFIG = build_euler_ancestral_scheduler().config

EXPECTED = {
    Scheduler.euler_ancestral: (diffusers.EulerAncestralDiscreteScheduler, {}),
    Scheduler.euler: (diffusers.EulerDiscreteScheduler, {}),
    Scheduler.dpmpp_2m: (
        diffusers.DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    Scheduler.dpmpp_2m_karras: (
        diffusers.DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    Scheduler.unipc: (diffusers.UniPCMultistepScheduler, {}),
    Scheduler.ddim: (diffusers.DDIMScheduler, {"clip_sample": False}),
    Scheduler.lcm: (diffusers.LCMScheduler, {}),
}


def test_every_name_has_a_scheduler():
    assert set(SCHEDULERS) == set(Scheduler) == set(EXPECTED)


@pytest.mark.parametrize("name", list(Scheduler))
def test_each_name_builds_its_scheduler_on_the_models_noise_schedule(name):
    scheduler = build_scheduler(name.value, MODEL_CONFIG)
    cls, options = EXPECTED[name]
    assert type(scheduler) is cls
    for key, value in options.items():
        assert scheduler.config[key] == value, key
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
        assert scheduler.config[key] == MODEL_CONFIG[key], key


def test_each_build_is_a_new_scheduler():
    assert build_scheduler("euler", MODEL_CONFIG) is not build_scheduler("euler", MODEL_CONFIG)
