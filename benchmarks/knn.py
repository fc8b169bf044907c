"""sslpipe's kNN classifier (lightly's knn_predict, batched) against scikit-learn's
KNeighborsClassifier on the same random features: wall time, ratio, agreement.

Both use cosine similarity, the same k, and the same weighted vote: a neighbour at cosine
distance d = 1 - s votes exp(s / T) for its class (sklearn takes the weights as a callable
on distances; the constant factor exp(1/T) it leaves out changes no argmax).

    OMP_NUM_THREADS=1 python benchmarks/knn.py                 # 50k bank x 10k queries, dim 512
    python benchmarks/knn.py --bank 5000 --queries 1000        # quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def clustered(n: int, dim: int, classes: int, rng: np.random.Generator, centres: np.ndarray, spread: float):
    """Features around one centre per class (so that kNN has something to find), float32."""
    labels = rng.integers(0, classes, n)
    return (centres[labels] + spread * rng.standard_normal((n, dim))).astype(np.float32), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", type=int, default=50_000, help="train features (the kNN bank)")
    parser.add_argument("--queries", type=int, default=10_000, help="test features to classify")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=20)             # conf/stage/knn.yaml
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--spread", type=float, default=7.0, help="noise around the class centres (harder when larger)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from sklearn.neighbors import KNeighborsClassifier

    from sslpipe.stages.knn import knn_classify

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.classes, args.dim))
    x_train, y_train = clustered(args.bank, args.dim, args.classes, rng, centres, args.spread)
    x_test, y_test = clustered(args.queries, args.dim, args.classes, rng, centres, args.spread)
    print(f"bank {args.bank} x queries {args.queries}, dim {args.dim}, {args.classes} classes, k={args.k}, "
          f"T={args.temperature}, torch threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    ours = knn_classify(torch.from_numpy(x_train), torch.from_numpy(y_train), torch.from_numpy(x_test),
                        args.classes, args.k, args.temperature).numpy()
    t_ours = time.perf_counter() - t0

    t = args.temperature
    sk = KNeighborsClassifier(n_neighbors=args.k, metric="cosine", algorithm="brute", n_jobs=1,
                              weights=lambda d: np.exp((1.0 - d) / t))
    t0 = time.perf_counter()
    theirs = sk.fit(x_train, y_train).predict(x_test)
    t_sk = time.perf_counter() - t0

    agree = float(np.mean(ours == theirs))
    print(f"sslpipe knn       {t_ours:8.2f} s   top1 {np.mean(ours == y_test):.4f}")
    print(f"sklearn KNN       {t_sk:8.2f} s   top1 {np.mean(theirs == y_test):.4f}")
    print(f"speed-up          {t_sk / t_ours:8.1f} x")
    print(f"agreement         {agree:.6f} ({int(np.sum(ours != theirs))} of {len(ours)} predictions differ)")
    if agree < 0.999:
        raise SystemExit(f"predictions disagree on {1 - agree:.2%} of queries")


if __name__ == "__main__":
    main()
