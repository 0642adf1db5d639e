"""X2-VLM feature and ITM-rerank throughput at COCO-5K shape, with random full-size weights.

    python benchmarks/x2vlm_throughput.py --device cuda --size base --dtype bfloat16 --out x2vlm_base.json
    python benchmarks/x2vlm_throughput.py --quick            # tiny config on CPU, seconds (checks the script)

Measures, after warm-up, with device synchronisation:
* image encoding (vision tower + ITC projection) in images/s, at ``--image-batch``;
* text encoding (12 text layers + projection, 40 tokens) in texts/s, at ``--text-batch``;
* ITM reranking in pairs/s for both directions of the original protocol: i2t batches score one image against
  ``--rerank-batch`` texts (cross-attention keys/values computed once per image), t2i batches score one text against
  that many distinct images; and the extrapolated time of COCO 5K (5,000 images, 25,000 captions, k_test 256:
  (5,000 + 25,000) x 256 = 7.68M pairs);
* peak accelerator memory of each phase and the size of the cached `[5000, 1 + N, D]` image sequences;
* with ``--compare-fp32`` (and a non-fp32 ``--dtype``), the largest difference of ITM scores and ITC features to fp32.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cusa_hf.models.x2vlm.configuration_x2vlm import X2VlmConfig
from cusa_hf.models.x2vlm.modeling_x2vlm import X2VlmModel

COCO_IMAGES, COCO_TEXTS = 5000, 25000


def tiny_config() -> X2VlmConfig:
    return X2VlmConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=64),
        text_config=dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_text_layers=2,
                         num_fusion_layers=1),
        embed_dim=16,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call of ``fn`` (one warm-up call first)."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@torch.inference_mode()
def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = tiny_config() if args.quick else X2VlmConfig.from_preset(f"x2vlm-{args.size}")
    torch.manual_seed(0)
    model = X2VlmModel(config).to(device=device, dtype=dtype).eval()
    size, length = config.vision_config.image_size, config.max_text_length
    tokens = config.vision_config.grid_size**2 + 1
    vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
    result: dict = {
        "size": "tiny" if args.quick else args.size, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "image_tokens": tokens, "text_tokens": length,
    }

    pixels = torch.randn(args.image_batch, 3, size, size, device=device, dtype=dtype)
    reset_peak(device)
    seconds = timed(lambda: model.get_image_features(image_sequence=model.get_image_sequence(pixels)), device, args.repeats)
    result["image_encode_per_s"] = round(args.image_batch / seconds, 1)
    result["image_encode_peak_GiB"] = peak_memory(device)

    input_ids = torch.randint(1000, 2000 if not args.quick else config.text_config.vocab_size, (args.text_batch, length), device=device)
    input_ids = input_ids.clamp(max=config.text_config.vocab_size - 1)
    mask = torch.ones_like(input_ids)
    reset_peak(device)
    seconds = timed(lambda: model.get_text_features(input_ids, mask), device, args.repeats)
    result["text_encode_per_s"] = round(args.text_batch / seconds, 1)
    result["text_encode_peak_GiB"] = peak_memory(device)

    k = args.rerank_batch
    image_sequences = torch.randn(k, tokens, vision_width, device=device, dtype=dtype)
    text_sequences = torch.randn(k, length, text_width, device=device, dtype=dtype)
    text_mask = torch.ones(k, length, dtype=torch.long, device=device)
    one_image = torch.zeros(k, dtype=torch.long, device=device)
    reset_peak(device)
    i2t_seconds = timed(lambda: model.itm_score(image_sequences[:1], text_sequences, text_mask, one_image), device, args.repeats)
    t2i_seconds = timed(lambda: model.itm_score(image_sequences, text_sequences[:1].expand(k, -1, -1), text_mask), device,
                        args.repeats)
    result["itm_i2t_pairs_per_s"] = round(k / i2t_seconds, 1)
    result["itm_t2i_pairs_per_s"] = round(k / t2i_seconds, 1)
    result["itm_peak_GiB"] = peak_memory(device)
    coco_seconds = COCO_IMAGES * 256 * i2t_seconds / k + COCO_TEXTS * 256 * t2i_seconds / k
    result["coco5k_k256_rerank_minutes"] = round(coco_seconds / 60, 1)
    bytes_per_value = torch.finfo(dtype).bits // 8
    result["coco5k_image_cache_GiB"] = round(COCO_IMAGES * tokens * vision_width * bytes_per_value / 2**30, 2)

    if args.compare_fp32 and dtype != torch.float32:
        reference = model.to(torch.float32)
        low = X2VlmModel(config).to(device)
        low.load_state_dict(reference.state_dict())
        low = low.to(dtype).eval()
        small_pixels = torch.randn(4, 3, size, size, device=device)
        ids, ids_mask = input_ids[:4], mask[:4]
        fp32_image = reference.get_image_sequence(small_pixels)
        fp32_text = reference.get_text_sequence(ids, ids_mask)
        low_image = low.get_image_sequence(small_pixels.to(dtype))
        low_text = low.get_text_sequence(ids, ids_mask)
        result[f"itc_feature_max_abs_diff_{args.dtype}_vs_fp32"] = float(
            (low.get_image_features(image_sequence=low_image).float()
             - reference.get_image_features(image_sequence=fp32_image)).abs().max())
        result[f"itm_score_max_abs_diff_{args.dtype}_vs_fp32"] = float(
            (low.itm_score(low_image, low_text, ids_mask).float() - reference.itm_score(fp32_image, fp32_text, ids_mask)).abs().max())
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("base", "large"), default="base")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--image-batch", type=int, default=64)
    parser.add_argument("--text-batch", type=int, default=256)
    parser.add_argument("--rerank-batch", type=int, default=256, help="pairs per ITM call (k_test in the original)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare-fp32", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny config, small batches (CPU smoke run)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_batch, args.text_batch, args.rerank_batch, args.repeats = 4, 8, 8, 2
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
