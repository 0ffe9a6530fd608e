"""Diffusion core: the rectified-flow convention (`flow`), the `Denoiser`, CFG (`guidance`) and samplers."""

from vidgen.diffusion.denoiser import Denoiser, apply_clean_frames
from vidgen.diffusion.flow import RectifiedFlow, expand_t, num_latent_tokens, pad_tokens, time_shift
from vidgen.diffusion.guidance import ClassifierFreeGuidance, batch_conds
from vidgen.diffusion.sampling import SAMPLERS, generate, sample_euler, sample_heun, seeded_noise, timesteps

__all__ = [
    "Denoiser", "apply_clean_frames",
    "RectifiedFlow", "expand_t", "num_latent_tokens", "pad_tokens", "time_shift",
    "ClassifierFreeGuidance", "batch_conds",
    "SAMPLERS", "generate", "sample_euler", "sample_heun", "seeded_noise", "timesteps",
]
