"""Tiny random backbones with locally trained tokenizers, built offline (as transformers' own tests do).

Each factory writes a folder that `AutoModel.from_pretrained` / `AutoTokenizer.from_pretrained` (and so
`MultiTaskModel.from_backbone`) can load, with no network access.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModel,
    BertConfig,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertTokenizerFast,
    ModernBertConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaTokenizerFast,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "John Smith works for Acme Corporation in New York.",
    "I loved this movie, the acting was wonderful!",
    "This film was terrible and boring.",
    "What is the capital city of France?",
    "How many people live in Berlin?",
    "Maria visited the Louvre museum in Paris last summer.",
    "The stock market fell sharply on Monday.",
    "Scientists discovered a new species of frog in Brazil.",
    "Who wrote the novel Pride and Prejudice?",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9 , . ! ? ' -",
] * 3

FAMILIES = ("bert", "distilbert", "roberta", "modernbert")
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}


def _wordpiece_tokenizer(vocab_size: int = 400) -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tokenizer


def _bpe_tokenizer(vocab_size: int = 400) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", tokenizer.token_to_id("</s>")), ("<s>", tokenizer.token_to_id("<s>")), trim_offsets=True
    )
    return tokenizer


def make_tiny_backbone(family: str, directory: str | Path, max_positions: int = 128) -> Path:
    """Write a tiny random `family` encoder and its tokenizer into `directory`; return the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if family in ("bert", "distilbert"):
        backend = _wordpiece_tokenizer()
        specials = {
            "unk_token": "[UNK]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
        }
        tokenizer_class = BertTokenizerFast if family == "bert" else DistilBertTokenizerFast
        tokenizer = tokenizer_class(tokenizer_object=backend, **specials)
    elif family in ("roberta", "modernbert"):
        backend = _bpe_tokenizer()
        specials = {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "cls_token": "<s>",
            "sep_token": "</s>",
            "mask_token": "<mask>",
        }
        tokenizer_class = RobertaTokenizerFast if family == "roberta" else PreTrainedTokenizerFast
        tokenizer = tokenizer_class(tokenizer_object=backend, **specials)
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    tokenizer.model_max_length = max_positions
    vocab_size = len(tokenizer)
    pad_id = tokenizer.pad_token_id

    if family == "bert":
        config = BertConfig(vocab_size=vocab_size, max_position_embeddings=max_positions, pad_token_id=pad_id, **TINY)
    elif family == "distilbert":
        config = DistilBertConfig(
            vocab_size=vocab_size,
            max_position_embeddings=max_positions,
            pad_token_id=pad_id,
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=37,
        )
    elif family == "roberta":
        config = RobertaConfig(
            vocab_size=vocab_size,
            max_position_embeddings=max_positions + 2,
            pad_token_id=pad_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **TINY,
        )
    else:
        config = ModernBertConfig(
            vocab_size=vocab_size,
            max_position_embeddings=max_positions,
            pad_token_id=pad_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=40,
            global_attn_every_n_layers=2,
            local_attention=16,
        )
    torch.manual_seed(1234)  # the same random weights in every run: no test passes or fails by the draw
    model = AutoModel.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
