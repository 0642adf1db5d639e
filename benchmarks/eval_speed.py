"""Time `cusa_hf.evaluation.metrics.retrieval_metrics` against the authors' per-query argsort loop, in one run.

The CUSA authors' `itm_eval` sorts every query's scores (`np.argsort(score)[::-1]`) and searches the positives in
the order: 5000 sorts of 25000 scores plus 25000 sorts of 5000 scores at COCO 5K. `retrieval_metrics` counts, per
query, the scores at or above the positive's score in one chunked pass over the matrix.

The score matrix is built from synthetic unit embeddings (captions = noisy copies of their image's embedding), so
recalls are in a realistic range and the equality check is not trivially all-zero. Float32 cosine scores contain
a few exact ties at a positive's score (a handful of queries out of 30,000 at COCO 5K); there the loop's place is
whatever `argsort` chose. So the check is: identical ranks on every query without such a tie, the loop's rank
between the optimistic and pessimistic rank on the tied ones, and identical R@K / RSUM; the script exits non-zero
otherwise.

    python benchmarks/eval_speed.py                      # COCO 5K shape: 5000 x 25000, 1 and 2 threads
    python benchmarks/eval_speed.py --quick              # 100 x 500, seconds (used by the tests)
    python benchmarks/eval_speed.py --device cuda        # fast path on a GPU (the loop stays on the CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import numpy as np
import torch

from cusa_hf.evaluation.metrics import recalls_from_ranks, retrieval_ranks


def build_scores(n_images: int, captions_per_image: int, dim: int, noise: float, seed: int):
    """`(n_images, n_images * captions_per_image)` float32 cosine similarities and the caption -> image map."""
    generator = torch.Generator().manual_seed(seed)
    image_embeds = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=generator), dim=-1)
    text_to_image = torch.arange(n_images).repeat_interleave(captions_per_image)
    text_embeds = image_embeds[text_to_image] + noise * torch.randn(len(text_to_image), dim, generator=generator)
    text_embeds = torch.nn.functional.normalize(text_embeds, dim=-1)
    scores = torch.empty(n_images, len(text_to_image))
    for start in range(0, n_images, 512):  # row blocks: the peak stays at the matrix itself
        scores[start : start + 512] = image_embeds[start : start + 512] @ text_embeds.T
    return scores, text_to_image


def authors_loop_ranks(scores_i2t: np.ndarray, scores_t2i: np.ndarray, text_to_image: np.ndarray):
    """The per-query loop of the authors' `itm_eval` (argsort, reverse, search the positives)."""
    image_to_texts = [[] for _ in range(scores_i2t.shape[0])]
    for text, image in enumerate(text_to_image):
        image_to_texts[image].append(text)
    i2t = np.zeros(scores_i2t.shape[0], dtype=np.int64)
    for index, score in enumerate(scores_i2t):
        order = np.argsort(score)[::-1]
        i2t[index] = min(np.where(order == text)[0][0] for text in image_to_texts[index])
    t2i = np.zeros(scores_t2i.shape[0], dtype=np.int64)
    for index, score in enumerate(scores_t2i):
        order = np.argsort(score)[::-1]
        t2i[index] = np.where(order == text_to_image[index])[0][0]
    return i2t, t2i


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """Peak resident memory above the level at entry, sampled every millisecond by a thread (Linux)."""

    def __enter__(self):
        self.start, self.peak, self._running = rss_mib(), 0.0, True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, rss_mib() - self.start)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss_mib() - self.start)


def time_fast_path(scores, text_to_image, threads: int, repeats: int, chunk_size, device):
    torch.set_num_threads(threads)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    with PeakRss() as rss:
        for _ in range(repeats):
            start = time.perf_counter()
            ranks = retrieval_ranks(scores, text_to_image, chunk_size=chunk_size)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - cuda_before) / 2**20 if device.type == "cuda" else rss.peak
    return ranks, {"seconds_min": min(times), "seconds_median": statistics.median(times), "peak_extra_mib": peak}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--noise", type=float, default=0.35, help="caption noise (0.35: R@1 in COCO's range)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch intra-op thread counts to time the fast path with (the loop is single-threaded)")
    parser.add_argument("--repeats", type=int, default=7, help="fast-path repetitions (min and median reported)")
    parser.add_argument("--device", default="cpu", help="device of the fast path")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="100 images x 5 captions, for tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_images, args.repeats = 100, 2

    load_before = os.getloadavg()[0]
    scores, text_to_image = build_scores(args.n_images, args.captions_per_image, args.dim, args.noise, args.seed)
    n_texts = len(text_to_image)
    device = torch.device(args.device)
    fast_scores = scores.to(device)
    fast_timings, ranks_per_setting = {}, []
    for threads in args.threads:
        ranks, fast_timings[threads] = time_fast_path(
            fast_scores, text_to_image, threads, args.repeats, args.chunk_size, device
        )
        ranks_per_setting.append(ranks)
    i2t_fast, t2i_fast = ranks_per_setting[0]
    same_across_threads = all(
        torch.equal(i2t, i2t_fast) and torch.equal(t2i, t2i_fast) for i2t, t2i in ranks_per_setting
    )

    # The authors evaluate a separate, contiguous (n_texts, n_images) matrix for text queries; build it untimed.
    scores_np = scores.numpy()
    scores_t2i_np = np.ascontiguousarray(scores_np.T)
    start = time.perf_counter()
    i2t_loop, t2i_loop = authors_loop_ranks(scores_np, scores_t2i_np, text_to_image.numpy())
    loop_time = time.perf_counter() - start

    i2t_optimistic, t2i_optimistic = retrieval_ranks(fast_scores, text_to_image, ties="optimistic")
    tied_queries, identical_untied, tied_within_bounds = 0, True, True
    for fast, optimistic, loop in ((i2t_fast, i2t_optimistic, i2t_loop), (t2i_fast, t2i_optimistic, t2i_loop)):
        fast, optimistic, loop = fast.cpu().numpy(), optimistic.cpu().numpy(), loop
        tied = fast != optimistic
        tied_queries += int(tied.sum())
        identical_untied &= bool(np.array_equal(fast[~tied], loop[~tied]))
        tied_within_bounds &= bool(np.all((optimistic[tied] <= loop[tied]) & (loop[tied] <= fast[tied])))
    fast_metrics = recalls_from_ranks(i2t_fast.cpu(), t2i_fast.cpu())
    loop_metrics = recalls_from_ranks(torch.from_numpy(i2t_loop), torch.from_numpy(t2i_loop))
    identical = identical_untied and tied_within_bounds and fast_metrics == loop_metrics and same_across_threads
    result = {
        "shape": [args.n_images, n_texts],
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
        "loop_seconds": loop_time,
        "fast": {
            f"threads={threads}": {**timing, "speedup_vs_loop_min": loop_time / timing["seconds_min"],
                                   "speedup_vs_loop_median": loop_time / timing["seconds_median"]}
            for threads, timing in fast_timings.items()
        },
        "matrix_mib": scores.numel() * scores.element_size() / 2**20,
        "queries": args.n_images + n_texts,
        "queries_with_tied_positive": tied_queries,
        "identical_ranks_without_ties": identical_untied,
        "loop_rank_within_tie_bounds": tied_within_bounds,
        "identical_metrics": fast_metrics == loop_metrics,
        "identical_ranks_across_thread_counts": same_across_threads,
        "metrics_fast": fast_metrics,
        "metrics_loop": loop_metrics,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    if not identical:
        print("MISMATCH between retrieval_ranks and the per-query loop", file=sys.stderr)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
