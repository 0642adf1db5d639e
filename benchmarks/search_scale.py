"""Build time, query latency and recall@10 of `RetrievalIndex`'s FAISS indexes at 10k and 100k items.

Each collection is indexed the way `cusa_hf.search.RetrievalIndex` indexes one (`add_embedding_index`: a
`datasets.Dataset` with an `embedding` column and `add_faiss_index`, inner product), exact (`Flat`) and with
approximate factories. Recall@10 is the share of the exact top-10 that an approximate index returns, averaged over
the queries.

The vectors are synthetic, 256-d and L2-normalised, like a CUSA projection's embeddings: items are drawn around
random centres (one centre per ~100 items, so the collection is clustered as real image embeddings are) and the
queries are fresh draws from the same mixture. Uniform vectors on the sphere, which have no neighbourhood structure
at all, are the worst case for every approximate index; `--uniform` measures that instead.

    python benchmarks/search_scale.py                        # 10k and 100k, Flat / IVF / HNSW
    python benchmarks/search_scale.py --sizes 2000 --queries 50 --factories Flat HNSW16    # seconds
"""

from __future__ import annotations

import argparse
import json
import time

import datasets
import numpy as np

from cusa_hf.search import EMBEDDING_COLUMN, add_embedding_index

#: factory name -> FAISS search parameters. IVF lists grow with the collection: about 4 * sqrt(n) of them.
DEFAULT_FACTORIES = ("Flat", "IVF{nlist},Flat", "HNSW32")
DEFAULT_SEARCH_PARAMETERS = {"IVF": "nprobe=16", "HNSW": "efSearch=64"}


def synthetic_vectors(n: int, dim: int, seed: int, uniform: bool) -> np.ndarray:
    """`(n, dim)` float32 unit vectors; clustered around n/100 random centres unless ``uniform``."""
    rng = np.random.default_rng(seed)
    if uniform:
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        centres = rng.standard_normal((max(1, n // 100), dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        # Noise of norm ~0.7 around unit centres: neighbours of a query are mostly, not only, in its own cluster.
        vectors = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim), dtype=np.float32) * 0.045
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def queries_like(collection: np.ndarray, n_queries: int, seed: int, uniform: bool) -> np.ndarray:
    """Fresh draws from the collection's distribution (same centres: the same generator seed, then more draws)."""
    if uniform:
        return synthetic_vectors(n_queries, collection.shape[1], seed + 1, uniform=True)
    rng = np.random.default_rng(seed + 1)
    near = collection[rng.integers(0, len(collection), n_queries)]
    queries = near + rng.standard_normal(near.shape, dtype=np.float32) * 0.045
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def measure(vectors: np.ndarray, queries: np.ndarray, factory: str | None, search_parameters: str | None, k: int):
    """Build seconds, batched and single-query latency (ms per query), and the top-k indices."""
    dataset = datasets.Dataset.from_dict({EMBEDDING_COLUMN: vectors})
    start = time.perf_counter()
    add_embedding_index(dataset, index_factory=factory, search_parameters=search_parameters)
    build_seconds = time.perf_counter() - start
    dataset.search_batch(EMBEDDING_COLUMN, queries[:32], k)  # warm-up: thread pool and BLAS start-up
    start = time.perf_counter()
    _, indices = dataset.search_batch(EMBEDDING_COLUMN, queries, k)
    batch_ms = 1000 * (time.perf_counter() - start) / len(queries)
    singles = queries[:100]
    start = time.perf_counter()
    for query in singles:
        dataset.search(EMBEDDING_COLUMN, query, k)
    single_ms = 1000 * (time.perf_counter() - start) / len(singles)
    return build_seconds, batch_ms, single_ms, np.asarray(indices)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found.tolist(), exact.tolist())]))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="collection sizes")
    parser.add_argument("--dim", type=int, default=256, help="embedding width")
    parser.add_argument("--queries", type=int, default=1000, help="queries per size (batched; 100 also one by one)")
    parser.add_argument("-k", type=int, default=10, help="results per query; recall@k is measured")
    parser.add_argument("--factories", nargs="+", default=list(DEFAULT_FACTORIES),
                        help="FAISS index_factory strings; {nlist} becomes about 4 * sqrt(size)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: FAISS's choice)")
    parser.add_argument("--uniform", action="store_true", help="uniform vectors on the sphere (the worst case)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.threads is not None:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    datasets.disable_progress_bars()

    rows = []
    for size in args.sizes:
        vectors = synthetic_vectors(size, args.dim, args.seed, args.uniform)
        queries = queries_like(vectors, args.queries, args.seed, args.uniform)
        exact = None
        for template in args.factories:
            factory = template.format(nlist=2 ** round(np.log2(4 * np.sqrt(size))))
            search_parameters = next((p for prefix, p in DEFAULT_SEARCH_PARAMETERS.items() if factory.startswith(prefix)), None)
            build_seconds, batch_ms, single_ms, found = measure(
                vectors, queries, None if factory == "Flat" else factory, search_parameters, args.k
            )
            if exact is None and factory == "Flat":
                exact = found
            rows.append({
                "size": size, "index": factory, "search_parameters": search_parameters or "",
                "build_s": round(build_seconds, 3), "batch_ms_per_query": round(batch_ms, 4),
                "single_query_ms": round(single_ms, 3),
                f"recall@{args.k}": round(recall_at_k(found, exact), 4) if exact is not None else None,
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)

    header = f"| items | index | search parameters | build (s) | ms/query, batch of {args.queries} | ms, one query | recall@{args.k} |"
    print("\n" + header + "\n|" + "---|" * 7)
    for row in rows:
        recall = row[f"recall@{args.k}"]
        print(f"| {row['size']:,} | `{row['index']}` | {row['search_parameters'] or '-'} | {row['build_s']:.2f} | "
              f"{row['batch_ms_per_query']:.3f} | {row['single_query_ms']:.3f} | "
              f"{'-' if recall is None else f'{recall:.3f}'} |")  # fmt: skip
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
