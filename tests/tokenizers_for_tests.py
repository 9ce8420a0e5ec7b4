"""Tokenizers built locally for the tests: a Qwen-style byte-level BPE and a Llama-style sentencepiece model."""

import shutil

import sentencepiece
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a picture of a red square and a blue circle on a white background",
    "how many shapes are there in the image? there are three shapes",
    "describe the receipt and the phone screenshot in detail please",
] * 40


def bpe_tokenizer():
    """Byte-level BPE with ChatML special tokens, as Qwen2 tokenizers are."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")


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
