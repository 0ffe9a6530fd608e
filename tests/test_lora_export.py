"""LoRA export: a LoRA trained a few steps by train.py, written in diffusers' key layout, loads into diffusers'
`WanTransformer3DModel` (built from the same base weights) with diffusers' own LoRA loader and computes what our
DiT with the adapters computes; the ComfyUI layout names every adapted layer the original Wan way (and diffusers'
converter turns it into the same tensors); merge-and-export equals the adapters applied."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_finetune import RANK, base_export, lora_run
from vidgen.io.checkpoint import CheckpointError, load_checkpoint, parts_from_checkpoint, read_parts, write_export
from vidgen.io.convert_wan_dit import convert_key, diffusers_config_from_dit, diffusers_state_dict, \
    original_to_diffusers
from vidgen.io.lora import ADAPTER, diffusers_module, main, merged, to_layout, wan_module
from vidgen.models.dit import DiT
from vidgen.training.adapters import apply_lora, load_adapter

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _reader_reads_adapter_runs() -> bool:
    """Whether `parts_from_checkpoint` resolves adapter runs (base weights from init_from + `adapters`)."""
    probe = {"vidgen": {"kind": "dit", "parts": {}, "meta": {"adapters": {ADAPTER: {"prefix": "dit."}}}},
             "state_dict": {"dit.m.lora_A.default.weight": torch.zeros(1, 1)}}
    try:
        return bool(parts_from_checkpoint(probe, "probe").adapters)
    except Exception:  # noqa: BLE001 (an older reader may fail on the probe in any way)
        return False


needs_reader = pytest.mark.skipif(not _reader_reads_adapter_runs(), reason="vidgen.io.checkpoint.parts_from_checkpoint "
                                  "does not resolve adapter runs yet (meta.init_from + meta.adapters)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_shards, tiny_vae_export):
    """(base export, LoRA last.ckpt, raw adapter tensors named as in the DiT, LoRA spec) of the real runs."""
    base = base_export(tmp_path_factory, demo_shards, tiny_vae_export)
    ckpt_path = lora_run(tmp_path_factory, demo_shards, tiny_vae_export)
    ckpt = load_checkpoint(ckpt_path)
    adapter = {k[len("dit."):]: v for k, v in ckpt["state_dict"].items()}
    return base, ckpt_path, adapter, ckpt["vidgen"]["meta"]["adapters"][ADAPTER]


@pytest.fixture(scope="module")
def inputs():
    """Latents [2, 4, 3, 4, 6], flow times [2], text context [2, 7, 16] (no mask: as diffusers' Wan attends)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 3, 4, 6, generator=g), torch.tensor([0.3, 0.8]), torch.randn(2, 7, 16, generator=g)


def _ours(base: Path, adapter=None, spec=None) -> DiT:
    dit = read_parts(base).build("dit").eval()
    if adapter is not None:
        apply_lora(dit, spec["rank"], spec["alpha"], spec["dropout"], spec["targets"])
        load_adapter(dit, adapter, "test adapter")
    return dit.eval()


@torch.no_grad()
def _run(dit: DiT, inputs) -> torch.Tensor:
    z, t, ctx = inputs
    return dit(z, t, ctx, None)


def _diffusers_transformer(base: Path):
    from diffusers import WanTransformer3DModel

    part = read_parts(base).parts["dit"]
    transformer = WanTransformer3DModel(**diffusers_config_from_dit({**part.config, "text_mask": False}))
    transformer.load_state_dict(diffusers_state_dict(part.state), strict=True)
    return transformer.eval()


@torch.no_grad()
def _run_diffusers(transformer, inputs) -> torch.Tensor:
    z, t, ctx = inputs
    return transformer(hidden_states=z, timestep=t * 1000, encoder_hidden_states=ctx, return_dict=False)[0]


def test_diffusers_layout_loads_into_wan_pipeline_and_matches(trained, inputs, tmp_path):
    from diffusers import WanPipeline

    base, _, adapter, spec = trained
    ours_base, ours = _run(_ours(base), inputs), _run(_ours(base, adapter, spec), inputs)
    effect = (ours - ours_base).abs().max().item()
    assert effect > 100 * TOL, f"the trained adapter barely changes the output ({effect:.2g}): the test would be void"

    file = tmp_path / "lora_diffusers.safetensors"
    tensors = to_layout(adapter, spec, "diffusers")
    save_file(tensors, str(file))
    assert len(tensors) == 2 * len(spec["modules"]) and "transformer.blocks.0.attn1.to_out.0.lora_B.weight" in tensors
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=_diffusers_transformer(base), vae=None,
                       scheduler=None)
    assert torch.allclose(_run_diffusers(pipe.transformer, inputs), ours_base, atol=TOL)  # same base function
    pipe.load_lora_weights(str(file), adapter_name="style")  # diffusers' own loader: WanLoraLoaderMixin
    theirs = _run_diffusers(pipe.transformer, inputs)
    diff = (theirs - ours).abs().max().item()
    print(f"diffusers WanTransformer3DModel + LoRA vs ours: max |dv| = {diff:.3g} (adapter effect {effect:.3g})")
    assert diff < TOL

    transformer = _diffusers_transformer(base)  # the transformer's loader too, from a state dict
    transformer.load_lora_adapter(tensors, prefix="transformer", adapter_name="style")
    assert (_run_diffusers(transformer, inputs) - ours).abs().max().item() < TOL


def test_comfyui_layout_names_every_adapted_layer_the_wan_way(trained, tmp_path):
    from diffusers import WanPipeline

    _, _, adapter, spec = trained
    tensors = to_layout(adapter, spec, "comfyui")
    wan = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
           "attn1.to_out": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
           "attn2.to_v": "cross_attn.v", "attn2.to_out": "cross_attn.o", "ffn.fc1": "ffn.0", "ffn.fc2": "ffn.2"}
    expected = {f"diffusion_model.blocks.{i}.{theirs}.lora_{ab}.weight" for i in range(2) for theirs in wan.values()
                for ab in "AB"}
    assert set(tensors) == expected and len(spec["modules"]) == 20
    assert tensors["diffusion_model.blocks.1.cross_attn.o.lora_A.weight"].shape == (RANK, 32)
    # Our Wan names are the ones the Wan importer maps to diffusers' names.
    for module in spec["modules"]:
        assert list(original_to_diffusers({f"{wan_module(module)}.weight": None})) == [
            f"{diffusers_module(module)}.weight"]
        assert convert_key(f"{diffusers_module(module)}.weight") == f"{module}.weight"
    # diffusers reads ComfyUI / original-Wan LoRA files too: it must get the diffusers-layout tensors back.
    file = tmp_path / "lora_comfyui.safetensors"
    save_file(tensors, str(file))
    converted = WanPipeline.lora_state_dict(str(file))
    reference = to_layout(adapter, spec, "diffusers")
    assert sorted(converted) == sorted(reference)
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


def test_merge_and_export_equals_the_adapters_applied(trained, inputs, tmp_path):
    base, _, adapter, spec = trained
    parts = read_parts(base)
    with_adapter = dataclasses.replace(parts, adapters={ADAPTER: adapter},
                                       meta={**parts.meta, "adapters": {ADAPTER: spec}})
    folder = write_export(merged(with_adapter), tmp_path / "merged")
    back = read_parts(folder)
    assert not back.adapters and back.meta["merged_adapters"][ADAPTER]["rank"] == RANK
    diff = (_run(back.build("dit").eval(), inputs) - _run(_ours(base, adapter, spec), inputs)).abs().max().item()
    assert diff < 1e-5, diff


def test_a_base_without_adapters_is_one_line(trained, tmp_path):
    base = trained[0]
    out = subprocess.run([sys.executable, "-m", "vidgen.io.lora", str(base), str(tmp_path / "x.safetensors")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: {base.resolve()}: holds no 'lora' adapter (expected a checkpoint or export of a LoRA run, "
        f"experiment=finetune_lora)"], out.stderr[-2000:]


@needs_reader
def test_command_line_reads_the_lora_checkpoint(trained, inputs, tmp_path):
    """read_parts(LoRA ckpt) = the base parts + the adapters; the command writes both layouts and the merge."""
    base, ckpt, adapter, spec = trained
    parts = read_parts(ckpt, ema=False)
    base_parts = read_parts(base)
    assert sorted(parts.parts) == sorted(base_parts.parts)
    assert all(torch.equal(parts.parts["dit"].state[k], v) for k, v in base_parts.parts["dit"].state.items())
    assert sorted(parts.adapters[ADAPTER]) == sorted(adapter) and parts.meta["adapters"][ADAPTER]["rank"] == RANK
    for layout in ("diffusers", "comfyui"):
        assert main([str(ckpt), str(tmp_path / f"{layout}.safetensors"), "--layout", layout, "--no-ema"]) == 0
        written, expected = load_file(str(tmp_path / f"{layout}.safetensors")), to_layout(adapter, spec, layout)
        assert sorted(written) == sorted(expected) and all(torch.equal(written[k], expected[k]) for k in expected)
    assert main([str(ckpt), str(tmp_path / "merged"), "--merge", "--no-ema"]) == 0
    merged_dit = read_parts(tmp_path / "merged").build("dit").eval()
    assert (_run(merged_dit, inputs) - _run(_ours(base, adapter, spec), inputs)).abs().max().item() < 1e-5
    assert main([str(ckpt), str(tmp_path / "ema.safetensors")]) == 0  # EMA adapter weights by default
    # The export command keeps the adapter beside the base (adapter_lora.safetensors); this command reads that too.
    exported = write_export(read_parts(ckpt, ema=False), tmp_path / "export")
    assert (exported / "adapter_lora.safetensors").is_file()
    assert main([str(exported), str(tmp_path / "from_export.safetensors"), "--layout", "comfyui"]) == 0
    written, expected = load_file(str(tmp_path / "from_export.safetensors")), to_layout(adapter, spec, "comfyui")
    assert all(torch.equal(written[k], expected[k]) for k in expected)


@needs_reader
def test_a_changed_base_is_refused_in_one_line(trained, tmp_path):
    """The adapters were trained on the base's exact weights: a base that changed since is refused, not used."""
    base, ckpt_path, _, _ = trained
    moved = tmp_path / "base"
    shutil.copytree(base, moved)
    weights = load_file(str(moved / "dit" / "model.safetensors"))
    weights["proj_out.bias"] = weights["proj_out.bias"] + 1.0
    save_file(weights, str(moved / "dit" / "model.safetensors"))
    ckpt = load_checkpoint(ckpt_path)
    ckpt["vidgen"]["meta"]["init_from"]["path"] = str(moved)
    torch.save(ckpt, tmp_path / "lora.ckpt")
    with pytest.raises(CheckpointError, match=r"dit.*fingerprint"):
        read_parts(tmp_path / "lora.ckpt")
