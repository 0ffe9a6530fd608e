"""Text encoders: the byte encoder (shapes, mask, padding, training, export) and HF encoders from a local folder."""

from __future__ import annotations

import pytest
import torch

from vidgen.models.text import ByteTextEncoder, HFTextEncoder
from vidgen.io.pretrained import load_pretrained, save_pretrained

CAPTIONS = ["a cat on a mat", "a dog in the fog on a red mat", ""]


def test_byte_encoder_shapes_mask_and_padding():
    enc = ByteTextEncoder(dim=32, depth=2, num_heads=2, max_length=16)
    emb, mask = enc(CAPTIONS + ["héllo ✓"])
    assert emb.shape == (4, 16, 32) and mask.dtype == torch.bool
    # BOS + bytes + EOS, truncated to max_length; "" still has BOS/EOS; UTF-8 multi-byte characters count as bytes.
    assert mask.sum(1).tolist() == [2 + 14, 16, 2, 2 + len("héllo ✓".encode())]
    assert not emb[~mask].any()  # zero at padding
    emb_short, mask_short = enc(["a cat"])
    assert emb_short.shape == (1, 7, 32) and mask_short.all()  # "longest": as long as the longest caption
    fixed = ByteTextEncoder(dim=32, depth=1, num_heads=2, max_length=16, padding="max_length")
    assert fixed(["a"])[0].shape == (1, 16, 32)
    with pytest.raises(TypeError):
        enc("one string")


def test_byte_encoder_padding_does_not_change_tokens_and_it_trains(tmp_path):
    torch.manual_seed(0)
    enc = ByteTextEncoder(dim=32, depth=2, num_heads=2, max_length=64)
    emb_alone, _ = enc(["a cat"])
    emb_batch, _ = enc(["a cat", "a much longer caption than the first one"])
    torch.testing.assert_close(emb_batch[0, :7], emb_alone[0], atol=1e-5, rtol=1e-5)
    emb_batch.square().mean().backward()
    assert enc.token_embedding.weight.grad.abs().sum() > 0 and enc.trainable
    save_pretrained(enc, tmp_path)
    loaded = load_pretrained(tmp_path, ByteTextEncoder)
    torch.testing.assert_close(loaded(CAPTIONS)[0], enc(CAPTIONS)[0], atol=0, rtol=0)


def _tokenizer():
    """An offline word-level tokenizer with T5-like specials (pad 0, </s> 1, <unk> 2) and an EOS post-processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CAPTIONS + ["red car", "a bird"], trainers.WordLevelTrainer(
        special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _save_model(kind: str, folder, vocab: int):
    import transformers

    if kind in ("t5", "umt5"):
        cfg_cls, model_cls = (transformers.T5Config, transformers.T5EncoderModel) if kind == "t5" else \
            (transformers.UMT5Config, transformers.UMT5EncoderModel)
        cfg = cfg_cls(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    else:
        cfg_cls, model_cls = transformers.CLIPTextConfig, transformers.CLIPTextModel
        cfg = cfg_cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=32, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model_cls(cfg).save_pretrained(folder)


@pytest.mark.parametrize("kind", ["t5", "umt5", "clip"])
def test_hf_encoder_loads_from_local_folder(tmp_path, kind):
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(tmp_path)
    _save_model(kind, tmp_path, len(tokenizer))
    enc = HFTextEncoder(str(tmp_path), max_length=8, dim=32)
    assert enc.dim == 32 and enc.config["path"] == str(tmp_path) and not enc.trainable
    emb, mask = enc(CAPTIONS)
    assert emb.shape == (3, 8, 32) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [5 + 1, 8, 1]  # words + </s>, truncated to max_length, "" -> just </s>
    assert not emb[~mask].any() and emb[mask].abs().sum() > 0
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # frozen: stays in eval (no dropout) inside a training module
    fixed = HFTextEncoder(str(tmp_path), max_length=8, padding="max_length")
    assert fixed(["a cat"])[0].shape == (1, 8, 32)


def test_hf_encoder_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        HFTextEncoder(str(tmp_path / "missing"))
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(tmp_path)
    _save_model("t5", tmp_path, len(tokenizer))
    with pytest.raises(ValueError, match="hidden size is 32"):
        HFTextEncoder(str(tmp_path), dim=4096)
