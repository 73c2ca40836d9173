"""Loading a Hugging Face ``tokenizers`` tokenizer, training a byte-level BPE, and telling
whether a tokenizer may be fed BPE-safe pieces (:func:`cuts_are_exact`)."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

from .errors import PackError
from .split import split_text

#: The special token a trained BPE gets and whose id ``pack`` appends to every document.
EOT = "<|endoftext|>"

_EXACT_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents", "Replace", "BertNormalizer",
                      "Nmt", "Sequence"}
_CUT_PROBE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
              "It's 2024; we've 3.14 reasons -- don't we? Ça va, 東京!\tTabs\r\nand  two  spaces.\n" * 8)


def load_tokenizer(path: str) -> Any:
    """Load a Hugging Face tokenizers ``tokenizer.json``.

    Raises:
        PackError: tokenizers is not installed; ``path`` is missing, not a file, or not a
            tokenizers file (names it).
    """
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PackError("llmio pack needs the tokenizers package: pip install 'llmio-native[pack]'") from None
    if not os.path.isfile(path):
        raise PackError(f"{path}: no such tokenizer file" if not os.path.exists(path) else
                        f"{path}: not a file (--tokenizer wants a tokenizer.json file)")
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception for bad files
        raise PackError(f"{path}: not a Hugging Face tokenizers file ({str(exc).splitlines()[0]})") from None


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str, show_progress: bool = False) -> Any:
    """Train a byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder, the 256
    byte symbols, special token ``<|endoftext|>``) on ``texts`` and save it to ``out_path``.

    Args:
        texts: training text, e.g. the ``text`` of :func:`llmio_native.pack.inputs.iter_pieces`.
        vocab_size: final vocabulary size, special token and byte alphabet included (>= 257).
        out_path: where to write the ``tokenizer.json``.
        show_progress: the tokenizers trainer's own progress bar.

    Returns:
        The trained ``tokenizers.Tokenizer``.

    Raises:
        PackError: tokenizers is not installed; ``out_path`` cannot be written (names it);
            (from ``texts``) a bad input, as :func:`~llmio_native.pack.inputs.iter_pieces` raises.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise PackError("--train-bpe needs the tokenizers package: pip install 'llmio-native[pack]'") from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    try:
        tok.save(out_path)
    except Exception as exc:  # tokenizers raises a bare Exception for I/O errors
        raise PackError(f"{out_path}: cannot save the trained tokenizer ({str(exc).splitlines()[0]}); "
                        "a temp directory is on a full or read-only disk? set TMPDIR") from None
    return tok


def _kinds(node: Any) -> list[str]:
    if node is None:
        return []
    if isinstance(node, dict):
        out = [str(node.get("type"))] if "type" in node else []
        for v in node.values():
            out += _kinds(v)
        return out
    if isinstance(node, list):
        return [k for v in node for k in _kinds(v)]
    return []


def cuts_are_exact(tok: Any) -> bool:
    """Whether tokenizing a document in pieces cut by :func:`~llmio_native.pack.split.safe_cut`
    gives the ids of one call on the whole document, for this tokenizer.

    True for byte-level BPE tokenizers (GPT-2, GPT-4 style, Llama 3, the ``--train-bpe``
    ones): a ByteLevel pre-tokenizer without prefix space, no Metaspace, only local
    normalizers; and checked on a probe text. False for SentencePiece-style tokenizers
    (Metaspace, a prepended "▁"), which mark the start of every call.

    Raises:
        Nothing (beyond what the tokenizer itself raises).
    """
    spec = json.loads(tok.to_str())
    norm = _kinds(spec.get("normalizer"))
    pre_node = spec.get("pre_tokenizer")
    pre = _kinds(pre_node)
    if any(k not in _EXACT_NORMALIZERS for k in norm) or "ByteLevel" not in pre or "Metaspace" in pre:
        return False
    if '"add_prefix_space": true' in json.dumps(pre_node):
        return False
    whole = tok.encode(_CUT_PROBE, add_special_tokens=False).ids
    parts = split_text(_CUT_PROBE, 40)
    cut = [i for e in tok.encode_batch(parts, add_special_tokens=False) for i in e.ids]
    return cut == whole


def vocab_bound(tok: Any) -> int:
    """One past the largest id the tokenizer can produce.

    Raises:
        Nothing.
    """
    ids = tok.get_vocab(with_added_tokens=True).values()
    return max(max(ids, default=-1) + 1, tok.get_vocab_size(with_added_tokens=True))
