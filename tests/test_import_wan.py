"""`python -m vidgen.io.import_wan`: local Wan 2.1 T2V weights (diffusers folders or the original single files) -> a
vidgen export folder that `DiTPipeline.from_pretrained` samples exactly like diffusers' `WanPipeline`.

Everything is tiny, random and saved to tmp_path (the builders of tests/test_wan_pipeline.py): a diffusers
transformer saved in shards, a 16-channel `AutoencoderKLWan` with Wan's published latent statistics, and the same
weights renamed to the original release's key layout (checked against diffusers' own single-file converters).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_wan_pipeline import (FRAMES, HEIGHT, L, PROMPTS, SEED, SHIFT, WAN_TINY, WIDTH, _diffusers_pipeline,
                               save_tiny_umt5)
from vidgen.errors import one_line_errors

Z16 = 16  # Wan's VAE width, so the original-layout VAE gets Wan's published latent statistics
WAN16 = {**WAN_TINY, "in_channels": Z16, "out_channels": Z16}
NUM_RES_BLOCKS = 2  # Wan 2.1's (diffusers' single-file VAE converter assumes it)
ORIGINAL_CONFIG = {"_class_name": "WanModel", "model_type": "t2v", "patch_size": [1, 2, 2], "dim": 32,
                   "num_heads": 2, "num_layers": 2, "ffn_dim": 64, "freq_dim": 32, "text_dim": 32, "in_dim": Z16,
                   "out_dim": Z16, "eps": 1e-6, "qk_norm": True, "cross_attn_norm": True, "text_len": 512}


# ------------------------------------------------------------------ diffusers -> original names (test-side inverse)
_TOP = {"condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
        "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
        "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
        "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
        "condition_embedder.time_proj.": "time_projection.1.", "proj_out.": "head.head.",
        "scale_shift_table": "head.modulation", "patch_embedding.": "patch_embedding."}
_IN_BLOCK = {"attn1.to_out.0.": "self_attn.o.", "attn2.to_out.0.": "cross_attn.o.", "norm2.": "norm3.",
             "ffn.net.0.proj.": "ffn.0.", "ffn.net.2.": "ffn.2.", "scale_shift_table": "modulation",
             **{f"attn{i}.{a}.": f"{n}.{b}." for i, n in ((1, "self_attn"), (2, "cross_attn"))
                for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("norm_q", "norm_q"), ("norm_k", "norm_k"))}}


def _rename(key: str, table: dict[str, str]) -> str:
    hit = next(k for k in table if key.startswith(k))
    return table[hit] + key[len(hit):]


def dit_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        m = re.match(r"^(blocks\.\d+\.)(.*)$", key)
        out[m.group(1) + _rename(m.group(2), _IN_BLOCK) if m else _rename(key, _TOP)] = value
    return out


def vae_to_original(sd: dict[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    resnet = {"norm1.": "residual.0.", "conv1.": "residual.2.", "norm2.": "residual.3.", "conv2.": "residual.6.",
              "conv_shortcut.": "shortcut."}
    fixed = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
             "decoder.conv_in.": "decoder.conv1.", "encoder.norm_out.": "encoder.head.0.",
             "encoder.conv_out.": "encoder.head.2.", "decoder.norm_out.": "decoder.head.0.",
             "decoder.conv_out.": "decoder.head.2."}
    middle = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}
    out = {}
    for key, value in sd.items():
        if m := re.match(r"^(encoder|decoder)\.mid_block\.(resnets\.\d|attentions\.0)\.(.*)$", key):
            new = f"{m.group(1)}.middle.{middle[m.group(2)]}.{_rename(m.group(3), {**resnet, '': ''})}"
        elif m := re.match(r"^encoder\.down_blocks\.(\d+)\.(.*)$", key):
            new = f"encoder.downsamples.{m.group(1)}.{_rename(m.group(2), {**resnet, '': ''})}"
        elif m := re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$", key):
            j = int(m.group(3)) if m.group(3) is not None else num_res_blocks + 1
            rest = _rename(m.group(4), {**resnet, "": ""})
            new = f"decoder.upsamples.{int(m.group(1)) * (num_res_blocks + 2) + j}.{rest}"
        else:
            new = _rename(key, fixed)
        out[new] = value
    return out


# ------------------------------------------------------------------ the tiny Wan, in both layouts
@pytest.fixture(scope="module")
def wan16(tmp_path_factory):
    """Paths of a tiny random Wan 2.1 in diffusers layout and in the original layout, + the transformer module."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    root = tmp_path_factory.mktemp("wan16")
    save_tiny_umt5(root / "text")
    torch.manual_seed(1)
    transformer = WanTransformer3DModel(**WAN16).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.2)
    transformer.save_pretrained(root / "transformer", max_shard_size="60KB")  # shards + index json
    torch.manual_seed(2)
    vae = AutoencoderKLWan(base_dim=8, z_dim=Z16, num_res_blocks=NUM_RES_BLOCKS).eval()  # Wan's latents_mean/std
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae.save_pretrained(root / "vae")

    original = dit_to_original(transformer.state_dict())
    torch.save({"model.diffusion_model." + k: v for k, v in original.items()}, root / "wan_t2v.pth")  # ComfyUI names
    (root / "orig_transformer").mkdir()
    save_file({k: v.contiguous() for k, v in original.items()},
              str(root / "orig_transformer" / "diffusion_pytorch_model.safetensors"))
    (root / "orig_transformer" / "config.json").write_text(json.dumps(ORIGINAL_CONFIG))
    torch.save(vae_to_original(vae.state_dict(), NUM_RES_BLOCKS), root / "Wan2.1_VAE.pth")
    return {"root": root, "text": root / "text", "transformer": root / "transformer", "vae": root / "vae",
            "module": transformer}


@pytest.fixture(scope="module")
def imported(wan16, tmp_path_factory):
    """The diffusers-layout tiny Wan imported as an export folder (sampling defaults sized for the tiny model)."""
    from vidgen.io.import_wan import import_wan

    out = tmp_path_factory.mktemp("imported") / "wan_export"
    return import_wan(wan16["transformer"], wan16["vae"], wan16["text"], out, max_length=L, shift=SHIFT,
                      num_frames=FRAMES, height=HEIGHT, width=WIDTH)


def run_cli(main, argv: list[str], capsys) -> str:
    """An entry point under `one_line_errors`: exit code 2 and the one stderr line it printed."""
    capsys.readouterr()  # drop what ran before
    with pytest.raises(SystemExit) as e:
        one_line_errors(main)(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------ tests
def test_original_key_layout_matches_diffusers_converters(wan16):
    """Our original -> diffusers renames agree with diffusers' own single-file converters (transformer and VAE)."""
    from diffusers.loaders.single_file_utils import (convert_wan_transformer_to_diffusers,
                                                     convert_wan_vae_to_diffusers)
    from vidgen.io.convert_wan_dit import original_to_diffusers
    from vidgen.io.convert_wan_vae import original_vae_config, original_vae_to_diffusers

    sd = wan16["module"].state_dict()
    original = dit_to_original(sd)
    assert "blocks.0.self_attn.q.weight" in original and "head.head.weight" in original
    assert "blocks.0.norm3.weight" in original and "text_embedding.0.weight" in original
    assert set(convert_wan_transformer_to_diffusers(dict(original))) == set(sd)
    assert original_to_diffusers(original).keys() == sd.keys()

    vae_sd = load_file(str(wan16["vae"] / "diffusion_pytorch_model.safetensors"))
    vae_original = torch.load(wan16["root"] / "Wan2.1_VAE.pth", weights_only=True)
    assert set(convert_wan_vae_to_diffusers(dict(vae_original))) == set(vae_sd)
    cfg = original_vae_config(vae_original)
    assert cfg == {"base_dim": 8, "z_dim": Z16, "in_channels": 3, "dim_mult": [1, 2, 4, 4],
                   "num_res_blocks": NUM_RES_BLOCKS, "temperal_downsample": [False, True, True]}
    renamed = original_vae_to_diffusers(vae_original, cfg)
    assert renamed.keys() == vae_sd.keys() and all(torch.equal(renamed[k], vae_sd[k]) for k in vae_sd)


def _export_content(folder: Path) -> dict:
    """What must agree between two imports of the same weights: meta, part configs, every tensor."""
    export = json.loads((folder / "vidgen.json").read_text())
    export["meta"]["vae"].pop("path")  # each export's own out/vae
    configs = {name: json.loads((folder / name / "config.json").read_text()) for name in ("dit", "cond.text", "vae")}
    configs["vae"].pop("source")
    tensors = {name: load_file(str(folder / name / "model.safetensors")) for name in ("dit", "vae")}
    assert not (folder / "cond.text" / "model.safetensors").exists()  # the frozen UMT5 is referenced, not copied
    return {"parts": export["parts"], "meta": export["meta"], "configs": configs, "tensors": tensors}


def _assert_same(a: dict, b: dict) -> None:
    assert a["parts"] == b["parts"] and a["meta"] == b["meta"] and a["configs"] == b["configs"]
    for name in a["tensors"]:
        assert a["tensors"][name].keys() == b["tensors"][name].keys()
        for key, value in a["tensors"][name].items():
            assert value.dtype == b["tensors"][name][key].dtype and torch.equal(value, b["tensors"][name][key]), key


def test_diffusers_and_original_layouts_give_identical_exports(wan16, imported, tmp_path):
    from vidgen.io.import_wan import WAN_NEGATIVE_PROMPT, import_wan

    reference = _export_content(imported)
    sizes = dict(max_length=L, shift=SHIFT, num_frames=FRAMES, height=HEIGHT, width=WIDTH)
    root = wan16["root"]
    single = import_wan(root / "wan_t2v.pth", root / "Wan2.1_VAE.pth", wan16["text"], tmp_path / "a", num_heads=2,
                        **sizes)  # one original file, config from the shapes (+ num_heads), ComfyUI prefix
    folder = import_wan(root / "orig_transformer", root / "Wan2.1_VAE.pth", wan16["text"], tmp_path / "b",
                        **sizes)  # the original release's folder: WanModel config.json + weights
    _assert_same(_export_content(single), reference)
    _assert_same(_export_content(folder), reference)

    export = json.loads((imported / "vidgen.json").read_text())
    meta = export["meta"]
    assert meta["flow"]["base_shift"] == SHIFT and meta["flow"]["base_tokens"] is None
    assert meta["vae"]["path"] == str((imported / "vae").resolve())
    assert meta["conditioner"] == {"text": {"class": "vidgen.conditioning.text.TextCondition", "dropout": 0.1}}
    assert meta["defaults"] == {"num_frames": FRAMES, "height": HEIGHT, "width": WIDTH, "steps": 50, "shift": SHIFT,
                                "guidance": 5.0, "negative_prompt": WAN_NEGATIVE_PROMPT, "sampler": "euler"}
    assert export["info"]["imported"]["transformer_layout"] == "diffusers"
    text = json.loads((imported / "cond.text" / "config.json").read_text())
    assert text["class"] == "vidgen.models.text.HFTextEncoder"
    assert text["config"] == {"path": str(wan16["text"].resolve()), "max_length": L, "padding": "max_length",
                              "dtype": "float32", "dim": 32}
    assert json.loads((imported / "dit" / "config.json").read_text())["config"]["text_mask"] is False


def test_import_samples_like_diffusers_wan_pipeline(wan16, imported):
    """The export through our DiTPipeline (shift from the export's flow) = WanPipeline on the same noise."""
    from vidgen.diffusion.sampling import seeded_noise
    from vidgen.pipeline import DiTPipeline

    ours = DiTPipeline.from_pretrained(imported, device="cpu")
    assert ours.defaults["shift"] == SHIFT and ours.flow.shift_for(10**6) == SHIFT  # fixed, as Wan
    t, h, w = ours.latent_size(FRAMES, HEIGHT, WIDTH)
    noise = seeded_noise((len(PROMPTS), Z16, t, h, w), SEED)
    ref_pipe = _diffusers_pipeline((wan16["text"], wan16["module"], wan16["vae"]))
    call = dict(prompt=PROMPTS, negative_prompt="", num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                num_inference_steps=3, guidance_scale=5.0, max_sequence_length=L, latents=noise.clone())
    with torch.no_grad():
        ref = ref_pipe(**call, output_type="latent").frames
        ref_video = ref_pipe(**call, output_type="pt").frames  # [B, T, 3, H, W] in [0, 1]
    out = ours(PROMPTS, FRAMES, HEIGHT, WIDTH, steps=3, guidance=5.0, negative_prompt="", seed=SEED)
    assert out.settings["shift"] == SHIFT
    assert (ref - noise).abs().max() > 0.1
    diff = (out.latents - ref).abs().max().item()
    assert diff < 1e-4, f"latents differ from diffusers' WanPipeline by {diff:.3g}"
    video = ((out.video + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)
    assert (video - ref_video).abs().max().item() < 1e-4


def test_image_to_video_wan_is_refused_in_one_line(wan16, tmp_path, capsys):
    from vidgen.io.import_wan import main

    i2v = tmp_path / "i2v"
    i2v.mkdir()
    (i2v / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", **WAN16, "image_dim": 1280,
                                                 "added_kv_proj_dim": 32}))
    common = [f"vae={wan16['vae']}", f"text_encoder={wan16['text']}", f"out={tmp_path / 'out'}"]
    err = run_cli(main, [f"transformer={i2v}", *common], capsys)
    assert f"transformer={i2v}: image-to-video Wan (I2V-14B) is not supported yet" in err
    original = dit_to_original(wan16["module"].state_dict())
    original["img_emb.proj.1.weight"] = torch.zeros(4, 4)
    torch.save(original, tmp_path / "wan_i2v.pth")
    err = run_cli(main, [f"transformer={tmp_path / 'wan_i2v.pth'}", "num_heads=2", *common], capsys)
    assert "image-to-video Wan (I2V-14B) is not supported yet" in err and "wan_i2v.pth" in err
    assert not (tmp_path / "out").exists()


def test_missing_or_mismatched_files_name_themselves(wan16, tmp_path, capsys):
    from vidgen.io.import_wan import main

    args = {"transformer": wan16["transformer"], "vae": wan16["vae"], "text_encoder": wan16["text"],
            "out": tmp_path / "out"}

    def error(**changed) -> str:
        return run_cli(main, [f"{k}={v}" for k, v in {**args, **changed}.items()], capsys)

    missing = tmp_path / "no_such_transformer"
    assert f"transformer={missing}: no such file or folder" in error(transformer=missing)
    shards = tmp_path / "shards"  # an index json listing a shard that is not there
    shards.mkdir()
    for f in wan16["transformer"].iterdir():
        (shards / f.name).write_bytes(f.read_bytes())
    gone = sorted(shards.glob("*-00002-of-*.safetensors"))[0]
    gone.unlink()
    assert f"{gone}: missing weights file" in error(transformer=shards)
    assert "holds a AutoencoderKLWan, expected a WanTransformer3DModel" in error(transformer=wan16["vae"])
    assert "vae=" in error(vae=wan16["transformer"]) and "AutoencoderKLWan" in error(vae=wan16["transformer"])
    assert "no tokenizer" in error(text_encoder=_no_tokenizer(wan16["text"], tmp_path))
    assert "num_heads=N" in error(transformer=wan16["root"] / "wan_t2v.pth")  # width 32: no head count to infer
    assert "num_frames=8" in error(num_frames=8)
    assert "shift=fast: expected a number" in error(shift="fast")
    assert "sampler=dpm: expected one of dmd, dpmpp_2m, euler, heun, unipc" in error(sampler="dpm")
    assert not (tmp_path / "out").exists()
    # The module's command line prints the same one line (no traceback).
    proc = subprocess.run([sys.executable, "-m", "vidgen.io.import_wan", f"transformer={missing}",
                           f"vae={wan16['vae']}", f"text_encoder={wan16['text']}", f"out={tmp_path / 'out'}"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: transformer={missing}: no such file "
                                                                        f"or folder (expected a diffusers "
                                                                        f"WanTransformer3DModel folder or the "
                                                                        f"original Wan 2.1 weights)"]


def _no_tokenizer(text: Path, tmp_path: Path) -> Path:
    """A copy of the text-encoder folder without its tokenizer files (diffusers keeps them in ../tokenizer)."""
    folder = tmp_path / "pipe" / "text_encoder"
    folder.mkdir(parents=True)
    for f in text.iterdir():
        if "token" not in f.name and f.name != "special_tokens_map.json":
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_published_layouts_are_read_off_the_tensor_shapes():
    """Wan 2.1 T2V-1.3B and its VAE in the original key layout (meta tensors): configs = configs/model/*/wan21*."""
    import yaml
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from vidgen.io.convert_wan_dit import diffusers_config_from_state, dit_config_from_diffusers, original_to_diffusers
    from vidgen.io.convert_wan_vae import original_vae_config, vae_config_from_diffusers

    with torch.device("meta"):
        dit = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
        vae = AutoencoderKLWan()
    root = Path(__file__).parents[1] / "configs" / "model"
    config = dit_config_from_diffusers(diffusers_config_from_state(original_to_diffusers(dit_to_original(
        dit.state_dict()))))
    expected = yaml.safe_load((root / "dit" / "wan21_1.3b.yaml").read_text())
    assert {k: v for k, v in expected.items() if k in config} == config
    expected = yaml.safe_load((root / "vae" / "wan21.yaml").read_text())
    config = vae_config_from_diffusers(original_vae_config(vae_to_original(vae.state_dict(), 2)))
    assert {k: v for k, v in expected.items() if k in config} == config
