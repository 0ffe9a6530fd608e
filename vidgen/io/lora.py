"""LoRA adapters out of vidgen: the key layouts diffusers and ComfyUI load, and merging into the base weights.

A LoRA run's checkpoint (or its export) read with `read_parts` holds the base parts plus `adapters["lora"]`:
tensors named as in the DiT, `blocks.0.attn1.to_q.lora_A.default.weight` (peft's adapter name included), with
`meta["adapters"]["lora"] = {"rank", "alpha", "modules", "part": "dit", ...}`. This module writes them as

- `diffusers`: `transformer.blocks.0.attn1.to_q.lora_A.weight` / `.lora_B.weight` with diffusers' module names
  (`to_out.0`, `ffn.net.0.proj`, `ffn.net.2`; `vidgen.io.convert_wan_dit.to_diffusers_key`), which
  `WanPipeline.load_lora_weights` and `WanTransformer3DModel.load_lora_adapter` read;
- `comfyui`: `diffusion_model.blocks.0.self_attn.q.lora_A.weight` / `.lora_B.weight` with the original Wan module
  names (`self_attn.{q,k,v,o}`, `cross_attn.*`, `ffn.0`, `ffn.2`, ...), which ComfyUI's LoRA loader maps onto its
  Wan model (and diffusers converts back, `_convert_non_diffusers_wan_lora_to_diffusers`);
- `--merge`: a normal export folder whose DiT weights are `W + (alpha / r) B A` (no adapter left).

The scale `alpha / r` is folded into `lora_B`, so both files mean scale 1 and need no alpha entries.

    python -m vidgen.io.lora CKPT_OR_EXPORT OUT.safetensors --layout diffusers|comfyui
    python -m vidgen.io.lora CKPT_OR_EXPORT OUT_FOLDER --merge
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vidgen.errors import one_line_errors
from vidgen.io.atomic import atomic_path
from vidgen.io.checkpoint import CheckpointError, ModelParts, read_parts, write_export
from vidgen.io.convert_wan_dit import to_diffusers_key

ADAPTER = "lora"
LAYOUTS = ("diffusers", "comfyui")
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")  # optional peft adapter name
# Our linear layers -> the original Wan release's (`WanModel`; ComfyUI keeps its names), the layers a LoRA adapts.
_WAN_NAMES = [(re.compile(p), r) for p, r in (
    (r"^blocks\.(\d+)\.attn1\.to_(q|k|v)$", r"blocks.\1.self_attn.\2"),
    (r"^blocks\.(\d+)\.attn1\.to_out$", r"blocks.\1.self_attn.o"),
    (r"^blocks\.(\d+)\.attn2\.to_(q|k|v)$", r"blocks.\1.cross_attn.\2"),
    (r"^blocks\.(\d+)\.attn2\.to_out$", r"blocks.\1.cross_attn.o"),
    (r"^blocks\.(\d+)\.ffn\.fc1$", r"blocks.\1.ffn.0"),
    (r"^blocks\.(\d+)\.ffn\.fc2$", r"blocks.\1.ffn.2"),
    (r"^condition_embedder\.text_embedder\.linear_1$", "text_embedding.0"),
    (r"^condition_embedder\.text_embedder\.linear_2$", "text_embedding.2"),
    (r"^condition_embedder\.time_embedder\.linear_1$", "time_embedding.0"),
    (r"^condition_embedder\.time_embedder\.linear_2$", "time_embedding.2"),
    (r"^condition_embedder\.time_proj$", "time_projection.1"),
    (r"^proj_out$", "head.head"),
)]


def adapter_of(parts: ModelParts, name: str = ADAPTER) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter tensors, spec) of `parts`; one line when it holds no such adapter."""
    spec = (parts.meta.get("adapters") or {}).get(name)
    if name not in parts.adapters or not parts.adapters[name] or spec is None:
        raise CheckpointError(f"{parts.info.get('source')}: holds no '{name}' adapter (expected a checkpoint or "
                              f"export of a LoRA run, experiment=finetune_lora)")
    return parts.adapters[name], spec


def lora_pairs(adapter: dict[str, torch.Tensor],
               where: str = "adapter") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapter tensors -> {module name: (A [r, in], B [out, r])}; one line for a stray or unpaired tensor."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter.items():
        match = _PAIR.match(key)
        if match is None:
            raise CheckpointError(f"{where}: {key!r} is not a LoRA tensor (expected MODULE.lora_A/lora_B...weight)")
        halves.setdefault(match["module"], {})[match["ab"]] = value
    unpaired = sorted(m for m, h in halves.items() if set(h) != {"A", "B"})
    if unpaired:
        raise CheckpointError(f"{where}: {unpaired[0]} has a lora_A or a lora_B but not both")
    return {m: (h["A"], h["B"]) for m, h in sorted(halves.items())}


def scale(spec: dict[str, Any]) -> float:
    """LoRA's output scale alpha / r (Hu et al. 2021, Sec. 4.1)."""
    return float(spec["alpha"]) / float(spec["rank"])


def diffusers_module(module: str) -> str:
    """Our module name -> diffusers' `WanTransformer3DModel` module name."""
    return to_diffusers_key(f"{module}.weight")[: -len(".weight")]


def wan_module(module: str) -> str:
    """Our module name -> the original Wan (ComfyUI) module name; one line for a layer Wan does not have."""
    for pattern, repl in _WAN_NAMES:
        if pattern.match(module):
            return pattern.sub(repl, module)
    raise CheckpointError(f"adapter on {module!r}: no original Wan (ComfyUI) name for that layer")


def to_layout(adapter: dict[str, torch.Tensor], spec: dict[str, Any], layout: str) -> dict[str, torch.Tensor]:
    """Adapter tensors in `layout` ("diffusers" | "comfyui"), with alpha / r folded into lora_B."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"--layout={layout}: expected one of {', '.join(LAYOUTS)}")
    rename, prefix = (diffusers_module, "transformer.") if layout == "diffusers" else (wan_module, "diffusion_model.")
    out = {}
    for module, (a, b) in lora_pairs(adapter).items():
        name = prefix + rename(module)
        out[f"{name}.lora_A.weight"] = a.contiguous()
        out[f"{name}.lora_B.weight"] = (b.float() * scale(spec)).to(b.dtype).contiguous()
    return out


def merge_state(state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], spec: dict[str, Any],
                where: str = "adapter") -> dict[str, torch.Tensor]:
    """A DiT state dict with each adapted weight replaced by `W + (alpha / r) B A` (float32 math, W's dtype)."""
    merged = dict(state)
    for module, (a, b) in lora_pairs(adapter, where).items():
        key = f"{module}.weight"
        if key not in merged:
            raise CheckpointError(f"{where}: adapts {module!r}, which the base DiT does not have")
        w = merged[key]
        delta = scale(spec) * (b.float() @ a.float())  # [out, r] @ [r, in]
        if delta.shape != w.shape:
            raise CheckpointError(f"{where}: {module} adapter is {list(delta.shape)}, its weight {list(w.shape)}")
        merged[key] = (w.float() + delta).to(w.dtype)
    return merged


def merged(parts: ModelParts, name: str = ADAPTER) -> ModelParts:
    """`parts` with adapter `name` folded into its part's weights (the adapter and its spec removed)."""
    adapter, spec = adapter_of(parts, name)
    part_name = spec.get("part", "dit")
    part = parts.parts[part_name]
    state = merge_state(part.state, adapter, spec, f"{parts.info.get('source')} [{name}]")
    meta = dict(parts.meta)
    meta["adapters"] = {k: v for k, v in (meta.get("adapters") or {}).items() if k != name}
    meta["merged_adapters"] = {**(meta.get("merged_adapters") or {}), name: spec}
    return dataclasses.replace(parts, parts={**parts.parts, part_name: dataclasses.replace(part, state=state)},
                               meta=meta, adapters={k: v for k, v in parts.adapters.items() if k != name})


def write_layout(parts: ModelParts, out: str | os.PathLike, layout: str, name: str = ADAPTER) -> Path:
    """Write the adapter of `parts` as one safetensors file in `layout` (atomically)."""
    adapter, spec = adapter_of(parts, name)
    tensors = to_layout(adapter, spec, layout)
    out = Path(out)
    if out.is_dir():
        raise CheckpointError(f"out={out}: a folder; expected a .safetensors file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    about = {"layout": layout, "rank": spec["rank"], "alpha": spec["alpha"], "scale_folded_into": "lora_B",
             "source": parts.info.get("source"), "global_step": parts.info.get("global_step")}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "vidgen_lora": json.dumps(about)})
    return out


# ---------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """`python -m vidgen.io.lora CKPT OUT --layout diffusers|comfyui` or `CKPT OUT --merge`."""
    p = argparse.ArgumentParser(description="Export the LoRA adapter of a LoRA run (checkpoint or export folder) in "
                                            "the key layout of diffusers or ComfyUI, or fold it into the weights.")
    p.add_argument("ckpt", help="checkpoint (.ckpt, FSDP or DeepSpeed folder) or export folder of a LoRA run")
    p.add_argument("out", help="a .safetensors file (--layout), or the export folder to write (--merge)")
    p.add_argument("--layout", choices=LAYOUTS, default="diffusers", help="key layout of the adapter file")
    p.add_argument("--merge", action="store_true", help="write a full export folder with the adapter folded in")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="the trained, not the EMA adapter weights")
    args = p.parse_args(argv)
    parts = read_parts(args.ckpt, ema=args.ema, kind="dit")
    if args.merge:
        out = write_export(merged(parts), args.out)
        what = "merged export"
    else:
        out = write_layout(parts, args.out, args.layout)
        what = f"{args.layout} LoRA"
    print(f"wrote {what} {out} from {args.ckpt} ({'EMA' if parts.info.get('ema_used') else 'raw'} weights, step "
          f"{parts.info.get('global_step')})")
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main)())
