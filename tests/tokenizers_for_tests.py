"""Tokenizers built locally for the tests: a Qwen-style byte-level BPE and a Llama-style sentencepiece model."""

import shutil

import sentencepiece
from transformers import LlamaTokenizer

from genieblue_hf.synthetic import build_bpe_tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a picture of a red square and a blue circle on a white background",
    "how many shapes are there in the image? there are three shapes",
    "describe the receipt and the phone screenshot in detail please",
] * 40


def bpe_tokenizer():
    """Byte-level BPE with ChatML special tokens, as Qwen2 tokenizers are."""
    return build_bpe_tokenizer(CORPUS)


def sentencepiece_tokenizer(workdir):
    """A Llama tokenizer loaded from a sentencepiece model trained here (no pad token, like Llama's)."""
    corpus = workdir / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(workdir / "sp"), vocab_size=150, model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2,
    )
    folder = workdir / "llama-tokenizer"
    folder.mkdir()
    shutil.copy(workdir / "sp.model", folder / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(folder)
