"""``drpipe ensemble``: combine trained grade models, as the reference works did by hand.

Every member predicts the validation split (to set the combination's weights, or fit the
stacker, and to rank the members) and the evaluated split; the combination is then scored
with the same metrics as ``drpipe evaluate``, beside each member's.

methods
  vote      majority vote of the members' grades; a tie goes to the best member (by
            validation kappa) among those that voted for a tied grade
  weighted-mean
            average of the members' probabilities, each member weighted by its validation
            accuracy (accuracy-weighted averaging); ``mean``, its earlier name, is accepted
            (commands, ensemble.json files) and recorded as given
  weighted  class-weighted averaging: member m's probability of grade g weighted by its
            validation F1 on grade g (members good at a grade speak for it)
  stack     a multinomial logistic regression (L2) on the members' log-probabilities,
            fitted on the validation predictions
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reporting.plots import plot_confusion
from tfrecord_writer.schema import N_GRADES
from training import metrics as M
from training import runs as R
from training.fit import model_outputs
from training.predict import Prediction, graded
from training.predict import predict_photos as member_predict

METHODS = ("vote", "weighted-mean", "weighted", "stack")
ALIASES = {"mean": "weighted-mean"}  # earlier names, still accepted
EPS = 1e-7


def canonical(method: str) -> str:
    """A method's name, its earlier name (``mean``) mapped to today's; EnsembleError if
    there is none such."""
    name = ALIASES.get(method, method)
    if name not in METHODS:
        raise EnsembleError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    return name


class EnsembleError(RuntimeError):
    """A one-line reason the ensemble cannot be made."""


@dataclass
class Member:
    run: Path
    val_y: np.ndarray
    val_p: np.ndarray
    y: np.ndarray
    p: np.ndarray
    val_metrics: dict = field(default_factory=dict)


def vote(grades: np.ndarray, rank: list[int]) -> np.ndarray:
    """Majority of ``grades`` [members, n]; ties to the best-ranked member voting for a tied
    grade (``rank`` = member indices, best first)."""
    n_members, n = grades.shape
    out = np.empty(n, int)
    for i in range(n):
        counts = np.bincount(grades[:, i], minlength=N_GRADES)
        tied = np.flatnonzero(counts == counts.max())
        out[i] = next(grades[m, i] for m in rank if grades[m, i] in tied)
    return out


def accuracy_weights(members: list[Member]) -> np.ndarray:
    acc = np.array([m.val_metrics["accuracy"] for m in members]) + EPS
    return acc / acc.sum()


def per_grade_f1_weights(members: list[Member]) -> np.ndarray:
    """[members, grades]: validation F1 per grade, normalised over the members per grade
    (equal where no member ever got a grade right)."""
    f1 = np.array([m.val_metrics["per_class"]["f1"] for m in members]) + 1e-3
    return f1 / f1.sum(axis=0, keepdims=True)


@dataclass
class Stacker:
    """Multinomial logistic regression on concatenated log-probabilities; full-batch gradient
    descent from zero (deterministic)."""

    l2: float = 1e-2
    steps: int = 2000
    lr: float = 0.5
    w: np.ndarray | None = None
    b: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @staticmethod
    def features(probs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([np.log(p + EPS) for p in probs], axis=1)

    def fit(self, x: np.ndarray, y: np.ndarray) -> Stacker:
        self.mean, self.std = x.mean(axis=0), x.std(axis=0) + 1e-6
        z = (x - self.mean) / self.std
        onehot = np.eye(N_GRADES)[y]
        w = np.zeros((z.shape[1], N_GRADES))
        b = np.log(onehot.mean(axis=0) + 1e-3)  # start from the class prior
        for _ in range(self.steps):
            p = _softmax(z @ w + b)
            g = p - onehot
            w -= self.lr * (z.T @ g / len(z) + self.l2 * w)
            b -= self.lr * g.mean(axis=0)
        self.w, self.b = w, b
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return _softmax(((x - self.mean) / self.std) @ self.w + self.b)


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fit(method: str, members: list[Member]) -> dict:
    """What a method learns from the validation predictions (JSON-able, full precision:
    ``drpipe predict`` with the ensemble applies exactly this)."""
    method = canonical(method)
    if method == "vote":
        rank = sorted(range(len(members)),
                      key=lambda i: -members[i].val_metrics["quadratic_kappa"])
        return {"tie_break_order": rank}
    if method == "weighted-mean":
        return {"weights": accuracy_weights(members).tolist()}
    if method == "weighted":  # "class_weights": the key of ensemble.json files since the start
        return {"class_weights": per_grade_f1_weights(members).tolist()}
    if method == "stack":
        st = Stacker().fit(Stacker.features([m.val_p for m in members]),
                           members[0].val_y.astype(int))
        return {"stacker": {"w": st.w.tolist(), "b": st.b.tolist(), "mean": st.mean.tolist(),
                            "std": st.std.tolist(),
                            "features": "log(p + 1e-7) of each member, standardised"}}


def apply(method: str, fitted: dict, probs: list[np.ndarray]) -> np.ndarray:
    """Combined [n, 5] probabilities (one-hot for a vote) from each member's [n, 5]."""
    method = canonical(method)
    if method == "vote":
        g = vote(np.stack([p.argmax(axis=1) for p in probs]), fitted["tie_break_order"])
        return np.eye(N_GRADES)[g]
    if method == "weighted-mean":
        return sum(w * p for w, p in zip(fitted["weights"], probs, strict=True))
    if method == "weighted":
        w = np.asarray(fitted["class_weights"])
        return sum(w[i] * p for i, p in enumerate(probs))
    if method == "stack":
        st = fitted["stacker"]
        stacker = Stacker(w=np.asarray(st["w"]), b=np.asarray(st["b"]),
                          mean=np.asarray(st["mean"]), std=np.asarray(st["std"]))
        return stacker.predict(Stacker.features(probs))


def load_members(runs: list[Path], data: str | None, split: str, val_split: str | None,
                 checkpoint: str, log=print) -> tuple[list[Member], str, str]:
    cfgs = []
    for run in runs:
        cfg = R.load_config(run)
        if cfg.task != "grade":
            raise EnsembleError(f"{run} is a {cfg.task!r} model; ensembles combine grade "
                                "models (--task grade)")
        R.require_model(run, checkpoint)
        cfgs.append(cfg)
    # Each member is scored on its own shards (or all on --data), checked to be what it
    # was trained on (--data: preprocessed as it was); the members' shards must hold the
    # same photos, labels and splits, so that their predictions line up photo by photo.
    datas = [str(data)] * len(runs) if data else [cfg.data for cfg in cfgs]
    recs = [R.check_data(run, d, own=not data) for run, d in zip(runs, datas, strict=True)]
    for run, rec, d in zip(runs[1:], recs[1:], datas[1:], strict=True):
        if not R.same_photos(recs[0], rec):
            raise EnsembleError(f"{run} was trained on {d}, other photos or splits than "
                                f"{runs[0]} ({datas[0]}): members must share their data")
    # Members trained with --min-quality are scored as evaluate scores them: on the photos
    # reaching it; members with different bars saw different photos and cannot line up.
    bars = sorted({str(cfg.min_quality) for cfg in cfgs})
    if len(bars) > 1:
        raise EnsembleError("the members were trained at different --min-quality ("
                            + ", ".join(f"{run}: {cfg.min_quality or 'all photos'}"
                                        for run, cfg in zip(runs, cfgs, strict=True))
                            + "): their photos differ")
    min_score = cfgs[0].min_score()
    data = datas[0]
    val_split = val_split or cfgs[0].val_split
    counts = R.dataset_info(data)["counts"]
    for s in (split, val_split):
        if s not in counts:
            raise EnsembleError(f"{data} has no split {s!r} (has {', '.join(counts)})")
    if split == val_split:
        raise EnsembleError(f"the evaluated split and the validation split are both {split!r}:"
                            " weights fitted on it would be scored on it")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    import training.models  # noqa: F401 - registers the custom layers
    from training.data import make_dataset

    members = []
    for run, cfg, member_data in zip(runs, cfgs, datas, strict=True):
        log(f"predicting {val_split} and {split} with {run}")
        model = keras.saving.load_model(R.model_path(run, checkpoint))
        out = {}
        for s in (val_split, split):
            ds = make_dataset(member_data, s, image_size=cfg.image_size, batch_size=32,
                              min_quality=min_score)
            out[s] = model_outputs(model, ds, "grade")
        m = Member(run, *out[val_split], *out[split])
        m.val_metrics = M.grade_metrics(m.val_y.astype(int), m.val_p.argmax(axis=1))
        members.append(m)
        keras.backend.clear_session()
    for m in members[1:]:  # same photos, read in the same order: same labels
        if not (np.array_equal(m.y, members[0].y) and np.array_equal(m.val_y, members[0].val_y)):
            raise EnsembleError(f"{m.run} and {members[0].run}: their shards do not hold the "
                                f"same photos in the same order ({split}/{val_split})")
    return members, data, val_split, cfgs[0].min_quality


def ensemble(runs: list[str | Path], method: str, data: str | None = None,
             split: str = "test", val_split: str | None = None, checkpoint: str = "final",
             out: str | Path | None = None, log=print) -> dict:
    """``drpipe ensemble``: fit ``method`` on the members' validation predictions, score it
    on ``split`` beside each member; with ``out``, write ensemble.json and the confusion
    matrix there. The ``method`` is recorded as given (``mean`` stays ``mean``)."""
    canonical(method)
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise EnsembleError("an ensemble needs at least two runs")
    if len(set(r.resolve() for r in runs)) < len(runs):
        raise EnsembleError("a run is given twice")
    members, data, val_split, min_quality = load_members(runs, data, split, val_split,
                                                         checkpoint, log)
    fitted = fit(method, members)
    p = apply(method, fitted, [m.p for m in members])
    y = members[0].y.astype(int)
    result = M.grade_metrics(y, p.argmax(axis=1))
    result.update(split=split, data=str(Path(data).resolve()), model=f"ensemble-{method}",
                  task="grade")
    report = {
        "method": method, "split": split, "validation_split": val_split,
        "checkpoint": checkpoint, "data": str(Path(data).resolve()), "ensemble": result,
        "min_quality": min_quality,
        "members": [{"run": str(m.run.resolve()),
                     **M.grade_metrics(y, m.p.argmax(axis=1)),
                     "val_quadratic_kappa": m.val_metrics["quadratic_kappa"],
                     "val_accuracy": m.val_metrics["accuracy"]} for m in members],
        "fitted": fitted,
    }
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        R.write_json(out / R.ENSEMBLE, report)
        plot_confusion(result, out / f"confusion_{split}.png")
    return report


def predict_photos(ensemble_dir: str | Path, sources, progress=None):
    """``drpipe predict ENSEMBLE``: every member grades the photos with its own run's
    preprocessing; their probabilities are combined exactly as ``drpipe ensemble`` fitted.
    A photo any member rejects is rejected."""
    rep = R.ensemble_record(ensemble_dir)
    per_member = []
    for m in rep["members"]:
        if not Path(m["run"]).is_dir():
            raise EnsembleError(f"member run {m['run']} of {ensemble_dir} is gone")
        preds = member_predict(m["run"], sources, rep["checkpoint"], progress=progress)
        per_member.append({p.path: p for p in preds})
    first = per_member[0]
    ok = [path for path in first if all(pm[path].status == "ok" for pm in per_member)]
    combined = apply(rep["method"], rep["fitted"],
                     [np.array([pm[path].probabilities for path in ok]).reshape(-1, N_GRADES)
                      for pm in per_member])
    out = {}
    for path, p, grade in zip(ok, combined, M.decide("grade", combined), strict=True):
        # the quality reported is the first member's measure (its run's preprocessing)
        out[path] = dataclasses.replace(
            graded(Path(path), first[path].image_id, "grade", p, grade),
            quality_score=first[path].quality_score, quality=first[path].quality)
    for path, pred in first.items():
        if path not in out:
            bad = next(pm[path] for pm in per_member if pm[path].status != "ok")
            out[path] = dataclasses.replace(
                Prediction.rejected(Path(path), pred.image_id, bad.reason),
                quality_score=bad.quality_score, quality=bad.quality)
    return sorted(out.values(), key=lambda p: p.image_id)
