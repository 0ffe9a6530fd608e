"""Conditioning: a `Conditioner` of named entries (today `text`), each with its encoder, CFG dropout and null."""

from vidgen.conditioning.conditioner import Conditioner
from vidgen.conditioning.text import TextCondition, drop_captions, drop_embeddings

__all__ = ["Conditioner", "TextCondition", "drop_captions", "drop_embeddings"]
