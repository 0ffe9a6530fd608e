"""End-to-end parity with diffusers' `WanPipeline`: a tiny random Wan 2.1 (UMT5 + transformer + VAE) imported into
our DiT / VideoVAE / HFTextEncoder samples the same latents through `DiTPipeline` (same noise, 3 Euler steps, CFG).

Everything is built offline in tmp_path: a word-level tokenizer with T5-like specials, a random `UMT5EncoderModel`,
a random `WanTransformer3DModel` and a random `AutoencoderKLWan` saved in diffusers layout.
"""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["a cat on a mat", "a dog in the fog on a red mat"]
L = 16  # max_sequence_length: both prompts are shorter, so every context has zero-padded tokens
SHIFT = 3.0
SEED = 7
FRAMES, HEIGHT, WIDTH = 5, 32, 32  # -> latents [B, 4, 2, 4, 4]; 8 tokens per sample with patch (1, 2, 2)
Z_DIM = 4
WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=Z_DIM,
                out_channels=Z_DIM, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)


def _tokenizer():
    """An offline word-level tokenizer with T5-like specials (pad 0, </s> 1, <unk> 2) and an EOS post-processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(PROMPTS + ["red car", "a bird"], trainers.WordLevelTrainer(
        special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def save_tiny_umt5(folder) -> None:
    """A tiny random UMT5 encoder (width 32) + the offline tokenizer, saved as one transformers folder."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).save_pretrained(folder)


@pytest.fixture(scope="module")
def wan_tiny(tmp_path_factory):
    """(folder of the UMT5 + tokenizer, diffusers transformer, folder of the diffusers VAE), all random and tiny."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    root = tmp_path_factory.mktemp("wan_tiny")
    save_tiny_umt5(root / "text")

    torch.manual_seed(1)
    transformer = WanTransformer3DModel(**WAN_TINY).eval()
    with torch.no_grad():
        for p in transformer.parameters():  # non-trivial norms / modulation / output projection
            p.normal_(0, 0.2)

    torch.manual_seed(2)
    vae = AutoencoderKLWan(base_dim=8, z_dim=Z_DIM, num_res_blocks=1, latents_mean=[0.1, -0.2, 0.3, 0.0],
                           latents_std=[1.5, 2.0, 0.5, 1.0]).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae.save_pretrained(root / "vae")
    return root / "text", transformer, root / "vae"


def _diffusers_pipeline(wan_tiny):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    text, transformer, vae = wan_tiny
    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(text, local_files_only=True),
                       text_encoder=UMT5EncoderModel.from_pretrained(text, local_files_only=True).eval(),
                       transformer=transformer, vae=AutoencoderKLWan.from_pretrained(vae).eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _our_pipeline(wan_tiny):
    from vidgen.conditioning import Conditioner, TextCondition
    from vidgen.diffusion.flow import RectifiedFlow
    from vidgen.io.convert_wan_dit import convert_wan_state_dict, dit_config_from_diffusers
    from vidgen.io.convert_wan_vae import load_wan_vae_from_diffusers
    from vidgen.models.dit import DiT
    from vidgen.models.text import HFTextEncoder
    from vidgen.pipeline import DiTPipeline

    text, transformer, vae = wan_tiny
    dit = DiT(**dit_config_from_diffusers(dict(transformer.config)))
    dit.load_state_dict(convert_wan_state_dict(transformer.state_dict()), strict=True)
    encoder = HFTextEncoder(str(text), max_length=L, padding="max_length")
    conditioner = Conditioner(text=TextCondition(encoder, dropout=0.0))
    return DiTPipeline(dit, conditioner, load_wan_vae_from_diffusers(vae), RectifiedFlow()).to("cpu")


def test_wan21_pipeline_matches_diffusers_wan_pipeline(wan_tiny):
    from vidgen.diffusion.sampling import seeded_noise

    ours = _our_pipeline(wan_tiny)
    assert ours.dit.text_mask is False  # dit_config_from_diffusers: Wan attends to the zero text padding
    t, h, w = ours.latent_size(FRAMES, HEIGHT, WIDTH)
    noise = seeded_noise((len(PROMPTS), Z_DIM, t, h, w), SEED)  # what our pipeline draws for seed=SEED

    ref_pipe = _diffusers_pipeline(wan_tiny)
    call = dict(prompt=PROMPTS, negative_prompt="", num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                num_inference_steps=3, guidance_scale=5.0, max_sequence_length=L, latents=noise.clone())
    with torch.no_grad():
        ref = ref_pipe(**call, output_type="latent").frames
        # The same run decoded: the pipeline denormalises with the VAE config's latents_mean / latents_std.
        ref_video = ref_pipe(**call, output_type="pt").frames  # [B, T, 3, H, W] in [0, 1]
    assert ref.shape == noise.shape == (2, Z_DIM, 2, 4, 4)

    kwargs = dict(num_frames=FRAMES, height=HEIGHT, width=WIDTH, steps=3, guidance=5.0, negative_prompt="",
                  seed=SEED, sampler="euler", shift=SHIFT)
    out = ours(PROMPTS, **kwargs)
    diff = (out.latents - ref).abs().max().item()
    assert (ref - noise).abs().max() > 0.1  # the sampler moved the latents
    assert diff < 1e-4, f"latents differ from diffusers' WanPipeline by {diff:.3g}"

    # Our latent normalisation is the pipeline's: same decoded video ([-1, 1] -> its [0, 1] frames).
    video = ((out.video + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)
    video_diff = (video - ref_video).abs().max().item()
    assert video_diff < 1e-4, f"decoded video differs by {video_diff:.3g}"

    # The text-mask property matters: masking the zero padding (what diffusers does not do) changes the samples.
    ours.dit.text_mask = True
    masked = ours(PROMPTS, **kwargs)
    masked_diff = (masked.latents - ref).abs().max().item()
    assert masked_diff > 1e-3, f"text_mask=True should not match Wan (differs by only {masked_diff:.3g})"
    print(f"max abs diff: text_mask=False {diff:.3g}, text_mask=True {masked_diff:.3g}, video {video_diff:.3g}")
