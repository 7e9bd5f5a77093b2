"""Pure-tensor diffusion maths for DiffMIC: noise schedule, forward process, samplers."""

from diffmic.diffusion.process import (
    PRIOR_KINDS,
    antithetic_timesteps,
    posterior_mean_variance,
    predict_y0_from_eps,
    prior_mean,
    q_sample,
)
from diffmic.diffusion.samplers import (
    DDIM_STARTS,
    SAMPLERS,
    EpsFn,
    SampleOutput,
    SamplerSpec,
    ddim_timesteps,
    get_sampler,
    num_noise_draws,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_truncated,
)
from diffmic.diffusion.schedule import BETA_SCHEDULES, NoiseSchedule, extract, make_beta_schedule

__all__ = [
    "BETA_SCHEDULES",
    "DDIM_STARTS",
    "PRIOR_KINDS",
    "SAMPLERS",
    "EpsFn",
    "NoiseSchedule",
    "SampleOutput",
    "SamplerSpec",
    "antithetic_timesteps",
    "ddim_timesteps",
    "extract",
    "get_sampler",
    "make_beta_schedule",
    "num_noise_draws",
    "posterior_mean_variance",
    "predict_y0_from_eps",
    "prior_mean",
    "q_sample",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_truncated",
]
