"""Convert an original X2-VLM ``.th`` checkpoint into a ``save_pretrained`` folder (safetensors) for `X2VlmModel`.

    python -m cusa_hf.models.x2vlm.convert --checkpoint xvlm_beit_1b_stage2_coco_rerun.th --out x2vlm-base-coco

Both layouts of the original are accepted: fine-tuned retrieval checkpoints (``XVLMForRetrieval``: keys
``text_encoder.encoder.layer.*``) and pretrained ones (``XVLM`` with the MLM head: ``text_encoder.bert.*``, plus
``text_encoder.cls.*``, ``bbox_head.*`` and possibly ``absolute_frame_pos_embed``). The mapping is strict: every source
key is either renamed onto exactly one target key (shapes checked) or dropped for a reason listed in
``DROPPED_KEY_REASONS``; every target key must be filled. The configuration is inferred from tensor shapes and
cross-checked against the yaml the original embeds as ``ckpt["config"]``.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .configuration_x2vlm import X2VlmConfig
from .modeling_x2vlm import X2VlmModel, beit_relative_position_index

# Why a source key has no target. Matched in order against the (prefix-normalised) source key.
DROPPED_KEY_REASONS: list[tuple[str, str]] = [
    (r"^vision_encoder\.blocks\.\d+\.attn\.relative_position_index$",
     "index buffer: recomputed from the grid size (checked equal to the stored one)"),
    (r"^text_encoder\.embeddings\.position_ids$", "arange buffer: positions are computed at run time (checked)"),
    (r"^text_encoder\.cls\.", "masked-language-model head of pretraining, unused by retrieval"),
    (r"^bbox_head\.", "bounding-box head of pretraining, unused by retrieval"),
    (r"^absolute_frame_pos_embed$", "video frame position embedding of stage-2 pretraining, unused for images"),
]

# The BERT convention of the original's text encoders (bert-base-uncased: 768/12, bert-large-uncased: 1024/16);
# head count is not recoverable from weight shapes.
BERT_HEAD_DIM = 64


class ConversionError(ValueError):
    """The checkpoint cannot be mapped onto `X2VlmModel`; the message names the keys, shapes or config values."""


@dataclass
class ConversionReport:
    """What the conversion did with every source key."""

    renamed: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    interpolated: list[str] = field(default_factory=list)

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for reason in self.dropped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        lines = [f"{len(self.renamed)} tensors mapped, {len(self.dropped)} dropped:"]
        lines += [f"  {count:4d} x {reason}" for reason, count in reasons.items()]
        if self.interpolated:
            lines.append(f"{len(self.interpolated)} relative-position tables interpolated")
        return "\n".join(lines)


def load_original_checkpoint(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read an original ``.th`` file: ``(state_dict, embedded_yaml_config_or_None)``.

    Loads with ``weights_only=True``, which refuses arbitrary pickled objects. If the file needs more (an old
    checkpoint whose embedded config holds non-builtin objects), this raises unless ``allow_pickle`` is set, which
    runs the file's pickle code: only do that for files from a source you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"X2-VLM checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not allow_pickle:
            raise ConversionError(
                f"{path} cannot be loaded with torch.load(weights_only=True): {str(error).splitlines()[0]}\n"
                "It contains pickled objects beyond tensors and plain containers. If you trust the file's source, "
                "pass allow_pickle=True (the converter's --allow-pickle): it loads with weights_only=False, which "
                "executes code from the file."
            ) from None
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    state_dict = checkpoint.get("model", checkpoint)
    embedded = checkpoint.get("config") if "model" in checkpoint else None
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(state_dict):
        other = sorted(set(state_dict) - set(tensors))[:5]
        raise ConversionError(f"{path}: state dict has non-tensor entries, e.g. {other}")
    return tensors, (dict(embedded) if isinstance(embedded, Mapping) else None)


def normalise_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``text_encoder.bert.`` (pretrained ``BertForMaskedLM`` layout) to ``text_encoder.``."""
    if any(key.startswith("text_encoder.roberta.") for key in state_dict):
        raise ConversionError(
            "checkpoint has a RoBERTa/XLM-R text encoder (text_encoder.roberta.*): CCLM/multilingual X2-VLM "
            "checkpoints are not supported, only the English BERT ones"
        )
    return {
        ("text_encoder." + key[len("text_encoder.bert."):] if key.startswith("text_encoder.bert.") else key): value
        for key, value in state_dict.items()
    }


def _indices(state_dict: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))})


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ConversionError(f"checkpoint lacks {key!r}: not an X2-VLM (BEiT-v2 + BERT) retrieval or pretraining checkpoint")
    return state_dict[key]


def grid_size_from_table_rows(rows: int) -> int:
    """Invert ``rows = (2G - 1)^2 + 3``."""
    span = math.isqrt(rows - 3)
    if span * span != rows - 3 or span % 2 == 0:
        raise ConversionError(f"relative_position_bias_table has {rows} rows, not (2G-1)^2 + 3 for an integer grid G")
    return (span + 1) // 2


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    embedded: Mapping[str, Any] | None = None,
    text_head_dim: int = BERT_HEAD_DIM,
) -> X2VlmConfig:
    """The `X2VlmConfig` a (prefix-normalised) original state dict was built with, from tensor shapes.

    Shapes give every width, depth, the vision head count and the image size. Text heads follow BERT's 64-wide
    heads (``text_head_dim``). ``temp``, ``k_test``, ``max_tokens`` and ``dropout`` come from the embedded yaml
    when present.
    """
    blocks = _indices(state_dict, r"^vision_encoder\.blocks\.(\d+)\.")
    layers = _indices(state_dict, r"^text_encoder\.encoder\.layer\.(\d+)\.")
    fusion = _indices(state_dict, r"^text_encoder\.encoder\.layer\.(\d+)\.crossattention\.")
    if not blocks or not layers or not fusion:
        raise ConversionError(
            f"checkpoint has {len(blocks)} vision blocks, {len(layers)} text layers and {len(fusion)} cross-attention "
            "layers; an X2-VLM checkpoint has all three"
        )
    if blocks != list(range(len(blocks))) or layers != list(range(len(layers))):
        raise ConversionError(f"non-contiguous block/layer indices: vision {blocks}, text {layers}")
    fusion_start = fusion[0]
    if fusion != list(range(fusion_start, len(layers))):
        raise ConversionError(f"cross-attention layers {fusion} are not the last layers of the 0..{len(layers) - 1} stack")

    patch_weight = _require(state_dict, "vision_encoder.patch_embed.proj.weight")
    table = _require(state_dict, "vision_encoder.blocks.0.attn.relative_position_bias_table")
    patch_size = patch_weight.shape[-1]
    vision_width = _require(state_dict, "vision_encoder.cls_token").shape[-1]
    word_embeddings = _require(state_dict, "text_encoder.embeddings.word_embeddings.weight")
    text_width = word_embeddings.shape[1]
    if text_width % text_head_dim:
        raise ConversionError(f"text width {text_width} is not a multiple of the head width {text_head_dim}")
    embedded = embedded or {}
    vision = dict(
        hidden_size=vision_width,
        num_hidden_layers=len(blocks),
        num_attention_heads=table.shape[1],
        intermediate_size=_require(state_dict, "vision_encoder.blocks.0.mlp.fc1.weight").shape[0],
        image_size=grid_size_from_table_rows(table.shape[0]) * patch_size,
        patch_size=patch_size,
        num_channels=patch_weight.shape[1],
    )
    text = dict(
        vocab_size=word_embeddings.shape[0],
        hidden_size=text_width,
        num_text_layers=fusion_start,
        num_fusion_layers=len(layers) - fusion_start,
        num_attention_heads=text_width // text_head_dim,
        intermediate_size=_require(state_dict, "text_encoder.encoder.layer.0.intermediate.dense.weight").shape[0],
        max_position_embeddings=_require(state_dict, "text_encoder.embeddings.position_embeddings.weight").shape[0],
        type_vocab_size=_require(state_dict, "text_encoder.embeddings.token_type_embeddings.weight").shape[0],
    )
    if "dropout" in embedded:
        text["hidden_dropout_prob"] = float(embedded["dropout"])
    top: dict[str, Any] = {"embed_dim": _require(state_dict, "vision_proj.weight").shape[0]}
    if "temp" in embedded:
        top["temp"] = float(embedded["temp"])
    if "k_test" in embedded:
        top["k_test"] = int(embedded["k_test"])
    if "max_tokens" in embedded:
        top["max_text_length"] = int(embedded["max_tokens"])
    return X2VlmConfig(vision_config=vision, text_config=text, **top)


def cross_check_embedded_config(config: X2VlmConfig, embedded: Mapping[str, Any] | None) -> list[str]:
    """Disagreements between the inferred config and the original yaml embedded in the checkpoint (empty if none)."""
    if not embedded:
        return []
    problems = []

    def check(key: str, expected: Any, found: Any) -> None:
        if found != expected:
            problems.append(f"ckpt['config'][{key!r}] = {found!r} but the weights say {expected!r}")

    vision, text = config.vision_config, config.text_config
    if "use_beit_v2" in embedded and not embedded["use_beit_v2"]:
        problems.append("ckpt['config']['use_beit_v2'] is False: Swin/CLIP-ViT X-VLM checkpoints are not supported")
    if "image_res" in embedded:
        check("image_res", vision.image_size, embedded["image_res"])
    if "patch_size" in embedded:
        check("patch_size", vision.patch_size, embedded["patch_size"])
    if "embed_dim" in embedded:
        check("embed_dim", config.embed_dim, embedded["embed_dim"])
    if "text_num_hidden_layers" in embedded:
        check("text_num_hidden_layers", text.num_text_layers + text.num_fusion_layers, embedded["text_num_hidden_layers"])
    if "text_fusion_start_at" in embedded:
        check("text_fusion_start_at", text.num_text_layers, embedded["text_fusion_start_at"])
    # The size is only named in the config paths ('configs/config_beit2_base.json', 'data/bert-large-uncased').
    for key, width in (("vision_config", vision.hidden_size), ("text_encoder", text.hidden_size)):
        path = str(embedded.get(key, ""))
        for size, expected_width in (("base", 768), ("large", 1024)):
            if size in path and width != expected_width:
                problems.append(f"ckpt['config'][{key!r}] = {path!r} names a {size} model but the width is {width}")
    return problems


def interpolate_relative_position_table(table: torch.Tensor, target_grid: int) -> torch.Tensor:
    """Resample a BEiT relative-position table to ``target_grid`` patches per side, as the original loader does.

    The `(2G-1)^2` offset grid is sampled at geometrically spaced source positions (ratio found by bisection so that
    the outermost source offset reaches the target's) and evaluated at the target's integer offsets with a bicubic
    interpolating spline per head (s=0); the 3 CLS rows are kept. `(rows, heads)` -> `((2T-1)^2 + 3, heads)`.
    """
    import numpy as np
    from scipy.interpolate import RectBivariateSpline

    source_span = 2 * grid_size_from_table_rows(table.shape[0]) - 1
    target_span = 2 * target_grid - 1
    if source_span == target_span:
        return table.clone()
    offsets, cls_rows = table[:-3].float(), table[-3:]
    half_source, half_target = source_span // 2, target_span // 2

    def reach(ratio: float) -> float:  # 1 + r + ... + r^(n-1): the outermost source offset for ratio r
        return (1.0 - ratio**half_source) / (1.0 - ratio)

    low, high = 1.01, 1.5
    while high - low > 1e-6:
        ratio = (low + high) / 2.0
        if reach(ratio) > half_target:
            high = ratio
        else:
            low = ratio
    steps = np.cumsum([ratio**i for i in range(half_source)])  # 1, 1+r, 1+r+r^2, ...
    positions = np.concatenate([-steps[::-1], [0.0], steps])
    targets = np.arange(-half_target, half_target + 0.1, 1.0)
    heads = []
    for head in range(table.shape[1]):
        grid = offsets[:, head].view(source_span, source_span).numpy().astype(np.float64)
        spline = RectBivariateSpline(positions, positions, grid, kx=3, ky=3, s=0)
        heads.append(torch.from_numpy(spline(targets, targets)).float().reshape(-1))
    return torch.cat([torch.stack(heads, dim=1).to(table.dtype), cls_rows], dim=0)


def target_key(source_key: str, num_text_layers: int) -> str | None:
    """The `X2VlmModel` key of a prefix-normalised original key (None if it has no rename rule)."""
    if source_key.startswith("vision_encoder."):
        return "vision_model." + source_key[len("vision_encoder."):]
    if source_key.startswith("text_encoder.embeddings."):
        return "text_model." + source_key[len("text_encoder."):]
    if m := re.match(r"^text_encoder\.encoder\.layer\.(\d+)\.(.+)$", source_key):
        index, rest = int(m.group(1)), m.group(2)
        if index < num_text_layers:
            return f"text_model.layer.{index}.{rest}"
        return f"fusion_model.layer.{index - num_text_layers}.{rest}"
    if re.match(r"^(vision_proj|text_proj|itm_head)\.", source_key) or source_key == "temp":
        return source_key
    return None


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: X2VlmConfig,
    target_image_size: int | None = None,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map a prefix-normalised original state dict onto `X2VlmModel(config)`'s keys, strictly.

    With ``target_image_size`` different from ``config.vision_config.image_size`` the relative-position tables are
    interpolated to the new grid (``config`` is the source config; build the model with the target size).
    """
    report = ConversionReport()
    num_text_layers = config.text_config.num_text_layers
    source_grid = config.vision_config.grid_size
    target_grid = (target_image_size or config.vision_config.image_size) // config.vision_config.patch_size
    expected_index = beit_relative_position_index(source_grid)
    converted: dict[str, torch.Tensor] = {}
    unexplained = []
    for key, tensor in state_dict.items():
        reason = next((why for pattern, why in DROPPED_KEY_REASONS if re.match(pattern, key)), None)
        if reason is not None:
            if key.endswith("relative_position_index") and not torch.equal(tensor.long(), expected_index):
                raise ConversionError(f"{key} differs from the BEiT index of a {source_grid}x{source_grid} grid")
            if key.endswith("position_ids") and not torch.equal(tensor.view(-1).long(), torch.arange(tensor.numel())):
                raise ConversionError(f"{key} is not 0..{tensor.numel() - 1}; custom position ids are not supported")
            report.dropped[key] = reason
            continue
        name = target_key(key, num_text_layers)
        if name is None:
            unexplained.append(key)
            continue
        if key.endswith("relative_position_bias_table") and target_grid != source_grid:
            tensor = interpolate_relative_position_table(tensor, target_grid)
            report.interpolated.append(key)
        converted[name] = tensor
        report.renamed[key] = name
    if unexplained:
        raise ConversionError(f"{len(unexplained)} checkpoint keys have no target and no drop reason: {unexplained[:10]}")
    return converted, report


def load_into_model(converted: Mapping[str, torch.Tensor], config: X2VlmConfig) -> X2VlmModel:
    """Build `X2VlmModel(config)` and fill it from ``converted``: every target key present, every shape equal."""
    model = X2VlmModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    wrong = [
        f"{key}: checkpoint {tuple(converted[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(converted))
        if converted[key].shape != expected[key].shape
    ]
    if missing or extra or wrong:
        raise ConversionError(f"state dict does not match X2VlmModel: missing {missing[:10]}, unexpected {extra[:10]}, "
                              f"shape mismatches {wrong[:10]}")
    model.load_state_dict({key: value.to(expected[key].dtype) for key, value in converted.items()}, strict=True)
    return model.eval()


def convert_checkpoint(
    checkpoint: str | Path,
    out: str | Path | None = None,
    image_size: int | None = None,
    allow_pickle: bool = False,
    text_head_dim: int = BERT_HEAD_DIM,
) -> tuple[X2VlmModel, ConversionReport]:
    """Convert ``checkpoint`` to an `X2VlmModel`; save it to ``out`` (safetensors) when given.

    ``image_size`` (e.g. 384 for a 224 px pretrained checkpoint) interpolates the relative-position tables.
    """
    state_dict, embedded = load_original_checkpoint(checkpoint, allow_pickle=allow_pickle)
    state_dict = normalise_prefixes(state_dict)
    config = infer_config(state_dict, embedded, text_head_dim=text_head_dim)
    problems = cross_check_embedded_config(config, embedded)
    if problems:
        raise ConversionError(f"{checkpoint}: the embedded config disagrees with the weights:\n  " + "\n  ".join(problems))
    converted, report = convert_state_dict(state_dict, config, target_image_size=image_size)
    if image_size is not None:
        config.vision_config.image_size = image_size
        config = X2VlmConfig(**config.to_dict())  # re-validate image_size against patch_size
    model = load_into_model(converted, config)
    if out is not None:
        model.save_pretrained(out, safe_serialization=True)
    return model, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="original .th file (fine-tuned or pretrained)")
    parser.add_argument("--out", required=True, help="output folder for save_pretrained (safetensors)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resolution to run at; interpolates the relative-position tables (e.g. 384 for a 224 px pretrained checkpoint)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="fall back to torch.load(weights_only=False) for files that need it (runs code from the file: trusted files only)")
    parser.add_argument("--text-head-dim", type=int, default=BERT_HEAD_DIM, help="width of a text attention head (BERT: 64)")
    args = parser.parse_args(argv)
    model, report = convert_checkpoint(args.checkpoint, args.out, args.image_size, args.allow_pickle, args.text_head_dim)
    vision, text = model.config.vision_config, model.config.text_config
    print(report.summary())
    print(f"vision {vision.hidden_size}x{vision.num_hidden_layers} @ {vision.image_size}px, "
          f"text {text.hidden_size}x{text.num_text_layers}+{text.num_fusion_layers}, embed_dim {model.config.embed_dim}")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
