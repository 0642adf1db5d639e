"""Tiny randomly initialised backbones, processors and datasets built in code (no Hub, no files)."""

from __future__ import annotations

import numpy as np
from PIL import Image

WORDS = (
    "a the an of on in with and is are red green blue yellow black white cat dog horse bus car man woman child "
    "plate pizza sofa table street field grass water sitting standing running parked eating two three small large"
).split()
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
OBJECTS = ("cat", "dog", "bus", "pizza")


def tiny_tokenizer(max_length: int = 16):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3, **{word: index + 4 for index, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # CLIP pools the text at the EOS token, so captions must end with one, as real CLIP tokenizers do.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", model_max_length=max_length
    )


def tiny_clip_processor(image_size: int = 32):
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer())


def tiny_clip_config(image_size: int = 32, projection_dim: int = 16):
    from transformers import CLIPConfig

    vocab_size = len(WORDS) + 4
    return CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=vocab_size,
            max_position_embeddings=32,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=8
        ),
        projection_dim=projection_dim,
    )


def tiny_cusa_model(seed: int = 0, **cusa_fields):
    import torch

    from cusa_hf import CusaConfig, CusaModel

    torch.manual_seed(seed)
    return CusaModel(CusaConfig(backbone_config=tiny_clip_config(), **cusa_fields))


def synthetic_pairs(num_images: int = 8, captions_per_image: int = 2, seed: int = 0, teacher_dims=(12, 10)):
    """Rows of coloured-object images with matching captions, image ids and teacher features (as lists)."""
    rng = np.random.default_rng(seed)
    rows = []
    colors = list(COLORS)
    for image_index in range(num_images):
        color = colors[image_index % len(colors)]
        obj = OBJECTS[(image_index // len(colors)) % len(OBJECTS)]
        pixels = np.full((40, 40, 3), COLORS[color], dtype=np.uint8)
        pixels[10:30, 10:30] = rng.integers(0, 255, size=3, dtype=np.uint8)
        image = Image.fromarray(pixels)
        teacher_image = rng.normal(size=teacher_dims[0]).astype(np.float32)
        for caption_index in range(captions_per_image):
            caption = f"a {color} {obj} on the street" if caption_index % 2 == 0 else f"the {obj} is {color}"
            rows.append(
                {
                    "image": image,
                    "caption": caption,
                    "image_id": f"img{image_index}",
                    "teacher_image_embeds": teacher_image.tolist(),
                    "teacher_text_embeds": rng.normal(size=teacher_dims[1]).astype(np.float32).tolist(),
                }
            )
    return rows


def synthetic_dataset(**kwargs):
    import datasets

    rows = synthetic_pairs(**kwargs)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "image_id": datasets.Value("string"),
            "teacher_image_embeds": datasets.Sequence(datasets.Value("float32")),
            "teacher_text_embeds": datasets.Sequence(datasets.Value("float32")),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def train_steps(model, pixels, ids, mask, image_ids, teacher_image, teacher_text, steps: int = 12, lr: float = 2e-3):
    """Losses of ``steps`` AdamW steps of ``model`` on one batch (seeded per step: fusion backbones draw hard
    negatives)."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        out = model(pixels, ids, mask, image_ids=image_ids, teacher_image_embeds=teacher_image,
                    teacher_text_embeds=teacher_text)  # fmt: skip
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return losses


def tiny_siglip_config(version: int = 1):
    """A tiny random ``SiglipConfig`` (``version=1``) or ``Siglip2Config`` (``version=2``): 64 text positions, as SigLIP
    pads every caption to 64 tokens; SigLIP 2's vision tower takes up to 16 NaFlex patches of 8 x 8 pixels."""
    from transformers import Siglip2Config, SiglipConfig

    text_config = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, vocab_size=len(WORDS) + 4,
        max_position_embeddings=64,
    )  # fmt: skip
    vision_config = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
    if version == 1:
        return SiglipConfig(text_config=text_config, vision_config=dict(vision_config, image_size=32))
    return Siglip2Config(text_config=text_config, vision_config=dict(vision_config, num_patches=16))


def tiny_siglip_processor(version: int = 1):
    """The matching processor: SigLIP's fixed 32 x 32 images, or SigLIP 2's NaFlex patches (at most 16 of 8 x 8)."""
    from transformers import Siglip2ImageProcessor, Siglip2Processor, SiglipImageProcessor, SiglipProcessor

    if version == 1:
        return SiglipProcessor(SiglipImageProcessor(size={"height": 32, "width": 32}), tiny_tokenizer())
    return Siglip2Processor(Siglip2ImageProcessor(patch_size=8, max_num_patches=16), tiny_tokenizer())
