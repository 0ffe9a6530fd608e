"""Diffusion core: the rectified-flow objective/denoiser (`flow`), CFG (`guidance`) and samplers (`sampling`)."""

from vidgen.diffusion.flow import RectifiedFlow, expand_t, num_latent_tokens, pad_tokens, time_shift
from vidgen.diffusion.guidance import ClassifierFreeGuidance, batch_conds
from vidgen.diffusion.sampling import (SAMPLERS, generate, hold_clean_frames, sample_euler, sample_heun, seeded_noise,
                                       timesteps)

__all__ = [
    "RectifiedFlow", "expand_t", "num_latent_tokens", "pad_tokens", "time_shift",
    "ClassifierFreeGuidance", "batch_conds",
    "SAMPLERS", "generate", "hold_clean_frames", "sample_euler", "sample_heun", "seeded_noise", "timesteps",
]
