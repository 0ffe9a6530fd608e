"""`python -m vidgen.io.export_diffusers`: a vidgen DiT export (Wan layout) -> diffusers folders.

Round trip: a tiny Wan in diffusers format -> import_wan -> export_diffusers gives the original tensors and configs
back bit for bit, and `WanPipeline.from_pretrained(OUT)` samples what our pipeline samples from the export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_import_wan import Z16, imported, run_cli, wan16  # noqa: F401  (module fixtures)
from test_wan_pipeline import FRAMES, HEIGHT, L, PROMPTS, SEED, SHIFT, WIDTH


@pytest.fixture(scope="module")
def exported(imported, tmp_path_factory):  # noqa: F811
    from vidgen.io.export_diffusers import main

    out = tmp_path_factory.mktemp("diffusers") / "wan_diffusers"
    assert main([str(imported), str(out)]) == 0
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["diffusion_pytorch_model.safetensors"]
    return {k: v for f in files for k, v in load_file(str(folder / f)).items()}


def test_round_trip_gives_the_original_tensors_back(wan16, exported):  # noqa: F811
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    for name in ("transformer", "vae"):
        original, back = _tensors(wan16[name]), _tensors(exported / name)
        assert back.keys() == original.keys()
        for key, value in original.items():
            assert back[key].dtype == value.dtype and torch.equal(back[key], value), f"{name}: {key}"
        config, config_back = (json.loads((f / "config.json").read_text()) for f in (wan16[name], exported / name))
        for key, value in config.items():
            if not key.startswith("_"):
                assert config_back[key] == (list(value) if isinstance(value, tuple) else value), f"{name}: {key}"

    transformer = WanTransformer3DModel.from_pretrained(exported / "transformer")
    ref = wan16["module"].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in transformer.state_dict().items())
    vae = AutoencoderKLWan.from_pretrained(exported / "vae")
    assert vae.config.latents_mean == AutoencoderKLWan.from_pretrained(wan16["vae"]).config.latents_mean
    assert (exported / "text_encoder").resolve() == wan16["text"].resolve()
    assert json.loads((exported / "scheduler" / "scheduler_config.json").read_text())["shift"] == SHIFT


def test_wan_pipeline_loads_the_export_and_samples_like_ours(imported, exported):  # noqa: F811
    from diffusers import WanPipeline

    from vidgen.diffusion.sampling import seeded_noise
    from vidgen.pipeline import DiTPipeline

    ours = DiTPipeline.from_pretrained(imported, device="cpu")
    out = ours(PROMPTS, FRAMES, HEIGHT, WIDTH, steps=3, guidance=5.0, negative_prompt="", seed=SEED)
    pipe = WanPipeline.from_pretrained(exported, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS, negative_prompt="", num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                   num_inference_steps=3, guidance_scale=5.0, max_sequence_length=L, output_type="latent",
                   latents=seeded_noise(tuple(out.latents.shape), SEED)).frames
    diff = (out.latents - ref).abs().max().item()
    assert diff < 1e-4, f"WanPipeline.from_pretrained(export) differs from our pipeline by {diff:.3g}"


def test_configs_without_a_diffusers_counterpart_are_refused_in_one_line(imported, tmp_path, capsys):  # noqa: F811
    from vidgen.io.checkpoint import read_parts, write_export
    from vidgen.io.export_diffusers import main, vae_files
    from vidgen.io.pretrained import WeightsError, save_pretrained
    from vidgen.models.vae import VideoVAE

    parts = read_parts(imported)
    parts.parts["dit"].config["text_mask"] = True  # masks the text padding: diffusers' Wan attends to it
    write_export(parts, tmp_path / "masked")
    err = run_cli(main, [str(tmp_path / "masked"), str(tmp_path / "out")], capsys)
    assert "text_mask=True does not map to diffusers' WanTransformer3DModel" in err
    assert not (tmp_path / "out").exists()

    parts.parts["dit"].config.update(text_mask=False, abs_pos=True)  # the demo's absolute positions: not in Wan
    write_export(parts, tmp_path / "placed")
    assert "abs_pos=True does not map" in run_cli(main, [str(tmp_path / "placed"), str(tmp_path / "out")], capsys)
    parts.parts["dit"].config["abs_pos"] = False
    parts.adapters = {"lora": {"blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32),
                               "blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 2)}}
    write_export(parts, tmp_path / "lora")
    assert "--merge" in run_cli(main, [str(tmp_path / "lora"), str(tmp_path / "out")], capsys)

    vae = VideoVAE(latent_channels=Z16, base_channels=8, num_res_blocks=[1, 2, 2, 2])
    save_pretrained(vae, tmp_path / "vae")
    with pytest.raises(WeightsError, match=r"num_res_blocks=\[1, 2, 2, 2\].*does not map"):
        vae_files(tmp_path / "vae")
    save_pretrained(VideoVAE(latent_channels=Z16, base_channels=8, channel_mult=[1, 2], temporal_downsample=[True],
                             num_res_blocks=1, patch_size=2), tmp_path / "patched")
    with pytest.raises(WeightsError, match=r"patch_size=2 .*no diffusers"):
        vae_files(tmp_path / "patched")

    assert "no such checkpoint" in run_cli(main, [str(tmp_path / "nothing"), str(tmp_path / "out")], capsys)
