"""stage=visualize: 2-D maps of the test split's embeddings coloured by class (t-SNE, PCA,
UMAP) and class-pair plots of the most similar classes (the SIMO2 reference code's plots),
logged as MLflow artefacts under plots/."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sslpipe.pretrained import load_pretrained
from sslpipe.results import print_table
from sslpipe.stages.build import build_backbone, build_splits, normalizer
from sslpipe.stages.context import Context, StageResult, stage_run
from sslpipe.stages.features import extract_features

log = logging.getLogger(__name__)

METHODS = ("tsne", "pca", "umap")


def embed_2d(method: str, x: np.ndarray, seed: int, perplexity: float = 30.0) -> np.ndarray:
    """(N, D) -> (N, 2) with scikit-learn's t-SNE / PCA or umap-learn's UMAP."""
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, perplexity=min(perplexity, (len(x) - 1) / 3), init="pca",
                    random_state=seed).fit_transform(x)
    if method == "umap":
        import umap  # umap-learn

        return umap.UMAP(n_components=2, random_state=seed, n_jobs=1).fit_transform(x)
    raise ValueError(f"unknown embedding method '{method}'; valid: {', '.join(METHODS)}")


def scatter(points: np.ndarray, labels: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    from sslpipe.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c in np.unique(labels):
        at = labels == c
        ax.scatter(points[at, 0], points[at, 1], s=6, alpha=0.7, color=cmap(int(c) % cmap.N), label=classes[int(c)])
    if len(classes) <= 20:
        ax.legend(markerscale=2, fontsize=7, loc="best", frameon=False)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, path)


def closest_pairs(features: torch.Tensor, labels: torch.Tensor, n: int) -> list[tuple[int, int]]:
    """The `n` class pairs whose mean embeddings are most cosine-similar (hardest to tell apart)."""
    present = labels.unique()
    means = F.normalize(torch.stack([F.normalize(features[labels == c], dim=1).mean(0) for c in present]), dim=1)
    sim = means @ means.t()
    pairs = [(float(sim[i, j]), int(present[i]), int(present[j]))
             for i in range(len(present)) for j in range(i + 1, len(present))]
    return [(a, b) for _, a, b in sorted(pairs, reverse=True)[:n]]


def run(ctx: Context) -> StageResult:
    cfg, st = ctx.cfg, ctx.settings
    bad = [m for m in st.methods if m not in METHODS]
    if bad:
        raise ValueError(f"stage.visualize.methods has unknown method(s) {bad}; valid: {', '.join(METHODS)}")
    splits = build_splits(ctx, labelled=True)
    backbone = build_backbone(ctx)
    source = load_pretrained(backbone, cfg.pretrained, "visualize", cfg.tracking.uri)
    test = splits.test
    if len(test) > st.max_points:  # t-SNE is quadratic-ish; a fixed random subset keeps it quick
        test = test.subset(np.sort(np.random.default_rng(cfg.seed).choice(len(test), st.max_points, replace=False)))
    with stage_run(ctx) as run:
        run.log_params({"protocol.points": str(len(test)), "pretrained.source": source})
        features = extract_features(backbone, test, normalizer(ctx), ctx.device, 512)
        x = F.normalize(features, dim=1).numpy()  # the geometry the kNN probe sees
        y = test.labels.numpy()
        out = ctx.run_dir / "plots"
        out.mkdir(parents=True, exist_ok=True)
        made, skipped = [], {}
        for method in st.methods:
            try:
                points = embed_2d(method, x, cfg.seed, st.perplexity)
            except ImportError as err:
                skipped[method] = f"{err.name or err} is not installed (pip install umap-learn)"
                log.warning("visualize: skipping %s: %s", method, skipped[method])
                continue
            made.append(scatter(points, y, splits.classes, out / f"{method}.png",
                                f"{method.upper()} of test embeddings ({cfg.pretrained})"))
        for a, b in closest_pairs(features, test.labels, st.pairs):
            at = (y == a) | (y == b)
            points = embed_2d("pca", x[at], cfg.seed)
            made.append(scatter(points, y[at], splits.classes, out / f"pair_{a}_{b}.png",
                                f"PCA of {splits.classes[a]} vs {splits.classes[b]}"))
        for path in made:
            run.log_artifact(path, "plots")
        if skipped:
            run.set_tags({f"sslpipe.visualize.skipped.{m}": why for m, why in skipped.items()})
    print_table(f"visualize from {cfg.pretrained}", "\n".join(f"plots/{p.name}" for p in made)
                + "".join(f"\nskipped {m}: {why}" for m, why in skipped.items()))
    return StageResult(plots=str(out), run_id=run.id)
