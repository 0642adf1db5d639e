"""Word-level tokenizer of SGRAF (and SCAN / VSE++): lower-cased NLTK word tokens over a fixed vocabulary.

The vocabulary file is the original JSON (``{"word2idx": {...}, "idx2word": {...}, "idx": N}``, as the released
``vocab/{coco,f30k}_precomp_vocab.json``); a plain ``{word: id}`` mapping is read too. Nothing is downloaded: the
released vocabularies come with the original repository, and :func:`build_vocab` makes one from captions
(words seen at least ``min_count`` times, the original threshold being 4).

Tokenisation: the original calls ``nltk.word_tokenize(caption.lower())``, which splits the caption into sentences
with NLTK's trained Punkt model for English and runs the Treebank word tokenizer on each sentence, so the period
between two sentences becomes a token of its own. That model is data downloaded apart from the nltk package
(``punkt_tab``), so here the sentences come from an untrained ``nltk.tokenize.PunktSentenceTokenizer`` (the same
algorithm without learned parameters, no download) and each goes through the same Treebank word tokenizer. It is
used even where ``punkt_tab`` is installed, so the tokens, and a vocabulary built from them, do not depend on the
machine. On lower-cased captions the two splitters differ only after a word the trained model lists as an
abbreviation (``mr``, ``dr``, ``st``, ``vs``, ``u.s``, ``a.m``, ...) when more text follows: the original keeps
``"st."`` as one token, here it is ``"st"``, ``"."``. They agree on all 4,000 captions of the coco_mini sample.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from typing import Iterable

from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "vocab.json"}
SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")  # ids 0..3, in this order, in every SGRAF vocabulary


@functools.lru_cache(maxsize=1)
def _sentence_splitter():
    try:
        from nltk.tokenize import PunktSentenceTokenizer
    except ImportError as error:
        raise ImportError(
            "SgrafTokenizer needs nltk for the original word tokenisation: pip install 'cusa-hf[sgraf]' (or nltk)"
        ) from error
    return PunktSentenceTokenizer()  # untrained: needs no punkt data (see the module docstring)


def word_tokenize(text: str) -> list[str]:
    """Lower-case NLTK word tokens of one caption, sentence by sentence as ``nltk.word_tokenize`` splits them (see the
    module docstring for the one difference: abbreviations of NLTK's trained English model)."""
    from nltk.tokenize import word_tokenize as treebank_word_tokenize

    sentences = _sentence_splitter().tokenize(text.lower())
    return [token for sentence in sentences for token in treebank_word_tokenize(sentence, preserve_line=True)]


def read_vocab(vocab_file: str | os.PathLike) -> dict[str, int]:
    """``word -> id`` from an original SGRAF vocabulary JSON or a plain ``{word: id}`` JSON, validated."""
    with open(vocab_file, encoding="utf-8") as handle:
        data = json.load(handle)
    word2idx = data["word2idx"] if isinstance(data, dict) and "word2idx" in data else data
    if not isinstance(word2idx, dict) or not all(isinstance(v, int) for v in word2idx.values()):
        raise ValueError(f"{vocab_file}: expected {{'word2idx': {{word: id}}, ...}} or {{word: id}}")
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if word2idx.get(token) != expected_id:
            raise ValueError(
                f"{vocab_file}: special token {token!r} must have id {expected_id}, found {word2idx.get(token)!r}"
            )
    if sorted(word2idx.values()) != list(range(len(word2idx))):
        raise ValueError(f"{vocab_file}: word ids must be exactly 0..{len(word2idx) - 1} with no gaps or repeats")
    return word2idx


def build_vocab(captions: Iterable[str], min_count: int = 4) -> dict[str, int]:
    """A vocabulary the way the original builds one: the four special tokens, then every word seen at least
    ``min_count`` times, in order of first appearance."""
    counts = Counter(token for caption in captions for token in word_tokenize(caption))
    words = [word for word, count in counts.items() if count >= min_count and word not in SPECIAL_TOKENS]
    return {token: index for index, token in enumerate([*SPECIAL_TOKENS, *words])}


def write_vocab(word2idx: dict[str, int], path: str | os.PathLike) -> None:
    """Write ``word2idx`` in the original JSON layout (``word2idx``, ``idx2word`` with string keys, ``idx``)."""
    idx2word = {str(index): word for word, index in word2idx.items()}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"word2idx": word2idx, "idx2word": idx2word, "idx": len(word2idx)}, handle, ensure_ascii=False)


class SgrafTokenizer(PreTrainedTokenizer):
    """``<start> w_1 ... w_n <end>`` word ids for SGRAF; unknown words map to ``<unk>``, padding is ``<pad>`` = 0.

    Args:
        vocab_file: original SGRAF vocabulary JSON (or ``{word: id}``).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<start>",
        eos_token: str = "<end>",
        pad_token: str = "<pad>",
        **kwargs,
    ):
        self.word2idx = read_vocab(vocab_file)
        self.idx2word = {index: word for word, index in self.word2idx.items()}
        kwargs.setdefault("special_tokens_pattern", "bos_eos")
        kwargs.setdefault("padding_side", "right")  # the model packs captions by length: padding must be on the right
        super().__init__(
            unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, **kwargs
        )

    @classmethod
    def from_captions(
        cls, captions: Iterable[str], save_directory: str | os.PathLike, min_count: int = 4, **kwargs
    ) -> "SgrafTokenizer":
        """Build a vocabulary from training captions, write it to ``save_directory/vocab.json``, and load it."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, VOCAB_FILES_NAMES["vocab_file"])
        write_vocab(build_vocab(captions, min_count), path)
        return cls(vocab_file=path, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.word2idx)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.word2idx)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return word_tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.word2idx.get(token, self.word2idx[self.unk_token])

    def _convert_id_to_token(self, index: int) -> str:
        return self.idx2word.get(index, self.unk_token)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name)
        write_vocab(self.word2idx, path)
        return (path,)
