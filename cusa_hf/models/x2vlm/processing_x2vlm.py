"""X2-VLM processor: uncased BERT tokenizer (max 40 tokens, optional original caption cleaning) + 384 px bicubic
square resize with CLIP mean/std (transformers' BLIP image processor is exactly the original test transform)."""

from __future__ import annotations

import re

from transformers import BertTokenizer, ProcessorMixin
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

_PUNCTUATION = re.compile(r"([.!\"()*#:;~,'?`])")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """The original's caption cleaning: lowercase; ``<person>`` -> ``person``; the characters ``,.'!?"()*#:;~` ``
    and ``-``, ``/`` become spaces; whitespace collapsed; at most ``max_words`` words."""
    caption = _PUNCTUATION.sub(" ", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    words = caption.split()
    if not words:
        raise ValueError(f"caption {caption!r} is empty after cleaning")
    return " ".join(words[:max_words])


class X2VlmProcessor(ProcessorMixin):
    """Tokenizer + image processor of X2-VLM.

    Args:
        image_processor: a ``BlipImageProcessorPil`` (384 x 384 bicubic, CLIP mean/std; the PIL backend matches the
            original torchvision-on-PIL resize).
        tokenizer: an uncased ``BertTokenizer`` (bert-base-uncased vocabulary, also used by the large model).
        clean_captions: apply :func:`pre_caption` to every caption before tokenising (the original does).
        max_words: words kept by the cleaning.
    """

    # The PIL backend resizes exactly as the original torchvision-on-PIL transform; keep it on reload.
    image_processor_class = "BlipImageProcessorPil"
    tokenizer_class = ("BertTokenizer", "BertTokenizerFast")

    def __init__(self, image_processor, tokenizer, clean_captions: bool = True, max_words: int = 30, **kwargs):
        self.clean_captions = clean_captions
        self.max_words = max_words
        super().__init__(image_processor, tokenizer)

    def __call__(self, images=None, text=None, **kwargs):
        if text is not None and self.clean_captions:
            text = pre_caption(text, self.max_words) if isinstance(text, str) else [pre_caption(t, self.max_words) for t in text]
        if text is not None:
            kwargs.setdefault("max_length", self.tokenizer.model_max_length)
            kwargs.setdefault("truncation", True)
        return super().__call__(images=images, text=text, **kwargs)

    @classmethod
    def from_vocab(cls, vocab_file: str, image_size: int = 384, max_length: int = 40, **kwargs) -> "X2VlmProcessor":
        """Build from a BERT ``vocab.txt`` (e.g. bert-base-uncased's), without the Hub."""
        tokenizer = BertTokenizer(vocab_file, do_lower_case=True, model_max_length=max_length)
        image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
        return cls(image_processor, tokenizer, **kwargs)


__all__ = ["X2VlmProcessor", "pre_caption"]
