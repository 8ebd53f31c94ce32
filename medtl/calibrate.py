"""Post-hoc calibration of classifier logits, and the measures that judge calibration.

Calibrators are fitted on VALIDATION logits only and applied unchanged to the test split (and
at inference: ``to_dict()`` is stored in the checkpoint sidecar). They are registered by name
in :data:`CALIBRATORS` (``temperature``, ``vector``, ``platt``, ``none``) and built with
:func:`fit_calibrator`. The measures (ECE, adaptive ECE, class-wise ECE, MCE, Brier, NLL,
calibration slope and intercept) are plain functions of ``probs: [N, K]`` and
``labels: [N]``; their definitions are in each docstring and in ``docs/metrics.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize, special

from medtl.errors import ConfigError, DataError
from medtl.registry import Registry

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DEFAULT_BINS = 15
_EPS = 1e-12  # probabilities are clipped to [eps, 1 - eps] before log / logit


# -- input checks ------------------------------------------------------------------------------
def labelled(
    values: np.ndarray, labels: np.ndarray, what: str = "logits"
) -> tuple[np.ndarray, np.ndarray, int]:
    """Keep the labelled rows of ``values: [N, K]`` and ``labels: [N]`` (-1 = unlabelled).

    Returns ``(values [M, K], labels [M], number of unlabelled rows dropped)``. Raises
    :class:`DataError` for NaN / infinite values, mismatched shapes, labels outside ``[0, K)``
    and when every row is unlabelled.
    """
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if values.ndim != 2 or values.shape[1] < 2 or labels.shape != (values.shape[0],):
        raise DataError(
            f"{what} of shape {values.shape} and labels of shape {labels.shape} do not fit: "
            "expected [N, K] with K >= 2 classes and [N] labels"
        )
    bad_rows = ~np.isfinite(values).all(axis=1)
    if bad_rows.any():
        raise DataError(
            f"{what} contain NaN or infinite values in {int(bad_rows.sum())} of {len(values)} "
            "rows; check the model's outputs (a diverged run?) and predict again"
        )
    k = values.shape[1]
    bad = (labels < -1) | (labels >= k)
    if bad.any():
        raise DataError(
            f"labels must be -1 (unlabelled) or a class index in [0, {k}); "
            f"found {sorted(set(labels[bad].tolist()))[:5]}"
        )
    keep = labels >= 0
    if not keep.any():
        raise DataError(
            f"all {len(labels)} rows are unlabelled (label -1); labelled predictions are needed"
        )
    return values[keep], labels[keep], int((~keep).sum())


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``logits: [N, K]``."""
    z = np.asarray(logits, dtype=np.float64)
    return special.softmax(z, axis=1)  # type: ignore[no-any-return]


# -- calibrators ----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Calibrator(ABC):
    """A fitted calibrator: ``apply(logits [N, K]) -> calibrated logits [N, K]``.

    ``n_fit`` / ``n_ignored`` record how many validation rows were used / skipped as unlabelled.
    """

    name: ClassVar[str] = ""
    n_fit: int = 0
    n_ignored: int = 0

    @classmethod
    @abstractmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray) -> Calibrator:
        """Fit on labelled, finite validation ``logits: [N, K]`` and ``labels: [N]``."""

    @abstractmethod
    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated logits ``[N, K]`` for raw ``logits: [N, K]``."""

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``[N, K]``."""
        return softmax(self.apply(logits))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record, e.g. ``{"name": "temperature", "temperature": 1.7, ...}``."""
        return {"name": self.name, **dataclasses.asdict(self)}

    def label(self) -> str:
        """A short human-readable description for reports, e.g. ``temperature T = 1.7``."""
        return f"{self.name} scaling"

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Calibrator:
        """Rebuild a calibrator from :meth:`to_dict` output (e.g. a checkpoint sidecar)."""
        kind = CALIBRATORS.get(str(data.get("name", "")))
        required = [
            f.name
            for f in fields(kind)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [key for key in required if key not in data]
        if missing:
            raise ConfigError(f"calibration record for {kind.name!r} lacks the keys {missing}")
        try:
            return kind(**{f.name: data[f.name] for f in fields(kind) if f.name in data})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"calibration record {data} is invalid: {exc}") from None

    def _check(self, logits: np.ndarray, n_classes: int | None = None) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim != 2 or (n_classes is not None and z.shape[1] != n_classes):
            want = f"[N, {n_classes}]" if n_classes else "[N, K]"
            raise DataError(f"{self.name} calibrator expects logits {want}, got {z.shape}")
        return z


CALIBRATORS: Registry[type[Calibrator]] = Registry("calibrator")


def _registered(cls: type[Calibrator]) -> type[Calibrator]:
    CALIBRATORS.register(cls.name)(cls)
    return cls


def _minimise(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor]) -> None:
    """Minimise ``loss_fn`` over ``params`` in place with L-BFGS (strong Wolfe line search)."""
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=200,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]


def _tensors(logits: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels).long()


@_registered
@dataclass
class TemperatureScaling(Calibrator):
    """``softmax(z / T)`` with one scalar ``T > 0`` (Guo et al. 2017); keeps the argmax."""

    name: ClassVar[str] = "temperature"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self.temperature = float(self.temperature)
        if not np.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")

    bounds: ClassVar[tuple[float, float]] = (0.05, 100.0)

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray) -> TemperatureScaling:
        """Minimise the NLL over ``log T`` (so ``T`` stays positive) with L-BFGS.

        ``T`` is kept in :attr:`bounds`: a model whose validation scores are no better than
        chance drives the optimum to infinity (uniform probabilities), which is no calibration.
        """
        z, y = _tensors(logits, labels)
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        _minimise([log_t], lambda: F.cross_entropy(z / log_t.exp(), y))
        low, high = cls.bounds
        return cls(temperature=float(np.clip(float(log_t.detach().exp()), low, high)))

    def apply(self, logits: np.ndarray) -> np.ndarray:
        return self._check(logits) / self.temperature

    def label(self) -> str:
        return f"temperature T = {self.temperature:.3g}"


@_registered
@dataclass
class VectorScaling(Calibrator):
    """``z * scale + bias`` with a per-class ``scale: [K]`` and ``bias: [K]`` (Guo et al. 2017).

    Fitted by L-BFGS on the NLL plus ``L2 * (|scale - 1|^2 + |bias|^2)``, a small pull towards
    the identity so that classes rare in validation do not get wild parameters.
    """

    name: ClassVar[str] = "vector"
    L2: ClassVar[float] = 1e-3
    scale: list[float] = dataclasses.field(default_factory=list)
    bias: list[float] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.scale = [float(v) for v in self.scale]
        self.bias = [float(v) for v in self.bias]
        if len(self.scale) != len(self.bias) or not np.isfinite(self.scale + self.bias).all():
            raise ValueError(f"scale {self.scale} and bias {self.bias} must be finite, same length")

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray) -> VectorScaling:
        z, y = _tensors(logits, labels)
        w = torch.ones(z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)

        def loss() -> torch.Tensor:
            penalty = ((w - 1) ** 2).sum() + (b**2).sum()
            return F.cross_entropy(z * w + b, y) + cls.L2 * penalty

        _minimise([w, b], loss)
        return cls(scale=w.detach().tolist(), bias=b.detach().tolist())

    def apply(self, logits: np.ndarray) -> np.ndarray:
        z = self._check(logits, len(self.scale))
        return z * np.asarray(self.scale) + np.asarray(self.bias)


@_registered
@dataclass
class PlattScaling(Calibrator):
    """Binary only: ``P(class 1) = sigmoid(a * (z1 - z0) + b)`` (Platt 1999).

    Fitted by logistic regression on the logit difference with Platt's smoothed targets
    ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``, which keep ``a`` finite when validation is
    separable. ``apply`` returns the logits ``[0, a * d + b]``.
    """

    name: ClassVar[str] = "platt"
    a: float = 1.0
    b: float = 0.0

    def __post_init__(self) -> None:
        self.a, self.b = float(self.a), float(self.b)
        if not (np.isfinite(self.a) and np.isfinite(self.b)):
            raise ValueError(f"Platt parameters must be finite, got a={self.a}, b={self.b}")

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray) -> PlattScaling:
        _require_binary(logits)
        d = logits[:, 1] - logits[:, 0]
        n_pos = int((labels == 1).sum())
        n_neg = len(labels) - n_pos
        target = np.where(labels == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
        beta, _ = logistic_fit(d, target)
        return cls(a=float(beta[1]), b=float(beta[0]))

    def apply(self, logits: np.ndarray) -> np.ndarray:
        z = self._check(logits, 2)
        s = self.a * (z[:, 1] - z[:, 0]) + self.b
        return np.stack([np.zeros_like(s), s], axis=1)


def _require_binary(logits: np.ndarray) -> None:
    if logits.shape[1] != 2:
        raise ConfigError(
            f"calibrator 'platt' is for binary tasks; these logits have {logits.shape[1]} "
            "classes: use 'temperature' or 'vector'"
        )


@_registered
@dataclass
class NoCalibration(Calibrator):
    """The identity: logits are returned unchanged."""

    name: ClassVar[str] = "none"

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray) -> NoCalibration:
        return cls()

    def apply(self, logits: np.ndarray) -> np.ndarray:
        return self._check(logits).copy()

    def label(self) -> str:
        return "none (uncalibrated)"


def as_calibrator(calibration: Calibrator | float) -> Calibrator:
    """``calibration`` as a calibrator: a number is a temperature (1 means none).

    Lets callers that only ever knew a temperature keep passing one, while a stored vector or
    Platt calibrator is applied as itself rather than reduced to a number.
    """
    if isinstance(calibration, Calibrator):
        return calibration
    try:
        t = float(calibration)
        return NoCalibration() if t == 1.0 else TemperatureScaling(temperature=t)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"calibration temperature {calibration!r} is invalid: {exc}") from None


def fit_calibrator(name: str, logits: np.ndarray, labels: np.ndarray) -> Calibrator:
    """Fit the calibrator registered as ``name`` on VALIDATION ``logits: [N, K]``, ``labels: [N]``.

    Unlabelled rows (label -1) are skipped and counted in ``n_ignored``; NaN logits, labels out
    of range or an all-unlabelled split raise :class:`DataError`.
    """
    kind = CALIBRATORS.get(name)
    z, y, n_ignored = labelled(logits, labels, "validation logits")
    if n_ignored:
        log.info("calibration %s: %d unlabelled validation rows ignored", name, n_ignored)
    calibrator = kind.fit(z, y)
    calibrator.n_fit, calibrator.n_ignored = len(y), n_ignored
    return calibrator


# -- logistic regression (Platt, calibration slope / intercept) -----------------------------
def logistic_fit(
    x: np.ndarray, target: np.ndarray, offset: np.ndarray | None = None, slope: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Unpenalised logistic regression ``logit P(y) = b0 [+ b1 * x] + offset``.

    ``x, target, offset: [N]`` (targets may be soft, in [0, 1]). Returns the coefficients
    ``[b0, b1]`` (or ``[b0]``) and their Wald covariance (inverse observed information).
    Hand-written with SciPy because an offset term is needed (no scikit-learn estimator has one).
    """
    design = np.column_stack([np.ones_like(x), x]) if slope else np.ones((len(x), 1))
    off = np.zeros_like(x) if offset is None else offset

    def loss(beta: np.ndarray) -> tuple[float, np.ndarray]:
        eta = design @ beta + off
        value = np.mean(np.logaddexp(0.0, eta) - target * eta)
        return float(value), design.T @ (special.expit(eta) - target) / len(x)

    beta = optimize.minimize(
        loss, np.zeros(design.shape[1]), jac=True, method="BFGS", options={"gtol": 1e-10}
    ).x
    p = special.expit(design @ beta + off)
    info = design.T @ (design * (p * (1 - p))[:, None])
    return beta, np.linalg.pinv(info)


# -- calibration measures ------------------------------------------------------------------------
def top_label(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(confidence [N], predicted class [N])``: the largest probability and its class."""
    return probs.max(axis=1), probs.argmax(axis=1)


def bin_index(confidence: np.ndarray, n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """Equal-width bin of each confidence: bin ``b`` holds ``(b/M, (b+1)/M]``, 0 goes to bin 0."""
    return np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def binned_calibration_error(
    confidence: np.ndarray,
    outcome: np.ndarray,
    bins: np.ndarray,
    n_bins: int,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(ECE [B], MCE [B])`` of ``confidence: [N]`` against 0/1 ``outcome: [N]``.

    ``bins: [N]`` is each sample's bin; ``weights: [B, N]`` are bootstrap counts (default one
    row of ones). ECE = sum_b |sum_{i in b} (outcome_i - confidence_i)| / N, i.e. the
    count-weighted mean of |accuracy_b - confidence_b|; MCE = max over non-empty bins.
    """
    w = np.ones((1, len(confidence))) if weights is None else np.asarray(weights, np.float64)
    onehot = np.eye(n_bins)[bins]  # [N, M]
    count = w @ onehot
    gap = np.abs(w @ (onehot * (outcome - confidence)[:, None]))  # [B, M]
    total = count.sum(axis=1)
    ece = gap.sum(axis=1) / np.where(total > 0, total, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_bin = np.where(count > 0, gap / count, -np.inf)
    mce = per_bin.max(axis=1)
    return ece, np.where(np.isfinite(mce), mce, np.nan)


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width bins (Guo et al. 2017).

    ECE = sum_b (n_b / N) * |acc_b - conf_b|, where conf is the top probability, acc the fraction
    of correct top-label predictions in bin ``b`` (bins ``(b/M, (b+1)/M]``). ``probs: [N, K]``.
    """
    p, y, _ = labelled(probs, labels, "probabilities")
    conf, pred = top_label(p)
    return float(binned_calibration_error(conf, pred == y, bin_index(conf, n_bins), n_bins)[0][0])


def mce(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """Maximum calibration error: max over non-empty equal-width bins of |acc_b - conf_b|."""
    p, y, _ = labelled(probs, labels, "probabilities")
    conf, pred = top_label(p)
    return float(binned_calibration_error(conf, pred == y, bin_index(conf, n_bins), n_bins)[1][0])


def equal_mass_bins(confidence: np.ndarray, n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """Bin of each sample when the sorted confidences are cut into ``n_bins`` equal-count bins.

    The sample of rank ``r`` (0-based, stable sort) goes to bin ``floor(r * M / N)``; bin sizes
    differ by at most one and tied confidences may straddle two bins.
    """
    order = np.argsort(confidence, kind="stable")
    bins = np.empty(len(confidence), dtype=np.int64)
    bins[order] = np.arange(len(confidence)) * n_bins // len(confidence)
    return bins


def adaptive_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """Adaptive (equal-mass) ECE (Nixon et al. 2019): the ECE formula on equal-count bins."""
    p, y, _ = labelled(probs, labels, "probabilities")
    conf, pred = top_label(p)
    bins = equal_mass_bins(conf, n_bins)
    return float(binned_calibration_error(conf, pred == y, bins, n_bins)[0][0])


def classwise_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """Class-wise ECE (Kull et al. 2019): mean over classes k of the one-vs-rest ECE of p_k.

    For each class, samples are binned by ``p_k`` in equal-width bins and the outcome is
    ``y == k``; the K values are averaged with equal weight.
    """
    p, y, _ = labelled(probs, labels, "probabilities")
    errors = [
        binned_calibration_error(p[:, k], y == k, bin_index(p[:, k], n_bins), n_bins)[0][0]
        for k in range(p.shape[1])
    ]
    return float(np.mean(errors))


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over samples of sum over classes of (p_ik - y_ik)^2.

    Range [0, 2]. For a binary task this is twice the usual Brier score (p - y)^2 of the
    positive class.
    """
    p, y, _ = labelled(probs, labels, "probabilities")
    return float(np.mean(_brier_terms(p, y)))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Negative log-likelihood: mean over samples of -ln p_{i, y_i} (p clipped at 1e-12)."""
    p, y, _ = labelled(probs, labels, "probabilities")
    return float(np.mean(_nll_terms(p, y)))


def _brier_terms(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    return ((p - np.eye(p.shape[1])[y]) ** 2).sum(axis=1)  # type: ignore[no-any-return]


def _nll_terms(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(p[np.arange(len(y)), y], _EPS, 1.0))  # type: ignore[no-any-return]


def calibration_slope_intercept(
    probs: np.ndarray, labels: np.ndarray, positive: int | None = None, alpha: float = 0.05
) -> dict[str, float]:
    """Calibration slope and intercept with Wald ``1 - alpha`` intervals (Van Calster et al.).

    The outcome ``o`` and probability ``p`` are: for a named ``positive`` class (and class 1 of a
    binary task by default) ``o = [y == positive]``, ``p = p_positive``; for a multi-class task
    without ``positive``, the top label: ``o = [argmax == y]``, ``p = max_k p_k``. The slope is
    ``b1`` of ``logit P(o) = b0 + b1 * logit(p)``; the intercept is calibration-in-the-large,
    ``a`` of ``logit P(o) = a + logit(p)`` (slope fixed at 1). Ideal: slope 1, intercept 0.
    Undefined values (constant outcome, separable data) are NaN.
    """
    p, y, _ = labelled(probs, labels, "probabilities")
    o, q = _slope_outcome(p, y, positive)
    x = special.logit(np.clip(q, _EPS, 1 - _EPS))
    z = float(special.ndtri(1 - alpha / 2))
    out = {"slope": (np.nan, np.nan), "intercept": (np.nan, np.nan)}
    if o.all() or not o.any():
        return _with_intervals(out, z)
    beta, cov = logistic_fit(x, o.astype(np.float64), offset=x, slope=False)
    out["intercept"] = (beta[0], cov[0, 0])
    if np.ptp(x) > 0 and not _separable(x, o):
        beta, cov = logistic_fit(x, o.astype(np.float64))
        out["slope"] = (beta[1], cov[1, 1])
    return _with_intervals(out, z)


def _with_intervals(estimates: dict[str, tuple[float, float]], z: float) -> dict[str, float]:
    """``{name: (value, variance)}`` -> ``{name, name_ci_low, name_ci_high}`` floats."""
    out: dict[str, float] = {}
    for name, (value, variance) in estimates.items():
        value, half = float(value), z * float(np.sqrt(variance))
        out.update({name: value, f"{name}_ci_low": value - half, f"{name}_ci_high": value + half})
    return out


def _slope_outcome(
    p: np.ndarray, y: np.ndarray, positive: int | None
) -> tuple[np.ndarray, np.ndarray]:
    if positive is None and p.shape[1] == 2:
        positive = 1
    if positive is None:
        conf, pred = top_label(p)
        return pred == y, conf
    return y == positive, p[:, positive]


def _separable(x: np.ndarray, o: np.ndarray) -> bool:
    """True when a threshold on ``x`` splits the outcome perfectly (slope MLE is infinite)."""
    return bool(x[o].min() >= x[~o].max() or x[o].max() <= x[~o].min())


@dataclass
class ReliabilityTable:
    """Per-bin figures for a reliability diagram; ``edges: [M + 1]``, the rest ``[M]``.

    ``confidence`` and ``accuracy`` are NaN in empty bins.
    """

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    def to_dict(self) -> dict[str, list[float]]:
        keys = ("edges", "count", "confidence", "accuracy")
        return {k: [float(v) for v in getattr(self, k)] for k in keys}


def reliability_table(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS
) -> ReliabilityTable:
    """Top-label equal-width bins: count, mean confidence and accuracy per bin."""
    p, y, _ = labelled(probs, labels, "probabilities")
    conf, pred = top_label(p)
    bins = bin_index(conf, n_bins)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, conf, minlength=n_bins) / count
        accuracy = np.bincount(bins, (pred == y).astype(np.float64), minlength=n_bins) / count
    return ReliabilityTable(np.linspace(0, 1, n_bins + 1), count, mean_conf, accuracy)


def reliability_diagram(
    probs: np.ndarray,
    labels: np.ndarray,
    n_bins: int = DEFAULT_BINS,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Draw accuracy vs confidence per bin, the diagonal, and the bin counts underneath.

    Draws into ``ax`` (a histogram axis is split off below it) or into a new figure; returns
    the figure. Uses matplotlib's object API only (no pyplot state, works under Agg).
    """
    from matplotlib.figure import Figure
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    table = reliability_table(probs, labels, n_bins)
    if ax is None:
        fig = Figure(figsize=(4.5, 5.5), layout="constrained")
        ax, hist_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig = ax.get_figure(root=True)  # type: ignore[assignment]
        hist_ax = make_axes_locatable(ax).append_axes("bottom", size="30%", pad=0.1, sharex=ax)
    _draw_reliability(ax, hist_ax, table, title or f"ECE {ece(probs, labels, n_bins):.3f}")
    return fig


def _draw_reliability(ax: Axes, hist_ax: Axes, table: ReliabilityTable, title: str) -> None:
    left, width = table.edges[:-1], np.diff(table.edges)
    full = table.count > 0
    ax.bar(
        left[full],
        table.accuracy[full],
        width[full],
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot(
        table.confidence[full],
        table.accuracy[full],
        "o",
        color="black",
        ms=3,
        label="(mean confidence, accuracy)",
    )
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    ax.tick_params(labelbottom=False)
    ax.legend(loc="upper left", fontsize="small")
    hist_ax.bar(left, table.count, width, align="edge", color="grey", edgecolor="black")
    hist_ax.set(xlim=(0, 1), xlabel="confidence (top-label probability)", ylabel="count")


def calibration_summary(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS, positive: int | None = None
) -> dict[str, Any]:
    """Every calibration measure of ``probs: [N, K]`` (JSON-serialisable).

    Keys: n, n_bins, ece, adaptive_ece, classwise_ece, mce, brier, nll, slope / intercept with
    Wald intervals, slope_outcome (which outcome the slope refers to) and the reliability table.
    """
    p, y, _ = labelled(probs, labels, "probabilities")
    if positive is None and p.shape[1] > 2:
        target = "top label (argmax correct)"
    else:
        target = f"class index {1 if positive is None else positive} vs rest"
    return {
        "n": len(y),
        "n_bins": n_bins,
        "ece": ece(p, y, n_bins),
        "adaptive_ece": adaptive_ece(p, y, n_bins),
        "classwise_ece": classwise_ece(p, y, n_bins),
        "mce": mce(p, y, n_bins),
        "brier": brier_score(p, y),
        "nll": nll(p, y),
        **calibration_slope_intercept(p, y, positive),
        "slope_outcome": target,
        "reliability": reliability_table(p, y, n_bins).to_dict(),
    }


def bootstrap_calibration(
    probs: np.ndarray, labels: np.ndarray, weights: np.ndarray, n_bins: int = DEFAULT_BINS
) -> dict[str, np.ndarray]:
    """ECE, MCE, class-wise ECE, adaptive ECE, Brier and NLL for each bootstrap resample.

    ``probs: [N, K]``, ``labels: [N]`` (all labelled), ``weights: [B, N]`` counts of each
    sample in each resample. Returns arrays ``[B]``; a row of ones reproduces the point values.
    """
    p, y, _ = labelled(probs, labels, "probabilities")
    w = np.asarray(weights, dtype=np.float64)
    conf, pred = top_label(p)
    ece_b, mce_b = binned_calibration_error(conf, pred == y, bin_index(conf, n_bins), n_bins, w)
    classwise = [
        binned_calibration_error(p[:, k], y == k, bin_index(p[:, k], n_bins), n_bins, w)[0]
        for k in range(p.shape[1])
    ]
    total = w.sum(axis=1)
    return {
        "ece": ece_b,
        "mce": mce_b,
        "classwise_ece": np.mean(classwise, axis=0),
        "adaptive_ece": _bootstrap_adaptive(p, y, w.astype(np.int64), n_bins),
        "brier": w @ _brier_terms(p, y) / total,
        "nll": w @ _nll_terms(p, y) / total,
    }


def _bootstrap_adaptive(p: np.ndarray, y: np.ndarray, w: np.ndarray, n_bins: int) -> np.ndarray:
    """Adaptive ECE per resample: equal-mass bins must be recut on each expanded resample."""
    out = np.empty(len(w))
    for b, counts in enumerate(w):
        idx = np.repeat(np.arange(len(y)), counts)
        conf, pred = top_label(p[idx])
        bins = equal_mass_bins(conf, n_bins)
        out[b] = binned_calibration_error(conf, pred == y[idx], bins, n_bins)[0][0]
    return out
