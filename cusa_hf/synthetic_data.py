"""A small generated image-caption set in the authors' JSON format, used by the built-in default run when coco_mini
is not available: coloured shapes on coloured backgrounds, five template captions per image."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (210, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 210), "yellow": (230, 210, 40), "purple": (140, 60, 170)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = (
    "a {color} {shape} on a {background} background",
    "a picture of a {color} {shape}",
    "the {shape} is {color} and the background is {background}",
    "one {color} {shape} in front of {background}",
    "a {background} image with a {color} {shape}",
)


def _draw(color: str, shape: str, background: str, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (128, 128), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    size = rng.randint(40, 80)
    x, y = rng.randint(0, 128 - size), rng.randint(0, 128 - size)
    box = (x, y, x + size, y + size)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=COLORS[color])
    return image


def write_shapes_dataset(folder: Path, train_images: int = 240, test_images: int = 60, seed: int = 0) -> Path:
    """Write ``images/``, ``train.json`` and ``test.json`` under ``folder`` (once) and return the folder."""
    folder = Path(folder)
    if (folder / "train.json").is_file() and (folder / "test.json").is_file():
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits = {"train": [], "test": []}
    for index in range(train_images + test_images):
        color, shape, background = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
        name = f"images/shape_{index:04d}.png"
        _draw(color, shape, background, rng).save(folder / name)
        split = "train" if index < train_images else "test"
        for template in TEMPLATES:
            caption = template.format(color=color, shape=shape, background=background)
            splits[split].append({"image": name, "caption": caption, "image_id": f"shape_{index:04d}"})
    for split, records in splits.items():
        (folder / f"{split}.json").write_text(json.dumps(records, indent=1))
    return folder
