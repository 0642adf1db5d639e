"""X2-VLM: conversion of original checkpoints, parity with a plain-torch reference written from the notes, losses,
hard negatives, safetensors round trip.

The synthetic checkpoints below use exactly the original key names and shapes (docs/fusion_backbones.md),
at tiny widths with text width != vision width, in the fine-tuned (`XVLMForRetrieval`) and pretrained (`XVLM` with
MLM head) layouts. The reference functions read the raw original state dict and share no code with the package.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cusa_hf.models.fusion_losses import itc_loss, sample_hard_negatives
from cusa_hf.models.x2vlm.configuration_x2vlm import X2VlmConfig
from cusa_hf.models.x2vlm.modeling_x2vlm import X2VlmModel
from cusa_hf.models.x2vlm.convert import (
    ConversionError,
    convert_checkpoint,
    cross_check_embedded_config,
    infer_config,
    interpolate_relative_position_table,
    main as convert_main,
    normalise_prefixes,
)

# Tiny sizes: vision 32 wide, 2 blocks, 4 heads; text 128 wide (2 BERT-style 64-wide heads), 2 text + 1 fusion layers.
VISION = dict(width=32, depth=2, heads=4, mlp=64, patch=16)
TEXT = dict(width=128, heads=2, ffn=64, vocab=99, positions=16, text_layers=2, fusion_layers=1)
EMBED_DIM = 16


def tiny_config(image_size: int = 32) -> X2VlmConfig:
    return X2VlmConfig(
        vision_config=dict(
            hidden_size=VISION["width"], num_hidden_layers=VISION["depth"], num_attention_heads=VISION["heads"],
            intermediate_size=VISION["mlp"], image_size=image_size, patch_size=VISION["patch"],
        ),
        text_config=dict(
            vocab_size=TEXT["vocab"], hidden_size=TEXT["width"], num_text_layers=TEXT["text_layers"],
            num_fusion_layers=TEXT["fusion_layers"], num_attention_heads=TEXT["heads"],
            intermediate_size=TEXT["ffn"], max_position_embeddings=TEXT["positions"],
        ),
        embed_dim=EMBED_DIM,
    )


def reference_rel_index(grid: int) -> torch.Tensor:
    """BEiT's relative-position index built with explicit loops (notes §1)."""
    span = 2 * grid - 1
    rows = span * span + 3
    tokens = grid * grid + 1
    index = torch.zeros(tokens, tokens, dtype=torch.long)
    for a in range(grid * grid):
        for b in range(grid * grid):
            dh = a // grid - b // grid + grid - 1
            dw = a % grid - b % grid + grid - 1
            index[a + 1, b + 1] = dh * span + dw
    index[0, :] = rows - 3  # cls -> token
    index[:, 0] = rows - 2  # token -> cls
    index[0, 0] = rows - 1  # cls -> cls
    return index


def original_state_dict(image_size: int = 32, pretrained_layout: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with the original key names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    dv, dt, grid = VISION["width"], TEXT["width"], image_size // VISION["patch"]
    sd = {
        "vision_encoder.cls_token": rnd(1, 1, dv),
        "vision_encoder.patch_embed.proj.weight": rnd(dv, 3, 16, 16, scale=0.02),
        "vision_encoder.patch_embed.proj.bias": rnd(dv),
        "vision_encoder.fc_norm.weight": rnd(dv, offset=1.0),
        "vision_encoder.fc_norm.bias": rnd(dv),
    }
    for i in range(VISION["depth"]):
        p = f"vision_encoder.blocks.{i}."
        sd.update({
            p + "norm1.weight": rnd(dv, offset=1.0), p + "norm1.bias": rnd(dv),
            p + "attn.qkv.weight": rnd(3 * dv, dv), p + "attn.q_bias": rnd(dv), p + "attn.v_bias": rnd(dv),
            p + "attn.relative_position_bias_table": rnd((2 * grid - 1) ** 2 + 3, VISION["heads"], scale=1.0),
            p + "attn.relative_position_index": reference_rel_index(grid),
            p + "attn.proj.weight": rnd(dv, dv), p + "attn.proj.bias": rnd(dv),
            p + "norm2.weight": rnd(dv, offset=1.0), p + "norm2.bias": rnd(dv),
            p + "mlp.fc1.weight": rnd(VISION["mlp"], dv), p + "mlp.fc1.bias": rnd(VISION["mlp"]),
            p + "mlp.fc2.weight": rnd(dv, VISION["mlp"]), p + "mlp.fc2.bias": rnd(dv),
            p + "gamma_1": rnd(dv, scale=0.05, offset=0.5), p + "gamma_2": rnd(dv, scale=0.05, offset=0.5),
        })
    t = "text_encoder.bert." if pretrained_layout else "text_encoder."
    sd.update({
        t + "embeddings.word_embeddings.weight": rnd(TEXT["vocab"], dt, scale=0.5),
        t + "embeddings.position_embeddings.weight": rnd(TEXT["positions"], dt, scale=0.5),
        t + "embeddings.token_type_embeddings.weight": rnd(2, dt, scale=0.5),
        t + "embeddings.LayerNorm.weight": rnd(dt, offset=1.0), t + "embeddings.LayerNorm.bias": rnd(dt),
        t + "embeddings.position_ids": torch.arange(TEXT["positions"])[None],
    })
    for i in range(TEXT["text_layers"] + TEXT["fusion_layers"]):
        p = f"{t}encoder.layer.{i}."
        blocks = ["attention"] + (["crossattention"] if i >= TEXT["text_layers"] else [])
        for block in blocks:
            kv_width = dv if block == "crossattention" else dt
            sd.update({
                p + f"{block}.self.query.weight": rnd(dt, dt, scale=0.1), p + f"{block}.self.query.bias": rnd(dt),
                p + f"{block}.self.key.weight": rnd(dt, kv_width, scale=0.1), p + f"{block}.self.key.bias": rnd(dt),
                p + f"{block}.self.value.weight": rnd(dt, kv_width, scale=0.1), p + f"{block}.self.value.bias": rnd(dt),
                p + f"{block}.output.dense.weight": rnd(dt, dt, scale=0.1), p + f"{block}.output.dense.bias": rnd(dt),
                p + f"{block}.output.LayerNorm.weight": rnd(dt, offset=1.0), p + f"{block}.output.LayerNorm.bias": rnd(dt),
            })
        sd.update({
            p + "intermediate.dense.weight": rnd(TEXT["ffn"], dt, scale=0.1), p + "intermediate.dense.bias": rnd(TEXT["ffn"]),
            p + "output.dense.weight": rnd(dt, TEXT["ffn"], scale=0.1), p + "output.dense.bias": rnd(dt),
            p + "output.LayerNorm.weight": rnd(dt, offset=1.0), p + "output.LayerNorm.bias": rnd(dt),
        })
    sd.update({
        "vision_proj.weight": rnd(EMBED_DIM, dv), "vision_proj.bias": rnd(EMBED_DIM),
        "text_proj.weight": rnd(EMBED_DIM, dt), "text_proj.bias": rnd(EMBED_DIM),
        "temp": torch.tensor(0.05),
        "itm_head.0.weight": rnd(2 * dt, dt, scale=0.1), "itm_head.0.bias": rnd(2 * dt),
        "itm_head.1.weight": rnd(2 * dt, offset=1.0), "itm_head.1.bias": rnd(2 * dt),
        "itm_head.3.weight": rnd(2, 2 * dt), "itm_head.3.bias": rnd(2),
    })
    if pretrained_layout:
        sd.update({
            "text_encoder.cls.predictions.bias": rnd(TEXT["vocab"]),
            "text_encoder.cls.predictions.transform.dense.weight": rnd(dt, dt),
            "text_encoder.cls.predictions.transform.dense.bias": rnd(dt),
            "text_encoder.cls.predictions.transform.LayerNorm.weight": rnd(dt),
            "text_encoder.cls.predictions.transform.LayerNorm.bias": rnd(dt),
            "text_encoder.cls.predictions.decoder.weight": rnd(TEXT["vocab"], dt),
            "bbox_head.0.weight": rnd(2 * dt, dt), "bbox_head.0.bias": rnd(2 * dt),
            "bbox_head.1.weight": rnd(2 * dt), "bbox_head.1.bias": rnd(2 * dt),
            "bbox_head.3.weight": rnd(4, 2 * dt), "bbox_head.3.bias": rnd(4),
            "absolute_frame_pos_embed": rnd(1, 3, 1, dv),
        })
    return sd


def embedded_yaml(image_size: int = 32) -> dict:
    return {
        "use_beit_v2": True, "vision_config": "configs/config_beit2_tiny.json", "image_res": image_size,
        "patch_size": 16, "text_encoder": "data/bert-tiny-uncased", "text_num_hidden_layers": 3,
        "text_fusion_start_at": 2, "embed_dim": EMBED_DIM, "temp": 0.07, "k_test": 3, "max_tokens": 12,
    }


@pytest.fixture(scope="module")
def finetuned_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("x2vlm") / "finetuned.th"
    sd = original_state_dict()
    torch.save({"model": sd, "config": embedded_yaml()}, path)
    return path, sd


@pytest.fixture(scope="module")
def converted(finetuned_checkpoint):
    path, sd = finetuned_checkpoint
    model, report = convert_checkpoint(path)
    return model, sd, report


# ------------------------------------------------------------------------------------------------------------
# Reference forward pass from the notes, on the raw original state dict
# ------------------------------------------------------------------------------------------------------------


def ref_vision(sd, pixels):
    dv, heads = VISION["width"], VISION["heads"]
    x = F.conv2d(pixels, sd["vision_encoder.patch_embed.proj.weight"], sd["vision_encoder.patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["vision_encoder.cls_token"].expand(x.shape[0], 1, dv), x], dim=1)
    batch, tokens, _ = x.shape
    for i in range(VISION["depth"]):
        p = f"vision_encoder.blocks.{i}."
        h = F.layer_norm(x, (dv,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(dv), sd[p + "attn.v_bias"]])
        qkv = (h @ sd[p + "attn.qkv.weight"].t() + bias).reshape(batch, tokens, 3, heads, dv // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        scores = (q * (dv // heads) ** -0.5) @ k.transpose(-1, -2)
        table = sd[p + "attn.relative_position_bias_table"]
        rel = table[sd[p + "attn.relative_position_index"].reshape(-1)].reshape(tokens, tokens, heads).permute(2, 0, 1)
        out = (scores + rel).softmax(-1) @ v
        out = out.transpose(1, 2).reshape(batch, tokens, dv) @ sd[p + "attn.proj.weight"].t() + sd[p + "attn.proj.bias"]
        x = x + sd[p + "gamma_1"] * out
        h = F.layer_norm(x, (dv,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].t() + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].t()
        x = x + sd[p + "gamma_2"] * (h + sd[p + "mlp.fc2.bias"])
    patches = F.layer_norm(x[:, 1:], (dv,), sd["vision_encoder.fc_norm.weight"], sd["vision_encoder.fc_norm.bias"], eps=1e-6)
    return torch.cat([patches.mean(1, keepdim=True), patches], dim=1)


def ref_bert_attention(sd, p, x, mask_add, kv):
    dt, heads = TEXT["width"], TEXT["heads"]
    hd = dt // heads

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, hd).transpose(1, 2)

    q = split(x @ sd[p + "self.query.weight"].t() + sd[p + "self.query.bias"])
    k = split(kv @ sd[p + "self.key.weight"].t() + sd[p + "self.key.bias"])
    v = split(kv @ sd[p + "self.value.weight"].t() + sd[p + "self.value.bias"])
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if mask_add is not None:
        scores = scores + mask_add
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], dt)
    out = ctx @ sd[p + "output.dense.weight"].t() + sd[p + "output.dense.bias"]
    return F.layer_norm(out + x, (dt,), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], eps=1e-12)


def ref_bert_layer(sd, i, x, mask_add, image=None):
    p = f"text_encoder.encoder.layer.{i}."
    x = ref_bert_attention(sd, p + "attention.", x, mask_add, x)
    if image is not None:
        x = ref_bert_attention(sd, p + "crossattention.", x, None, image)  # all-ones image mask
    h = F.gelu(x @ sd[p + "intermediate.dense.weight"].t() + sd[p + "intermediate.dense.bias"])
    h = h @ sd[p + "output.dense.weight"].t() + sd[p + "output.dense.bias"]
    return F.layer_norm(h + x, (TEXT["width"],), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], eps=1e-12)


def ref_text(sd, ids, mask):
    e = "text_encoder.embeddings."
    x = (sd[e + "word_embeddings.weight"][ids] + sd[e + "position_embeddings.weight"][: ids.shape[1]]
         + sd[e + "token_type_embeddings.weight"][0])
    x = F.layer_norm(x, (TEXT["width"],), sd[e + "LayerNorm.weight"], sd[e + "LayerNorm.bias"], eps=1e-12)
    mask_add = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(TEXT["text_layers"]):
        x = ref_bert_layer(sd, i, x, mask_add)
    return x


def ref_itm_logits(sd, image_seq, text_seq, mask):
    mask_add = (1.0 - mask[:, None, None, :].float()) * -10000.0
    x = text_seq
    for i in range(TEXT["text_layers"], TEXT["text_layers"] + TEXT["fusion_layers"]):
        x = ref_bert_layer(sd, i, x, mask_add, image=image_seq)
    h = x[:, 0] @ sd["itm_head.0.weight"].t() + sd["itm_head.0.bias"]
    h = F.gelu(F.layer_norm(h, (h.shape[-1],), sd["itm_head.1.weight"], sd["itm_head.1.bias"], eps=1e-5))
    return h @ sd["itm_head.3.weight"].t() + sd["itm_head.3.bias"]


def ref_features(sd, image_seq, text_seq):
    img = F.normalize(image_seq[:, 0] @ sd["vision_proj.weight"].t() + sd["vision_proj.bias"], dim=-1)
    txt = F.normalize(text_seq[:, 0] @ sd["text_proj.weight"].t() + sd["text_proj.bias"], dim=-1)
    return img, txt


def ref_itc_loss(img, txt, temp, idx):
    """Notes §1 'ITC' with image ids: per-row normalised positives, mean of the two directions."""
    logits = img @ txt.t() / temp
    losses = []
    for lg in (logits, logits.t()):
        total = 0.0
        for r in range(lg.shape[0]):
            pos = [c for c in range(lg.shape[1]) if idx[r] == idx[c]]
            total = total - sum(torch.log_softmax(lg[r], 0)[c] for c in pos) / len(pos)
        losses.append(total / lg.shape[0])
    return (losses[0] + losses[1]) / 2


def batch_inputs(seed=1, batch=4, length=7, image_size=32):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
    ids = torch.randint(1, TEXT["vocab"], (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    return pixels, ids, mask


# ------------------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------------------


def test_relative_position_index_matches_loop_construction():
    from cusa_hf.models.x2vlm.modeling_x2vlm import beit_relative_position_index

    for grid in (1, 2, 3, 5):
        assert torch.equal(beit_relative_position_index(grid), reference_rel_index(grid))


def test_conversion_maps_every_key_and_infers_the_config(converted, finetuned_checkpoint):
    model, sd, report = converted
    assert set(report.renamed) | set(report.dropped) == set(sd)
    assert not set(report.renamed) & set(report.dropped)
    dropped = set(report.dropped)
    assert dropped == {k for k in sd if k.endswith("relative_position_index") or k.endswith("position_ids")}
    assert set(report.renamed.values()) == set(model.state_dict())
    expected = tiny_config()
    expected.k_test, expected.max_text_length = 3, 12  # from the embedded yaml
    assert model.config.to_diff_dict() == X2VlmConfig(**expected.to_dict()).to_diff_dict()
    assert model.temp.item() == pytest.approx(0.05)  # the learned value, not the yaml's initial 0.07
    assert torch.equal(model.fusion_model.layer[0].crossattention.self.key.weight,
                       sd["text_encoder.encoder.layer.2.crossattention.self.key.weight"])


def test_pretrained_layout_converts_with_documented_drops(tmp_path):
    sd = original_state_dict(pretrained_layout=True)
    torch.save({"model": sd, "config": embedded_yaml()}, tmp_path / "pre.th")
    model, report = convert_checkpoint(tmp_path / "pre.th")
    reasons = set(report.dropped.values())
    assert any("masked-language-model" in r for r in reasons)
    assert any("bounding-box" in r for r in reasons)
    assert any("video frame" in r for r in reasons)
    assert len(report.renamed) + len(report.dropped) == len(sd)
    # Same weights as the fine-tuned layout, so the same outputs.
    finetuned = original_state_dict(pretrained_layout=False)
    pixels, ids, mask = batch_inputs()
    with torch.no_grad():
        text = model.get_text_sequence(ids, mask)
    torch.testing.assert_close(text, ref_text(finetuned, ids, mask), atol=1e-5, rtol=1e-5)


def test_bare_state_dict_without_wrapper_converts(tmp_path):
    torch.save(original_state_dict(), tmp_path / "bare.th")
    model, _ = convert_checkpoint(tmp_path / "bare.th")
    assert model.config.k_test == X2VlmConfig().k_test  # no yaml: defaults


def test_unexplained_key_and_missing_key_are_errors(tmp_path):
    sd = original_state_dict()
    sd["mystery_head.weight"] = torch.zeros(2)
    torch.save({"model": sd}, tmp_path / "extra.th")
    with pytest.raises(ConversionError, match="mystery_head.weight"):
        convert_checkpoint(tmp_path / "extra.th")
    sd = original_state_dict()
    del sd["itm_head.3.bias"]
    torch.save({"model": sd}, tmp_path / "missing.th")
    with pytest.raises(ConversionError, match="itm_head.3.bias"):
        convert_checkpoint(tmp_path / "missing.th")
    sd = original_state_dict()
    sd["vision_encoder.blocks.0.attn.relative_position_index"] = torch.zeros(5, 5, dtype=torch.long)
    torch.save({"model": sd}, tmp_path / "index.th")
    with pytest.raises(ConversionError, match="relative_position_index"):
        convert_checkpoint(tmp_path / "index.th")


def test_embedded_config_cross_check(tmp_path):
    config = infer_config(normalise_prefixes(original_state_dict()), embedded_yaml())
    assert cross_check_embedded_config(config, embedded_yaml()) == []
    bad = dict(embedded_yaml(), image_res=384, text_fusion_start_at=6, vision_config="configs/config_beit2_base.json")
    problems = cross_check_embedded_config(config, bad)
    assert len(problems) == 3 and any("image_res" in p for p in problems)
    torch.save({"model": original_state_dict(), "config": bad}, tmp_path / "bad.th")
    with pytest.raises(ConversionError, match="disagrees"):
        convert_checkpoint(tmp_path / "bad.th")


def test_checkpoint_needing_pickle_is_refused_unless_allowed(tmp_path):
    import argparse

    path = tmp_path / "pickled.th"
    torch.save({"model": original_state_dict(), "config": {"args": argparse.Namespace(x=1)}}, path)
    with pytest.raises(ConversionError, match="allow_pickle=True"):
        convert_checkpoint(path)
    model, _ = convert_checkpoint(path, allow_pickle=True)
    assert isinstance(model, X2VlmModel)


def test_cli_writes_safetensors_that_load_with_auto_model(finetuned_checkpoint, tmp_path, capsys):
    from transformers import AutoModel

    path, sd = finetuned_checkpoint
    convert_main(["--checkpoint", str(path), "--out", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert "tensors mapped" in capsys.readouterr().out
    model = AutoModel.from_pretrained(tmp_path / "hf").eval()
    pixels, ids, mask = batch_inputs()
    with torch.no_grad():
        features = model.get_image_features(pixels)
    torch.testing.assert_close(features, ref_features(sd, ref_vision(sd, pixels), ref_text(sd, ids, mask))[0],
                               atol=1e-5, rtol=1e-5)


def test_relative_position_interpolation_for_pretrained_resolution(tmp_path):
    sd = original_state_dict(image_size=64, pretrained_layout=True)  # 4x4 grid, like 224 px pretraining
    torch.save({"model": sd, "config": embedded_yaml(image_size=64)}, tmp_path / "pre64.th")
    model, report = convert_checkpoint(tmp_path / "pre64.th", image_size=80)  # 5x5 grid
    assert model.config.vision_config.image_size == 80
    assert len(report.interpolated) == VISION["depth"]
    table = model.vision_model.blocks[0].attn.relative_position_bias_table
    source = sd["vision_encoder.blocks.0.attn.relative_position_bias_table"]
    assert table.shape == (9 * 9 + 3, VISION["heads"])
    assert torch.equal(table[-3:], source[-3:])  # CLS rows kept
    # The centre offset (0, 0) is a sample point of both grids, so the interpolating spline reproduces it.
    torch.testing.assert_close(table[4 * 9 + 4], source[3 * 7 + 3], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert model.get_image_features(torch.randn(2, 3, 80, 80)).shape == (2, EMBED_DIM)


def test_interpolation_equals_scipy_interp2d_when_available():
    """The original uses scipy's interp2d (removed in SciPy 1.14); compare where an old SciPy is importable."""
    import warnings

    import numpy as np

    scipy_interpolate = pytest.importorskip("scipy.interpolate")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scipy_interpolate.interp2d([0, 1, 2, 3], [0, 1, 2, 3], np.zeros((4, 4)), kind="cubic")
    except (AttributeError, NotImplementedError):
        pytest.skip("scipy.interpolate.interp2d is gone (SciPy >= 1.14); docs/fusion_backbones.md records the check with 1.13")

    table = torch.randn(27 * 27 + 3, 2, generator=torch.Generator().manual_seed(0))
    ours = interpolate_relative_position_table(table, 24)
    half = 13
    ratio = _bisect_ratio(half, 23)
    steps = np.cumsum([ratio**i for i in range(half)])
    pos = np.concatenate([-steps[::-1], [0.0], steps])
    target = np.arange(-23, 23.1, 1.0)
    for head in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = scipy_interpolate.interp2d(pos, pos, table[:-3, head].view(27, 27).numpy(), kind="cubic")
        np.testing.assert_allclose(ours[:-3, head].view(47, 47).numpy(), f(target, target), atol=1e-4)


def _bisect_ratio(half_source, half_target):
    low, high = 1.01, 1.5
    while high - low > 1e-6:
        mid = (low + high) / 2
        if sum(mid**i for i in range(half_source)) > half_target:
            high = mid
        else:
            low = mid
    return mid


# ------------------------------------------------------------------------------------------------------------
# Parity of the converted model with the reference
# ------------------------------------------------------------------------------------------------------------


def test_features_and_sequences_match_reference(converted):
    model, sd, _ = converted
    pixels, ids, mask = batch_inputs()
    with torch.no_grad():
        out = model(pixels, ids, mask, return_loss=False)
    image_seq, text_seq = ref_vision(sd, pixels), ref_text(sd, ids, mask)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image_sequence, image_seq, **tol)
    # The first image token is the mean of the normed patch tokens, not the CLS output.
    torch.testing.assert_close(out.image_sequence[:, 0], out.image_sequence[:, 1:].mean(1), **tol)
    torch.testing.assert_close(out.text_sequence, text_seq, **tol)
    img, txt = ref_features(sd, image_seq, text_seq)
    torch.testing.assert_close(out.image_embeds, img, **tol)
    torch.testing.assert_close(out.text_embeds, txt, **tol)
    torch.testing.assert_close(out.logits_per_image, img @ txt.t() / sd["temp"], **tol)


def test_itm_logits_match_reference_and_indexed_images(converted):
    model, sd, _ = converted
    pixels, ids, mask = batch_inputs()
    image_seq, text_seq = ref_vision(sd, pixels), ref_text(sd, ids, mask)
    with torch.no_grad():
        logits = model.itm_logits(image_seq, text_seq, mask)
        scores = model.itm_score(image_seq, text_seq, mask)
        indexed = model.itm_score(image_seq[1:3], text_seq, mask, image_index=torch.tensor([0, 1, 1, 0]))
    expected = ref_itm_logits(sd, image_seq, text_seq, mask)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, expected[:, 1], atol=1e-5, rtol=1e-5)
    paired = ref_itm_logits(sd, image_seq[torch.tensor([1, 2, 2, 1])], text_seq, mask)[:, 1]
    torch.testing.assert_close(indexed, paired, atol=1e-5, rtol=1e-5)


def test_losses_match_reference_with_repeated_image_ids(converted):
    model, sd, _ = converted
    pixels, ids, mask = batch_inputs()
    image_ids = torch.tensor([7, 3, 7, 5])
    pixels[2] = pixels[0]  # same image id, same image
    negatives = (torch.tensor([1, 0, 3, 2]), torch.tensor([3, 2, 1, 0]))
    with torch.no_grad():
        out = model(pixels, ids, mask, return_loss=False)
        loss_itc = model.contrastive_loss(out.image_embeds, out.text_embeds, image_ids)
        loss_itm = model.matching_loss(out.image_sequence, out.text_sequence, mask, out.image_embeds,
                                       out.text_embeds, image_ids, negatives=negatives)
    image_seq, text_seq = ref_vision(sd, pixels), ref_text(sd, ids, mask)
    img, txt = ref_features(sd, image_seq, text_seq)
    torch.testing.assert_close(loss_itc, ref_itc_loss(img, txt, sd["temp"], image_ids.tolist()), atol=1e-5, rtol=1e-5)
    # The original's two fusion calls: positives, then (negative image, text) + (image, negative text).
    neg_img, neg_txt = negatives
    pos = ref_itm_logits(sd, image_seq, text_seq, mask)
    neg = ref_itm_logits(sd, torch.cat([image_seq[neg_img], image_seq]), torch.cat([text_seq, text_seq[neg_txt]]),
                         torch.cat([mask, mask[neg_txt]]))
    labels = torch.tensor([1] * 4 + [0] * 8)
    torch.testing.assert_close(loss_itm, F.cross_entropy(torch.cat([pos, neg]), labels), atol=1e-5, rtol=1e-5)


def test_training_forward_clamps_temperature_and_backpropagates():
    model = X2VlmModel(tiny_config()).train()
    with torch.no_grad():
        model.temp.fill_(0.9)
    pixels, ids, mask = batch_inputs()
    out = model(pixels, ids, mask, image_ids=torch.tensor([0, 1, 2, 3]))
    assert model.temp.item() == pytest.approx(0.5)
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_itm)
    out.loss.backward()
    for name in ("temp", "itm_head.0.weight", "fusion_model.layer.0.crossattention.self.key.weight",
                 "vision_model.blocks.0.attn.relative_position_bias_table", "text_proj.weight"):
        assert model.get_parameter(name).grad is not None and model.get_parameter(name).grad.abs().sum() > 0, name


def test_contrastive_loss_without_ids_is_clip_style_cross_entropy():
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1), F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    temp = torch.tensor(0.1)
    logits = img @ txt.t() / temp
    expected = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5))) / 2
    torch.testing.assert_close(itc_loss(img, txt, temp), expected)


# ------------------------------------------------------------------------------------------------------------
# Hard negatives
# ------------------------------------------------------------------------------------------------------------


def test_hard_negatives_never_pick_same_image_and_are_seeded():
    g = torch.Generator().manual_seed(0)
    image_ids = torch.tensor([0, 0, 1, 1, 1, 2])
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = img + 0.01 * torch.randn(6, 8, generator=g)  # same-image pairs are the most similar: the tempting picks
    same = image_ids[:, None] == image_ids[None, :]
    for seed in range(200):
        neg_img, neg_txt = sample_hard_negatives(img, txt, torch.tensor(0.07), image_ids,
                                                 torch.Generator().manual_seed(seed))
        rows = torch.arange(6)
        assert not same[rows, neg_img].any() and not same[rows, neg_txt].any()
    first = sample_hard_negatives(img, txt, torch.tensor(0.07), image_ids, torch.Generator().manual_seed(3))
    again = sample_hard_negatives(img, txt, torch.tensor(0.07), image_ids, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_hard_negatives_follow_the_similarity_distribution():
    # Text 0 is far more similar to image 1 than to image 2 (image 0 is its own and excluded).
    img = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    draws = torch.stack([
        sample_hard_negatives(img, txt, torch.tensor(0.1), None, torch.Generator().manual_seed(s))[0][0]
        for s in range(300)
    ])
    probs = F.softmax(txt[0] @ img.t() / 0.1, dim=0)
    expected_share = probs[1] / (probs[1] + probs[2])
    assert abs((draws == 1).float().mean().item() - expected_share.item()) < 0.08
    assert not (draws == 0).any()


def test_hard_negatives_need_two_distinct_images():
    with pytest.raises(ValueError, match="different image"):
        sample_hard_negatives(torch.randn(3, 4), torch.randn(3, 4), torch.tensor(0.07), torch.tensor([5, 5, 5]))


# ------------------------------------------------------------------------------------------------------------
# Round trip, config, Auto classes
# ------------------------------------------------------------------------------------------------------------


def test_safetensors_round_trip(converted, tmp_path):
    from transformers import AutoConfig, AutoModel

    model, _, _ = converted
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "x2vlm"
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    pixels, ids, mask = batch_inputs()
    with torch.no_grad():
        a, b = model(pixels, ids, mask), reloaded(pixels, ids, mask)
        itm_a = model.itm_score(a.image_sequence, a.text_sequence, mask)
        itm_b = reloaded.itm_score(b.image_sequence, b.text_sequence, mask)
    assert torch.equal(a.logits_per_image, b.logits_per_image)
    assert torch.equal(itm_a, itm_b)


def test_presets_and_validation():
    base, large = X2VlmConfig.from_preset("x2vlm-base"), X2VlmConfig.from_preset("x2vlm-large")
    assert (base.vision_config.hidden_size, base.vision_config.num_hidden_layers, base.vision_config.image_size) == (768, 12, 384)
    assert (large.vision_config.hidden_size, large.vision_config.num_hidden_layers, large.text_config.hidden_size) == (1024, 24, 1024)
    assert large.text_config.encoder_width == 1024 and base.embed_dim == 256 and base.temp == 0.07
    with pytest.raises(ValueError, match="preset"):
        X2VlmConfig.from_preset("x2vlm-huge")
    with pytest.raises(ValueError, match="temp"):
        X2VlmConfig(temp=0.9)
    with pytest.raises(ValueError, match="patch_size"):
        X2VlmConfig(vision_config=dict(image_size=100))


def test_wrong_image_size_is_a_clear_error(converted):
    model, _, _ = converted
    with pytest.raises(ValueError, match="image_size=32"):
        model.get_image_features(torch.randn(1, 3, 48, 48))


def test_parameter_count_of_presets_matches_the_notes():
    """Notes §1: base ~253M, large ~590M at 384 px (computed from the checkpoint shapes)."""
    with torch.device("meta"):
        base = X2VlmModel(X2VlmConfig.from_preset("x2vlm-base"))
        large = X2VlmModel(X2VlmConfig.from_preset("x2vlm-large"))
    assert sum(p.numel() for p in base.parameters()) / 1e6 == pytest.approx(253, abs=1.5)
    assert sum(p.numel() for p in large.parameters()) / 1e6 == pytest.approx(590, abs=2.5)
