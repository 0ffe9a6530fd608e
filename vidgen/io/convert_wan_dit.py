"""Wan 2.1 transformer weights <-> `vidgen.models.dit.DiT`: diffusers' `WanTransformer3DModel` and the original layout.

Our parameter names mirror diffusers'; only two sub-modules are named differently:
`attn{1,2}.to_out.0.*` <-> `attn{1,2}.to_out.*` and `ffn.net.0.proj.*` / `ffn.net.2.*` <-> `ffn.fc1.*` / `ffn.fc2.*`.
The original Wan release (`WanModel`, e.g. `Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors`) names them
`blocks.0.self_attn.q.weight`, `text_embedding.0.weight`, `head.head.weight`, ...; `original_to_diffusers` renames
them (the map of diffusers' `convert_wan_transformer_to_diffusers`, T2V keys only).

    cfg = dit_config_from_diffusers(json.load(open("transformer/config.json")))
    model = DiT(**cfg); model.load_state_dict(convert_wan_state_dict(load_file(...)), strict=True)
    diffusers_sd = diffusers_state_dict(model.state_dict()); diffusers_cfg = diffusers_config_from_dit(cfg)
"""

from __future__ import annotations

import re
from typing import Any

import torch

from vidgen.io.pretrained import WeightsError

I2V_UNSUPPORTED = "image-to-video Wan (I2V-14B) is not supported yet"
DIFFUSERS_CLASS = "WanTransformer3DModel"
WAN_HEAD_DIM = 128  # every released Wan 2.1 transformer (1.3B: 12 x 128, 14B: 40 x 128)

# (diffusers, ours): the only names that differ
_RENAMES = [(".to_out.0.", ".to_out."), (".ffn.net.0.proj.", ".ffn.fc1."), (".ffn.net.2.", ".ffn.fc2.")]

# Original Wan name -> diffusers name, by prefix: top-level modules, then the rest of a `blocks.N.` key.
_ORIGINAL_TOP = {
    "patch_embedding.": "patch_embedding.",
    "text_embedding.0.": "condition_embedder.text_embedder.linear_1.",
    "text_embedding.2.": "condition_embedder.text_embedder.linear_2.",
    "time_embedding.0.": "condition_embedder.time_embedder.linear_1.",
    "time_embedding.2.": "condition_embedder.time_embedder.linear_2.",
    "time_projection.1.": "condition_embedder.time_proj.",
    "head.head.": "proj_out.",
    "head.modulation": "scale_shift_table",
}
_ORIGINAL_BLOCK = {
    **{f"{a}.{o}.": f"{b}.{d}." for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2"))
       for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"),
                    ("norm_k", "norm_k"))},
    "norm3.": "norm2.",  # the affine cross-attention norm (Wan's norm3 is diffusers' norm2; the others hold no weights)
    "ffn.0.": "ffn.net.0.proj.",
    "ffn.2.": "ffn.net.2.",
    "modulation": "scale_shift_table",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")
_I2V_KEYS = ("img_emb.", ".k_img.", ".v_img.", ".norm_k_img.", "add_k_proj", "add_v_proj", "image_embedder",
             "norm_added_k")


def convert_key(key: str) -> str:
    """diffusers Wan parameter name -> our DiT parameter name."""
    for theirs, ours in _RENAMES:
        key = key.replace(theirs, ours)
    return key


def to_diffusers_key(key: str) -> str:
    """Our DiT parameter name -> diffusers Wan parameter name (inverse of `convert_key`)."""
    for theirs, ours in _RENAMES:
        key = key.replace(ours, theirs)
    return key


def check_t2v(keys: Any, where: str = "transformer") -> None:
    """Refuse image-conditioning weights (Wan I2V / FLF2V) in one line."""
    if any(part in k for k in keys for part in _I2V_KEYS):
        raise WeightsError(f"{where}: {I2V_UNSUPPORTED} (it holds image-conditioning weights, e.g. img_emb / k_img)")


def convert_wan_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers Wan transformer state dict for `DiT.load_state_dict(..., strict=True)` (T2V only)."""
    check_t2v(state_dict)
    return {convert_key(k): v for k, v in state_dict.items()}


def diffusers_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our DiT state dict -> `WanTransformer3DModel` names (same tensors)."""
    return {to_diffusers_key(k): v for k, v in state_dict.items()}


def is_original_layout(keys: Any) -> bool:
    """Whether transformer keys use the original Wan names (`head.head.weight`, `blocks.0.self_attn.q.weight`)."""
    return any(k.startswith(("head.head.", "text_embedding.", "time_embedding.")) for k in keys)


def original_to_diffusers(state_dict: dict[str, torch.Tensor], where: str = "transformer") -> dict[str, torch.Tensor]:
    """An original Wan 2.1 T2V state dict (`WanModel`) -> diffusers `WanTransformer3DModel` names."""
    check_t2v(state_dict, where)
    out = {}
    for key, value in state_dict.items():
        block = _BLOCK.match(key)
        table, rest, prefix = (_ORIGINAL_BLOCK, block.group(2), f"blocks.{block.group(1)}.") if block else \
            (_ORIGINAL_TOP, key, "")
        hit = next((k for k in table if rest.startswith(k)), None)
        if hit is None:
            raise WeightsError(f"{where}: unexpected key {key!r} for an original Wan 2.1 transformer")
        out[prefix + table[hit] + rest[len(hit):]] = value
    return out


def dit_config_from_diffusers(cfg: dict[str, Any], where: str = "transformer config") -> dict[str, Any]:
    """Constructor arguments of `DiT` equal to a diffusers `WanTransformer3DModel` config dict."""
    if cfg.get("image_dim") or cfg.get("added_kv_proj_dim"):
        raise WeightsError(f"{where}: {I2V_UNSUPPORTED} (image_dim / added_kv_proj_dim are set)")
    qk_norm = cfg.get("qk_norm", "rms_norm_across_heads")
    if qk_norm not in (None, "rms_norm_across_heads"):
        raise WeightsError(f"{where}: qk_norm={qk_norm!r} is not supported (expected "
                           f"'rms_norm_across_heads' or None)")
    heads, head_dim = cfg.get("num_attention_heads", 40), cfg.get("attention_head_dim", 128)
    return {
        "in_channels": cfg.get("in_channels", 16),
        "out_channels": cfg.get("out_channels", 16),
        "dim": heads * head_dim,
        "depth": cfg.get("num_layers", 40),
        "num_heads": heads,
        "ffn_dim": cfg.get("ffn_dim", 13824),
        "text_dim": cfg.get("text_dim", 4096),
        "freq_dim": cfg.get("freq_dim", 256),
        "patch_size": list(cfg.get("patch_size", (1, 2, 2))),
        "cross_attn_norm": cfg.get("cross_attn_norm", True),
        "qk_norm": qk_norm is not None,
        "eps": cfg.get("eps", 1e-6),
        "timestep_scale": 1000.0,
        "text_mask": False,  # Wan attends to the zero-padded 512 text tokens (diffusers passes no mask)
    }


def diffusers_config_from_original(cfg: dict[str, Any], where: str = "transformer config") -> dict[str, Any]:
    """The original release's `config.json` (`_class_name: WanModel`) -> a `WanTransformer3DModel` config dict."""
    if cfg.get("model_type", "t2v") != "t2v":
        raise WeightsError(f"{where}: model_type={cfg['model_type']!r}: {I2V_UNSUPPORTED}")
    dim, heads = int(cfg.get("dim", 2048)), int(cfg.get("num_heads", 16))
    return {"patch_size": list(cfg.get("patch_size", (1, 2, 2))), "num_attention_heads": heads,
            "attention_head_dim": dim // heads, "in_channels": cfg.get("in_dim", 16),
            "out_channels": cfg.get("out_dim", 16), "text_dim": cfg.get("text_dim", 4096),
            "freq_dim": cfg.get("freq_dim", 256), "ffn_dim": cfg.get("ffn_dim", 8192),
            "num_layers": cfg.get("num_layers", 32), "cross_attn_norm": cfg.get("cross_attn_norm", True),
            "qk_norm": "rms_norm_across_heads" if cfg.get("qk_norm", True) else None, "eps": cfg.get("eps", 1e-6)}


def diffusers_config_from_state(sd: dict[str, torch.Tensor], num_heads: int | None = None,
                                where: str = "transformer") -> dict[str, Any]:
    """A `WanTransformer3DModel` config inferred from diffusers-named tensor shapes (heads: `num_heads` or dim/128)."""
    try:
        dim, in_ch, *patch = sd["patch_embedding.weight"].shape
        text_dim = sd["condition_embedder.text_embedder.linear_1.weight"].shape[1]
        freq_dim = sd["condition_embedder.time_embedder.linear_1.weight"].shape[1]
        ffn_dim = sd["blocks.0.ffn.net.0.proj.weight"].shape[0]
        out_ch = sd["proj_out.weight"].shape[0] // (patch[0] * patch[1] * patch[2])
    except KeyError as e:
        raise WeightsError(f"{where}: not Wan 2.1 transformer weights (no {e.args[0]!r})") from None
    if num_heads is None:
        if dim % WAN_HEAD_DIM:
            raise WeightsError(f"{where}: width {dim} is not a multiple of Wan's head size {WAN_HEAD_DIM}; "
                               f"pass num_heads=N (or put the model's config.json beside the weights)")
        num_heads = dim // WAN_HEAD_DIM
    if dim % num_heads:
        raise WeightsError(f"num_heads={num_heads}: does not divide the transformer width {dim}")
    layers = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}
    return {"patch_size": list(patch), "num_attention_heads": num_heads, "attention_head_dim": dim // num_heads,
            "in_channels": in_ch, "out_channels": out_ch, "text_dim": text_dim, "freq_dim": freq_dim,
            "ffn_dim": ffn_dim, "num_layers": len(layers), "cross_attn_norm": "blocks.0.norm2.weight" in sd,
            "qk_norm": "rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in sd else None, "eps": 1e-6}


def diffusers_config_from_dit(cfg: dict[str, Any], where: str = "dit") -> dict[str, Any]:
    """Our `DiT` config -> the `WanTransformer3DModel` config that computes the same function (one line if none)."""
    fixed = {"timestep_scale": 1000.0, "rope_theta": 10000.0, "text_mask": False, "qk_norm": True, "abs_pos": False,
             "attention": "full", "audio_channels": 0}
    for key, value in fixed.items():
        if cfg.get(key, value) != value:
            raise WeightsError(f"{where}: config {key}={cfg[key]!r} does not map to diffusers' {DIFFUSERS_CLASS} "
                               f"(it needs {key}={value!r})")
    dim, heads = int(cfg.get("dim", 384)), int(cfg.get("num_heads", 6))
    in_ch = int(cfg.get("in_channels", 16))
    return {"patch_size": [int(p) for p in cfg.get("patch_size", (1, 2, 2))], "num_attention_heads": heads,
            "attention_head_dim": dim // heads, "in_channels": in_ch,
            "out_channels": int(cfg.get("out_channels") or in_ch), "text_dim": int(cfg.get("text_dim", 256)),
            "freq_dim": int(cfg.get("freq_dim", 256)), "ffn_dim": int(cfg.get("ffn_dim") or 4 * dim),
            "num_layers": int(cfg.get("depth", 12)), "cross_attn_norm": bool(cfg.get("cross_attn_norm", True)),
            "qk_norm": "rms_norm_across_heads", "eps": float(cfg.get("eps", 1e-6)), "image_dim": None,
            "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None}
