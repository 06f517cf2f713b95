"""Nearest-neighbour search for PatchCore's patch scores: torch (what the model runs: anomalib's matrix-product
distances, then the minimum) against faiss-cpu's exact ``IndexFlatL2``, in the same process on the same data, for the
memory-bank sizes DefectOps uses (a capped coreset) and for an uncapped bank. Prints the time per image (one image =
one query block of patches) and the ratio faiss / torch; checks both return the same nearest distances.

faiss-cpu is not a dependency of DefectOps (``pip install faiss-cpu`` to run this). The search stays in torch even
where faiss is faster: it is part of the exported ONNX graph, so onnxruntime and Triton score exactly what the
checkpoint scores (docs/anomaly.md has the measured figures).

    .venv/bin/python benchmarks/knn_search.py
"""

from __future__ import annotations

import argparse
import time


def main() -> int:
    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=152, help="embedding width (EfficientNet-Lite0 blocks.2 + blocks.4)")
    ap.add_argument("--patches", type=int, default=1440, help="query patches per image (192 x 480 input, stride 8)")
    ap.add_argument("--banks", default="3000,10000,100000", help="memory-bank sizes to time")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import faiss
    except ImportError:
        raise SystemExit("faiss-cpu is not installed: .venv/bin/pip install faiss-cpu") from None
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    table = Table(title=f"k = 1 nearest neighbour of {args.patches} patches x {args.dim} ({args.threads} threads)")
    for col in ("bank", "torch ms/image", "faiss ms/image", "faiss / torch", "same distances"):
        table.add_column(col)
    for n in (int(b) for b in args.banks.split(",")):
        bank = rng.standard_normal((n, args.dim)).astype(np.float32)
        query = rng.standard_normal((args.patches, args.dim)).astype(np.float32)
        tb, tq = torch.from_numpy(bank), torch.from_numpy(query)

        def torch_knn(tq: torch.Tensor = tq, tb: torch.Tensor = tb) -> np.ndarray:
            x2 = tq.pow(2).sum(1, keepdim=True)
            y2 = tb.pow(2).sum(1)
            d = (x2 - 2 * tq @ tb.T + y2).clamp_min_(0).sqrt_()
            return d.min(1).values.numpy()

        index = faiss.IndexFlatL2(args.dim)
        index.add(bank)

        def faiss_knn(index: faiss.IndexFlatL2 = index, query: np.ndarray = query) -> np.ndarray:
            d, _ = index.search(query, 1)
            return np.sqrt(np.maximum(d[:, 0], 0))

        timings = {}
        results = {}
        for name, fn in (("torch", torch_knn), ("faiss", faiss_knn)):
            results[name] = fn()
            t = time.perf_counter()
            for _ in range(args.repeats):
                fn()
            timings[name] = (time.perf_counter() - t) / args.repeats * 1000
        same = bool(np.allclose(results["torch"], results["faiss"], rtol=1e-3, atol=1e-3))
        table.add_row(f"{n:,}", f"{timings['torch']:.1f}", f"{timings['faiss']:.1f}",
                      f"{timings['faiss'] / timings['torch']:.2f}x", str(same))
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
