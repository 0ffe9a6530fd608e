"""Import diffusers' `WanTransformer3DModel` weights (e.g. Wan 2.1 T2V-1.3B) into `vidgen.models.dit.DiT`.

Our parameter names mirror diffusers'; only two sub-modules are named differently:
`attn{1,2}.to_out.0.*` -> `attn{1,2}.to_out.*` and `ffn.net.0.proj.*` / `ffn.net.2.*` -> `ffn.fc1.*` / `ffn.fc2.*`.

    cfg = dit_config_from_diffusers(json.load(open("transformer/config.json")))
    model = DiT(**cfg); model.load_state_dict(convert_wan_state_dict(load_file(...)), strict=True)
"""

from __future__ import annotations

import re
from typing import Any

import torch

_RENAMES = [
    (re.compile(r"\.to_out\.0\."), ".to_out."),
    (re.compile(r"\.ffn\.net\.0\.proj\."), ".ffn.fc1."),
    (re.compile(r"\.ffn\.net\.2\."), ".ffn.fc2."),
]


def convert_key(key: str) -> str:
    """diffusers Wan parameter name -> our DiT parameter name."""
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


def convert_wan_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers Wan transformer state dict for `DiT.load_state_dict(..., strict=True)`.

    Image-conditioning keys (Wan I2V: `add_k_proj`, `image_embedder`, ...) have no counterpart and raise.
    """
    unsupported = [k for k in state_dict if "add_k_proj" in k or "add_v_proj" in k or "image_embedder" in k
                   or "norm_added_k" in k]
    if unsupported:
        raise ValueError(f"image-conditioning weights (Wan I2V) are not supported: {unsupported[:3]} ...")
    return {convert_key(k): v for k, v in state_dict.items()}


def dit_config_from_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of `DiT` equal to a diffusers `WanTransformer3DModel` config dict."""
    if cfg.get("image_dim") or cfg.get("added_kv_proj_dim"):
        raise ValueError("Wan image-to-video transformers (image_dim / added_kv_proj_dim) are not supported")
    qk_norm = cfg.get("qk_norm", "rms_norm_across_heads")
    if qk_norm not in (None, "rms_norm_across_heads"):
        raise ValueError(f"qk_norm={qk_norm!r} is not supported (expected 'rms_norm_across_heads' or None)")
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
