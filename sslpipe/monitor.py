"""Watching a pretraining run while it trains: every `every` optimizer steps, a kNN
classifier on held-out images (`online/knn_top1`) and two collapse signals of their
embeddings (`online/feature_std`, `online/rank`), logged as MLflow metrics and shown on the
progress line, with a warning (and the tag `sslpipe.collapse`) when they show collapse.

The signals are the literature's: the standard deviation of l2-normalised embeddings
(SimSiam, Chen and He 2021, section 4.1: about 1/sqrt(d) per dimension when spread, 0 when
collapsed; here times sqrt(d), so about 1 vs 0) and RankMe's effective rank (Garrido et al.,
ICML 2023: exp of the entropy of the normalised singular values; 1 when every embedding lies
on one line). Written here because no library we use computes them on a feature matrix."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Collapse thresholds, from runs on digits' val split (10 epochs, `python -m sslpipe
# stage=pretrain device=cpu stage.pretrain.loop.epochs=10 ...`): random init gives std 0.123 / rank 17.3
# (smallcnn) and 0.176 / 6.3 (vit_tiny); default SimCLR 0.26 -> 0.36 / 25 -> 30; collapsing
# runs (simsiam lr 0.5, byol lr 1.0) 0.019 / 1.76 and 0.009 / 1.43 at step 10.
COLLAPSED_STD, COLLAPSED_RANK = 0.05, 2.0


def feature_std(features: torch.Tensor) -> float:
    """Per-dimension std of the l2-normalised (N, D) embeddings, averaged, times sqrt(D)."""
    z = F.normalize(features.float(), dim=1)
    return float(z.std(0).mean() * math.sqrt(z.shape[1]))


def effective_rank(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe: exp(-sum p log p) with p the singular values of the (N, D) embeddings over their sum."""
    s = torch.linalg.svdvals(features.float())
    p = s / s.sum().clamp_min(eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def subset(split, count: int, seed: int):
    """At most `count` labelled images of `split` (a Split or FileSplit), drawn once from `seed`."""
    labelled = torch.nonzero(split.labels >= 0)[:, 0]
    g = torch.Generator().manual_seed(seed)
    return split.subset(labelled[torch.randperm(len(labelled), generator=g)[:count]].sort().values)


@dataclass
class Monitor:
    """`monitor(step, total)` on every rank (feature extraction is sharded over them) returns
    the online metrics when the step is due (every `every` steps and the last), else {}."""

    backbone: torch.nn.Module
    bank: object       # labelled train images (Split or FileSplit): the kNN's memory
    queries: object    # held-out images (the val split, else test): what it classifies
    normalize: torch.nn.Module
    device: torch.device
    num_classes: int
    every: int
    k: int = 20
    temperature: float = 0.07
    budget: float | None = None  # `every: auto`: widen the interval so checks cost at most this share of training
    multiple: int = 1            # intervals stay multiples of this (stage.pretrain.loop.log_every: checks run on logged steps)
    start_step: int = 0          # where training (re)starts
    collapsed_at: int | None = None  # the first step that showed collapse

    def __post_init__(self):
        self._since, self._since_step = time.perf_counter(), self.start_step
        self._created, self._spent, self._last_cost = self._since, 0.0, None

    def due(self, step: int, total: int) -> bool:
        """On the interval (and at the last step). With a budget, also only while the checks so
        far plus one more, at the last one's cost, stay within `budget` of the training time so
        far (the whole run's account, so that neither the first checks of a short run nor the
        final one push the total over); every rank takes the same decision (a check is a collective)."""
        if self.every <= 0 or not (step % self.every == 0 or step == total):
            return False
        if not self.budget or self._last_cost is None:
            return True
        from sslpipe import distributed

        trained = time.perf_counter() - self._created - self._spent
        return all(distributed.gather_objects(self._spent + self._last_cost <= self.budget * trained))

    @torch.no_grad()
    def __call__(self, step: int, total: int) -> dict[str, float]:
        if not self.due(step, total):
            return {}
        from sslpipe.stages.features import extract_features
        from sslpipe.stages.knn import knn_classify

        started = time.perf_counter()
        modes = [(m, m.training) for m in self.backbone.modules()]  # extraction runs in eval mode
        try:
            bank = extract_features(self.backbone, self.bank, self.normalize, self.device, 512, cache=False)
            queries = extract_features(self.backbone, self.queries, self.normalize, self.device, 512, cache=False)
        finally:
            for module, training in modes:
                module.train(training)
        predicted = knn_classify(bank, self.bank.labels, queries, self.num_classes, self.k, self.temperature)
        metrics = {"online/knn_top1": float((predicted == self.queries.labels).float().mean()),
                   "online/feature_std": feature_std(queries), "online/rank": effective_rank(queries)}
        signs = ([f"feature std {metrics['online/feature_std']:.3f} < {COLLAPSED_STD}"]
                 if metrics["online/feature_std"] < COLLAPSED_STD else []) + \
                ([f"effective rank {metrics['online/rank']:.2f} < {COLLAPSED_RANK}"]
                 if metrics["online/rank"] < COLLAPSED_RANK else [])
        if signs and self.collapsed_at is None:
            self.collapsed_at = step
            log.warning("the embeddings look collapsed at step %d/%d (%s; online kNN %.3f). Lower the learning "
                        "rate, check the method's temperature / momentum / centring settings, or stop the run",
                        step, total, ", ".join(signs), metrics["online/knn_top1"])
        cost = time.perf_counter() - started
        self._spent, self._last_cost = self._spent + cost, cost
        self._keep_to_budget(step, started, cost)
        return metrics

    def _keep_to_budget(self, step: int, started: float, spent: float) -> None:
        """With a budget, the interval becomes the fewest steps whose training time is at least
        spent / budget (steps timed since the last check), rounded up to `multiple`. Every rank
        takes the largest rank's need: a check is a collective, so the ranks must agree on it."""
        from sslpipe import distributed

        if self.budget and step > self._since_step:
            step_s = (started - self._since) / (step - self._since_step)
            needed = max(distributed.gather_objects(math.ceil(spent / (self.budget * max(step_s, 1e-9)))))
            needed = -(-needed // self.multiple) * self.multiple
            if needed > self.every:
                log.info("online checks take %.2f s, %.2f s a step: every %d steps keeps them under %.0f %% of "
                         "training (was %d)", spent, step_s, needed, 100 * self.budget, self.every)
                self.every = needed
        self._since, self._since_step = time.perf_counter(), step

    def note(self, metrics: dict[str, float]) -> str:
        """A short text for the progress line."""
        return (f"kNN {metrics['online/knn_top1']:.3f} std {metrics['online/feature_std']:.2f} "
                f"rank {metrics['online/rank']:.1f}" + (" COLLAPSED?" if self.collapsed_at is not None else ""))
