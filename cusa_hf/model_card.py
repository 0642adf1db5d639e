"""Model cards for fine-tuned CUSA checkpoints: what was trained, on what, with which settings, and how well."""

from __future__ import annotations

import os
from typing import Any

from .evaluation.metrics import RETRIEVAL_METRIC_NAMES as METRIC_COLUMNS

CARD_FIELDS = (
    "use_csa", "csa_weight", "use_usa", "usa_weight", "itc_temperature", "csa_temperature", "usa_image_temperature",
    "usa_text_temperature", "softlabel_temperature", "softlabel_mode", "softlabel_loss", "itc_reduction",
    "gather_features",
)  # fmt: skip


def render_model_card(config: Any, metrics: dict[str, float], backbone: str, data: str, command: str) -> str:
    """Markdown (with Hub metadata) describing a CUSA checkpoint; ``metrics`` keys look like ``test_rsum``."""
    splits = sorted({key.rsplit("_", 2)[0] for key in metrics if key.endswith(METRIC_COLUMNS)})
    header = "| split | " + " | ".join(METRIC_COLUMNS) + " |\n|---|" + "---|" * len(METRIC_COLUMNS)
    rows = [
        f"| {split} | " + " | ".join(f"{metrics[f'{split}_{c}']:.2f}" if f"{split}_{c}" in metrics else "" for c in METRIC_COLUMNS) + " |"
        for split in splits
    ]
    settings = "\n".join(f"| {name} | {getattr(config, name)} |" for name in CARD_FIELDS)
    teachers = config.teacher_info or {}
    teacher_lines = "\n".join(f"- `{column}`: {info}" for column, info in teachers.items()) or "- not recorded"
    return f"""---
library_name: transformers
tags:
- cusa
- image-text-retrieval
- cusa-hf
---

# CUSA fine-tuned retrieval model

Backbone `{backbone}` (`{config.backbone_config.model_type}`) fine-tuned with CUSA (Cross-modal and Uni-modal
Soft-label Alignment, Huang et al., AAAI 2024) with cusa-hf. Load it with
`cusa_hf.CusaModel.from_pretrained(...)`, or `transformers.AutoModel.from_pretrained(..., trust_remote_code=True)`
without the package.

## Data

{data}

## Retrieval results

R@K in percent; image-to-text counts a hit when any of the image's captions is within the top K; RSUM is the sum of
the six recalls. Model selection used the validation split only.

{header}
{chr(10).join(rows) if rows else "| (no evaluation) |"}

## CUSA settings

| field | value |
|---|---|
{settings}

## Teachers

{teacher_lines}

## Command

```
{command}
```
"""


def write_model_card(output_dir: str, config: Any, metrics: dict[str, float], **kwargs: Any) -> str:
    """Write ``README.md`` into ``output_dir`` and return its path."""
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render_model_card(config, metrics, **kwargs))
    return path
