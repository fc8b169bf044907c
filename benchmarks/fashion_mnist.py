"""Reference numbers on real data: every label-free method pretrained on the real Fashion-MNIST
(Debian's dataset-fashion-mnist: the four idx .gz files as Zalando ships them) for a stated
budget through the real CLI, then kNN, linear probe and fine-tune test accuracy, beside a
random-init encoder and beside logistic regression and kNN on raw pixels, computed here on the
same splits (55,000 train / 5,000 val held out stratified / the 10,000 test images).

    python benchmarks/fashion_mnist.py --epochs 5 [--methods simclr byol] [--method-epochs byol=10]
        [--method-overrides simsiam=stage.pretrain.optimizer.lr=0.0005] [--workdir DIR]
        [--finetune-view jitter_prob=0 rotation=0]

--method-epochs gives some methods their own pretraining budget (the table prints each row's);
--method-overrides adds Hydra overrides to one method's recipe (its pipeline run; the row's label
shows them, and its runs are kept apart from the same method's runs without them).
--finetune-view sets view ops for every fine-tune (random init's and each method's) over the data
set's view (`stage.finetune.view`): the README's goal fine-tunes on crops and flips alone.
A later call with the same --workdir reuses the runs it finds there at the same budget (random
init included) and adds the ones it lacks.

Published references on the same test set (Xiao et al. 2017, the Fashion-MNIST README and its
benchmark): logistic regression on pixels 0.842, SVC (RBF, C=10) 0.897, two-conv CNNs
0.916-0.934. A script, not a test: hours for every method on 2 CPU cores. Each method's run is
one command (printed): `python -m sslpipe +experiment=fashion_mnist method=<name>` with the
budget of the flags (conf/experiment/fashion_mnist_vit.yaml for mae and ibot)."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT = "/usr/share/datasets/fashion-mnist"
# label-free methods on a CNN (supcon / simo2 use labels); ibot / mae need a ViT: add them with --methods
METHODS = ["simclr", "byol", "mocov1", "mocov2", "mocov3", "simsiam", "barlowtwins", "vicreg", "swav", "dino",
           "autoencoder"]
VIT_METHODS = {"ibot", "mae"}
# The backbone of conf/experiment/fashion_mnist_vit.yaml (its header says why), for the random-init
# row the ViT methods are compared with (tests/test_methods.py checks the two agree)
VIT = "backbone=vit_tiny backbone.patch_size=7 +backbone.depth=4"
PUBLISHED = {"pixel logistic regression": 0.842, "SVC (RBF, C=10) on pixels": 0.897, "two-conv CNN": "0.916-0.934"}


def common(args) -> list[str]:
    return ["dataset=fashion_mnist", f"dataset.root={args.root}", f"seed={args.seed}"]


def pipeline(args, method: str, epochs: int) -> list[str]:
    """A table row: the recipe in conf/experiment (pretrain, kNN, cached linear probe, fine-tune)."""
    experiment = "fashion_mnist_vit" if method in VIT_METHODS else "fashion_mnist"
    return [f"+experiment={experiment}", f"method={method}", f"dataset.root={args.root}", f"seed={args.seed}",
            f"stage.pretrain.loop.epochs={epochs}", f"stage.finetune.loop.epochs={args.finetune_epochs}"]


def method_epochs(pairs: list[str], methods: list[str], default: int) -> dict[str, int]:
    """Each method's pretraining epochs: --method-epochs METHOD=EPOCHS, else --epochs."""
    budgets = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in methods or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--method-epochs {pair!r}: expected METHOD=EPOCHS with METHOD one of --methods "
                             f"({', '.join(methods)}) and EPOCHS a positive integer")
        budgets[name] = int(value)
    return {m: budgets.get(m, default) for m in methods}


def method_overrides(pairs: list[str], methods: list[str]) -> dict[str, list[str]]:
    """Each method's extra recipe overrides: --method-overrides METHOD=KEY=VALUE (repeatable)."""
    extra: dict[str, list[str]] = {m: [] for m in methods}
    for pair in pairs:
        name, _, override = pair.partition("=")
        if name not in methods or "=" not in override or override.startswith("="):
            raise SystemExit(f"--method-overrides {pair!r}: expected METHOD=KEY=VALUE (a Hydra override of that "
                             f"method's recipe, e.g. simsiam=stage.pretrain.optimizer.lr=0.0005) with METHOD one "
                             f"of --methods ({', '.join(methods)})")
        extra[name].append(override)
    return extra


def finetune_view(pairs: list[str]) -> list[str]:
    """--finetune-view OP=VALUE ... as Hydra overrides of stage.finetune.view (`++`: the key may be
    set already, e.g. by an experiment), checked as the fine-tune checks them before any work."""
    overrides = []
    for pair in pairs:
        op, _, value = pair.partition("=")
        if not op or not value:
            raise SystemExit(f"--finetune-view {pair!r}: expected OP=VALUE, e.g. jitter_prob=0")
        overrides.append(f"++stage.finetune.view.{op}={value}")
    if overrides:  # sslpipe.validate names an unknown op and the ops that fit, or a value out of range
        from sslpipe.config import compose
        from sslpipe.validate import ConfigError, validate

        try:
            validate(compose(["stage=finetune", "dataset=fashion_mnist", *overrides]))
        except ConfigError as err:
            raise SystemExit(f"--finetune-view {' '.join(pairs)}: {err}") from None
    return overrides


def cli(argv: list[str], cwd: Path, store: str) -> float:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    print("$ python -m sslpipe " + " ".join(shlex.quote(a) for a in argv), file=sys.stderr, flush=True)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sslpipe", *argv], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sslpipe failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - t


def results(store: str, experiment: str) -> dict[str, float]:
    """test/top1 per stage of the experiment's runs, and the pretrain run's wall time (s)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    out = {}
    # finished runs only (a stopped one has no checkpoint), oldest first so the newest wins
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"]) if exp else []
    for run in runs:
        stage = run.data.tags.get("sslpipe.stage")
        if stage == "pretrain":
            out["pretrain_s"] = (run.info.end_time - run.info.start_time) / 1000
            out["pretrain_run"] = run.info.run_id
        elif stage and "test/top1" in run.data.metrics:
            augmented = run.data.params.get("protocol.protocol") == "augmented"
            out[stage + ("_augmented" if augmented else "")] = run.data.metrics["test/top1"]
    return out


def pixel_baselines(root: str, seed: int) -> dict[str, float]:
    """Logistic regression (scikit-learn, pixels scaled to [0, 1], as the Fashion-MNIST benchmark)
    and sslpipe's own kNN rule (cosine, k=20, T=0.07) on raw pixels, on the splits the runs use."""
    from sklearn.linear_model import LogisticRegression

    from sslpipe.data.torchvision_sets import load_mnist
    from sslpipe.stages.knn import knn_classify

    splits = load_mnist("fashion_mnist", root, image_size=28, val_size=5000, split_seed=0)
    train = splits.train.images.flatten(1).float() / 255
    test = splits.test.images.flatten(1).float() / 255
    y_train, y_test = splits.train.labels, splits.test.labels
    knn = (knn_classify(train, y_train, test, 10, k=20, temperature=0.07) == y_test).float().mean().item()
    logreg = LogisticRegression(max_iter=300, random_state=seed).fit(train.numpy(), y_train.numpy())
    return {"knn": knn, "linear_probe": float((logreg.predict(test.numpy()) == y_test.numpy()).mean()),
            "train_images": len(y_train)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="pretraining epochs per method")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--augmented-epochs", type=int, default=3, help="linear probe, published protocol")
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--method-epochs", nargs="*", default=[], metavar="METHOD=EPOCHS",
                        help="a method's own pretraining budget, e.g. byol=10 (the others get --epochs)")
    parser.add_argument("--method-overrides", nargs="*", default=[], metavar="METHOD=KEY=VALUE",
                        help="Hydra overrides for one method's recipe, e.g. simsiam=stage.pretrain.optimizer.lr=0.0005")
    parser.add_argument("--finetune-view", nargs="*", default=[], metavar="OP=VALUE",
                        help="view ops for the fine-tunes over the data set's view, e.g. jitter_prob=0 rotation=0")
    parser.add_argument("--root", default=ROOT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--cnn", nargs="*", default=[], metavar="OVERRIDE",
                        help="overrides for the smallcnn rows (random init and the CNN methods), e.g. "
                             "backbone.num_features=512")
    args = parser.parse_args()
    epochs = method_epochs(args.method_epochs, args.methods, args.epochs)
    overrides = method_overrides(args.method_overrides, args.methods)
    view = finetune_view(args.finetune_view)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sslpipe-fmnist-"))
    work.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{work}/mlflow.db"

    pixels = pixel_baselines(args.root, args.seed)
    print(f"pixels: kNN {pixels['knn']:.4f}, logistic regression {pixels['linear_probe']:.4f}", file=sys.stderr)
    rows = [("raw pixels (logistic regression / kNN)", None, pixels["knn"], pixels["linear_probe"], None, None, None)]
    augmented = ["stage=linear_probe", "stage.linear_probe.protocol=augmented", f"stage.linear_probe.augmented.epochs={args.augmented_epochs}"]
    # the ViT methods get their own random-init row: the encoder they are compared with
    randoms = ["random", *(["random_vit"] if VIT_METHODS & set(args.methods) else [])]
    for name in [*randoms, *args.methods]:
        # a method's runs are named by their budget, so a --workdir never mixes budgets
        tag = f"fmnist-{name}" if name in randoms else f"fmnist-{name}-{epochs[name]}ep"
        if overrides.get(name):  # and by their recipe overrides
            tag += "-" + "-".join(o.replace("=", "_") for o in overrides[name])
        if view:  # and by the fine-tune's view
            tag += "-ftview-" + "-".join(p.replace("=", "_") for p in args.finetune_view)
        experiment = f"tracking.experiment={tag}"
        done = results(store, tag)
        backbone = VIT.split() if name in VIT_METHODS | {"random_vit"} else args.cnn
        if {"knn", "linear_probe", "linear_probe_augmented", "finetune"} <= done.keys():
            print(f"{name}: measured before in {store}, reused", file=sys.stderr)  # --workdir of an earlier call
        elif name in randoms:
            for stage in ("knn", "linear_probe", "finetune"):  # a pipeline would pretrain first
                budget = [f"stage.finetune.loop.epochs={args.finetune_epochs}", *view] if stage == "finetune" else []
                cli([*common(args), f"stage={stage}", *backbone, "pretrained=random", *budget, experiment], work, store)
            cli([*common(args), *augmented, *backbone, "pretrained=random", experiment], work, store)
        else:
            if not {"knn", "linear_probe", "finetune"} <= done.keys():
                # conf/experiment/fashion_mnist_vit.yaml sets the ViT methods' backbone itself
                own = [] if name in VIT_METHODS else backbone
                cli([*pipeline(args, name, epochs[name]), *own, *overrides[name], *view, experiment], work, store)
            pretrained = f"pretrained=runs:/{results(store, tag)['pretrain_run']}"
            # method=: the run is named after the method whose weights it probes
            cli([*common(args), *augmented, f"method={name}", *backbone, pretrained, experiment], work, store)
        r = results(store, tag)
        label = {"random": f"random init ({' '.join(['smallcnn', *args.cnn])})",
                 "random_vit": "random init (ViT below)"}.get(name, name)
        if name in VIT_METHODS:
            label = f"{name} ({VIT})"
        if overrides.get(name):
            label += f" ({' '.join(overrides[name])})"
        rows.append((label, epochs.get(name), r["knn"], r["linear_probe"],
                     r["linear_probe_augmented"], r["finetune"], r.get("pretrain_s")))
        print(f"{name}: {r}", file=sys.stderr, flush=True)

    print(f"\nFashion-MNIST (real, {args.root}), smallcnn, seed {args.seed}: pretraining epochs per method as "
          f"the table says; linear probe cached (100 epochs on cached features) and augmented (the published protocol, "
          f"{args.augmented_epochs} epochs of SGD on fresh crops); fine-tune {args.finetune_epochs} epochs"
          f"{' with view ' + ' '.join(args.finetune_view) if view else ''}; test "
          f"accuracy on the 10,000 test images. MLflow store: {store}\n")
    print("| encoder | pretrain epochs | kNN top-1 | linear (cached) | linear (augmented) | fine-tune | pretrain (min) "
          "| kNN > pixel kNN | linear > pixel logreg |")
    print("|---|---|---|---|---|---|---|---|---|")

    def cell(v, fmt="{:.4f}"):
        return "-" if v is None else fmt.format(v)

    for name, budget, knn, lin, lin_aug, ft, secs in rows:
        beats = ("-", "-") if name.startswith(("raw", "random")) else (
            "yes" if knn > pixels["knn"] else "NO", "yes" if lin > pixels["linear_probe"] else "NO")
        print(f"| {name} | {cell(budget, '{}')} | {knn:.4f} | {lin:.4f} | {cell(lin_aug)} | {cell(ft)} | {cell(secs and secs / 60, '{:.1f}')} "
              f"| {beats[0]} | {beats[1]} |")
    print("\npublished: " + "; ".join(f"{k} {v}" for k, v in PUBLISHED.items()))


if __name__ == "__main__":
    main()
