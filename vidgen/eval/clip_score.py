"""Text-video CLIP score with a local Hugging Face CLIP: `CLIPScorer.from_pretrained(PATH).score(frames, prompt)`.

Per video: max(mean over frames of 100 * cos(E_image(frame), E_text(prompt)), 0), i.e. torchmetrics'
`clip_score` with the video's frames as the batch of images (it averages, then clamps at 0). Embeddings are
the projected pooled outputs (`visual_projection(vision_model(...).pooler_output)`, likewise for text).

Loading: `transformers.CLIPModel` and the folder's tokenizer (`AutoTokenizer`), `local_files_only=True`:
nothing is downloaded. The image preprocessing of `CLIPImageProcessor` is done here in torch (no
torchvision): resize the shorter side to `size` (bicubic, antialiased, rounded to uint8 levels as the PIL path
does), centre crop to `crop_size`, scale to [0, 1], normalise by `image_mean` / `image_std`. Those four values
come from the folder's `preprocessor_config.json`, else from the vision config's `image_size` and OpenAI's
CLIP mean / std.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vidgen.errors import UserError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _side(value: Any, key: str) -> int | tuple[int, int]:
    """preprocessor_config `size` / `crop_size`: an int, {"shortest_edge": n} or {"height": h, "width": w}."""
    if isinstance(value, dict):
        return int(value[key]) if key in value else (int(value["height"]), int(value["width"]))
    return int(value)


class CLIPScorer:
    """CLIP model + tokenizer + preprocessing: `score(frames uint8 [T, H, W, 3], prompt) -> float` in [0, 100]."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, size: int, crop: tuple[int, int],
                 mean: Sequence[float], std: Sequence[float], device: str | torch.device = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer, self.size, self.crop, self.device = tokenizer, size, crop, torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> CLIPScorer:
        """A CLIP folder as `CLIPModel.save_pretrained` + the tokenizer's `save_pretrained` write it."""
        from transformers import AutoTokenizer, CLIPModel  # optional heavy dependency

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"clip={path}: no config.json there (expected a local Hugging Face CLIP folder)")
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"clip={path}: not a CLIPModel + tokenizer folder ({str(e).splitlines()[0]})") from None
        image_size = int(model.config.vision_config.image_size)
        pre_file = path / "preprocessor_config.json"
        pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
        size = _side(pre.get("size", image_size), "shortest_edge")
        crop = _side(pre.get("crop_size", image_size), "shortest_edge")
        crop = (crop, crop) if isinstance(crop, int) else crop
        size = size if isinstance(size, int) else min(size)
        return cls(model, tokenizer, size, crop, pre.get("image_mean", OPENAI_CLIP_MEAN),
                   pre.get("image_std", OPENAI_CLIP_STD), device)

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames [N, H, W, 3] -> normalised pixel values float32 [N, 3, crop_h, crop_w]."""
        x = torch.as_tensor(np.asarray(frames)).to(self.device).permute(0, 3, 1, 2).float()  # [N, 3, H, W], 0..255
        h, w = x.shape[-2:]
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(self.size * long / short)  # CLIPImageProcessor: shortest edge -> size, aspect kept
        new_hw = (self.size, new_long) if h <= w else (new_long, self.size)
        if new_hw != (h, w):
            x = F.interpolate(x, size=new_hw, mode="bicubic", align_corners=False, antialias=True)
            x = x.round().clamp(0, 255)  # the PIL path resizes uint8 images
        ch, cw = self.crop
        top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
        x = x[..., top:top + ch, left:left + cw]
        return (x / 255.0 - self.mean) / self.std

    @torch.no_grad()
    def image_embeds(self, frames: np.ndarray | torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """uint8 frames [N, H, W, 3] -> unit image embeddings [N, D]."""
        out = []
        for i in range(0, len(frames), batch_size):
            pooled = self.model.vision_model(pixel_values=self.preprocess(frames[i:i + batch_size])).pooler_output
            out.append(self.model.visual_projection(pooled))
        e = torch.cat(out).float()
        return e / e.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> unit text embeddings [P, D] (truncated to the text model's positions)."""
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        pooled = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                       attention_mask=tok["attention_mask"].to(self.device)).pooler_output
        e = self.model.text_projection(pooled).float()
        return e / e.norm(dim=-1, keepdim=True)

    def score(self, frames: np.ndarray | torch.Tensor, prompt: str) -> float:
        """CLIP score of one video (uint8 [T, H, W, 3]) and its prompt: max(mean_t 100 cos, 0)."""
        cos = self.image_embeds(frames) @ self.text_embeds([prompt])[0]  # [T]
        return float(max((100 * cos).mean().item(), 0.0))
