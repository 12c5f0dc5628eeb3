"""Anomaly detection metrics: image ROCAUC, pixel ROCAUC and PRO, and the quality of thresholded decisions.

Pure numpy/scipy; knows nothing of Ray or storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

# 8-connectivity for defect regions, as in the MVTec AD evaluation.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _checked(
    scores: np.ndarray, labels: np.ndarray, ndim: int, names: tuple[str, str], shape: str, true_means: str, fix: str, unit: str
) -> tuple[np.ndarray, np.ndarray]:
    """(float64 scores, labels) once both are `ndim`-D of one shape, the labels bool and every score finite.

    names: what the caller calls scores and labels; shape, true_means, fix, unit: the words of the errors.
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != ndim or labels.shape != scores.shape:
        raise ValueError(f"{names[0]} and {names[1]} must {shape}, got shapes {scores.shape} and {labels.shape}")
    if labels.dtype != bool:
        raise ValueError(f"{names[1]} must be bool (True = {true_means}), got dtype {labels.dtype}; use {fix}")
    scores = scores.astype(np.float64)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{names[0]} contain NaN or infinity; every {unit} needs a finite score")
    return scores, labels


def _check_scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N,) finite scores and (N,) bool labels with both classes present."""
    scores, labels = _checked(scores, labels, 1, ("scores", "labels"), "be 1-D arrays of equal length", "anomalous",
                              "labels.astype(bool)", "image")
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        kind = "anomalous" if n_pos else "normal"
        raise ValueError(f"labels hold only one class (all {kind}); ROCAUC needs both normal and anomalous images")
    return scores, labels


def image_rocauc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROCAUC by the Mann-Whitney rank statistic, ties counted as one half.

    scores: (N,) float image scores, higher = more anomalous.
    labels: (N,) bool, True = anomalous.
    """
    scores, labels = _check_scores_labels(scores, labels)
    ranks = rankdata(scores)  # average ranks for ties
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def roc_curve_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC curve, one point per distinct score (sklearn roc_curve, drop_intermediate=False).

    scores: (N,) float; labels: (N,) bool, True = anomalous.
    Returns fpr, tpr, thresholds, each (M + 1,) float64 for M distinct scores:
    point i predicts "anomalous" for score >= thresholds[i]; thresholds[0] = +inf gives (0, 0).
    """
    scores, labels = _check_scores_labels(scores, labels)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    # Last index of each run of equal scores.
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    tps = np.cumsum(sorted_labels)[ends]
    fps = ends + 1 - tps
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    thresholds = np.r_[np.inf, sorted_scores[ends]]
    return fpr, tpr, thresholds


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x, y) over [x[0], x_max], y interpolated at x_max.

    x: (M,) non-decreasing; y: (M,).
    """
    n = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    xs, ys = x[:n], y[:n]
    if n < x.size and xs[-1] < x_max:
        t = (x_max - x[n - 1]) / (x[n] - x[n - 1])
        xs = np.r_[xs, x_max]
        ys = np.r_[ys, y[n - 1] + t * (y[n] - y[n - 1])]
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2))


def _tail_sums(hist: np.ndarray) -> np.ndarray:
    """(bins,) histogram -> (bins + 1,) sums over bins >= k, for k = bins, ..., 0 (ascending)."""
    return np.r_[0.0, np.cumsum(hist[::-1])]


class PixelMetrics:
    """Streaming pixel ROCAUC and PRO in bounded memory.

    Scores are binned into `bins` equal-width bins over [low, high] (values
    outside are clipped into the edge bins). Memory is three (bins,)
    histograms: normal pixels, defect pixels, and defect pixels weighted by
    1 / |their region| (so PRO(t) is that histogram's tail sum over the number
    of regions).

    Binning error: the curves are evaluated at the bin edges, and each point
    there is exact (threshold score >= edge). Between neighbouring edges the
    exact curve is monotone, so it stays inside the box spanned by the two
    binned points, and the binned trapezoid area differs from the exact one
    by at most the summed box areas. `error_bounds()` returns these bounds:
    pixel ROCAUC  |binned - exact| <= 1/2 * sum_k dFPR_k * dTPR_k,
    PRO           |binned - exact| <= sum_k dFPR_k * dPRO_k / max_fpr  (dFPR clipped to [0, max_fpr]).
    Refining the bins never raises them. Measured on random smooth 32 x 32
    maps with blob masks (tests/unit/reports/test_metrics.py), bins=4096 over the maps'
    range: errors below 5e-5 (ROCAUC) and 2e-4 (PRO), bounds below 1e-3.
    Where each bin holds at most one distinct score the metrics are exact.
    """

    def __init__(self, low: float, high: float, bins: int = 4096, max_fpr: float = 0.3):
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise ValueError(f"score range must be finite with low < high, got low={low}, high={high}")
        if int(bins) != bins or bins < 1:
            raise ValueError(f"bins must be a positive integer, got {bins}")
        if not 0 < max_fpr <= 1:
            raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
        self.low = float(low)
        self.high = float(high)
        self.bins = int(bins)
        self.max_fpr = float(max_fpr)
        self.edges = np.linspace(self.low, self.high, self.bins + 1)
        self.normal_hist = np.zeros(self.bins, dtype=np.int64)
        self.defect_hist = np.zeros(self.bins, dtype=np.int64)
        self.region_hist = np.zeros(self.bins, dtype=np.float64)
        self.regions = 0

    def update(self, anomaly_maps: np.ndarray, masks: np.ndarray) -> None:
        """Add a batch.

        anomaly_maps: (N, H, W) float scores, higher = more anomalous.
        masks: (N, H, W) bool ground truth, True = defect. Regions are the
        8-connected components of each image's mask.
        """
        scores, masks = _checked(anomaly_maps, masks, 3, ("anomaly_maps", "masks"), "both be N x H x W with equal shapes", "defect",
                                 "masks > 0", "pixel")
        # Bin k holds edges[k] <= s < edges[k+1], so "bin >= k" is exactly "s >= edges[k]".
        bin_index = np.clip(np.searchsorted(self.edges, scores, side="right") - 1, 0, self.bins - 1)
        self.normal_hist += np.bincount(bin_index[~masks], minlength=self.bins)
        self.defect_hist += np.bincount(bin_index[masks], minlength=self.bins)
        for image_bins, mask in zip(bin_index, masks):
            self._add_regions(image_bins, mask)

    def _add_regions(self, image_bins: np.ndarray, mask: np.ndarray) -> None:
        """image_bins: (H, W) int bin indices; mask: (H, W) bool."""
        labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        if count == 0:
            return
        sizes = np.bincount(labels.ravel())
        defect_labels = labels[mask]
        self.region_hist += np.bincount(image_bins[mask], weights=1.0 / sizes[defect_labels], minlength=self.bins)
        self.regions += count

    def _check_has_data(self) -> None:
        if self.defect_hist.sum() == 0:
            raise ValueError(
                "PixelMetrics has no defect pixels; pixel ROCAUC and PRO need update() with masks that mark defects"
            )
        if self.normal_hist.sum() == 0:
            raise ValueError(
                "PixelMetrics has no normal pixels; pixel ROCAUC and PRO need update() with masks that leave some pixels normal"
            )

    def _fpr(self) -> np.ndarray:
        return _tail_sums(self.normal_hist) / self.normal_hist.sum()

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """fpr, tpr: (bins + 1,) float64 at thresholds edges[bins], ..., edges[0] (fpr ascending)."""
        self._check_has_data()
        return self._fpr(), _tail_sums(self.defect_hist) / self.defect_hist.sum()

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """fpr, pro: (bins + 1,) float64 at thresholds edges[bins], ..., edges[0] (fpr ascending)."""
        self._check_has_data()
        return self._fpr(), _tail_sums(self.region_hist) / self.regions

    def pixel_rocauc(self) -> float:
        """Area under the pixel ROC curve, in [0, 1]."""
        fpr, tpr = self.roc_curve()
        return _area_up_to(fpr, tpr, 1.0)

    def _limit(self, max_fpr: float | None) -> float:
        if max_fpr is None:
            return self.max_fpr
        if not 0 < max_fpr <= 1:
            raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
        return float(max_fpr)

    def pro(self, max_fpr: float | None = None) -> float:
        """Area under the PRO curve for FPR in [0, max_fpr], divided by max_fpr; in [0, 1].

        max_fpr: the integration limit, default the one given at construction (0.3, MVTec AD);
        any limit reads the same histograms, so PRO to 0.3 and AU-PRO to 0.05 (MVTec AD 2) come from one pass.
        """
        limit = self._limit(max_fpr)
        fpr, pro = self.pro_curve()
        return _area_up_to(fpr, pro, limit) / limit

    def pro_error_bound(self, max_fpr: float | None = None) -> float:
        """Upper bound on |binned - exact| of pro(max_fpr) (see the class docstring)."""
        limit = self._limit(max_fpr)
        fpr, pro = self.pro_curve()
        return float(np.sum(np.diff(np.minimum(fpr, limit)) * np.diff(pro)) / limit)

    def error_bounds(self) -> dict[str, float]:
        """Upper bounds on |binned - exact| for pixel_rocauc and pro at max_fpr (see the class docstring)."""
        fpr, tpr = self.roc_curve()
        roc_bound = 0.5 * np.sum(np.diff(fpr) * np.diff(tpr))
        return {"pixel_rocauc": float(roc_bound), "pro": self.pro_error_bound()}

    def counts_at(self, threshold: float) -> tuple[int, int, int, int]:
        """(TP, FP, FN, TN) pixels of "defect when score >= threshold", for a threshold that is a bin edge.

        Exact (a bin's pixels all lie on one side of an edge); e.g. at f1_optimal_pixel_threshold's threshold.
        """
        k = int(np.searchsorted(self.edges, threshold))
        if k > self.bins or self.edges[k] != threshold:
            raise ValueError(f"threshold {threshold} is not one of the bin edges; pixel counts are exact only there")
        true_pos, false_pos = int(self.defect_hist[k:].sum()), int(self.normal_hist[k:].sum())
        return true_pos, false_pos, int(self.defect_hist.sum()) - true_pos, int(self.normal_hist.sum()) - false_pos

    def to_dict(self) -> dict:
        """JSON-ready summary: metrics, binning settings, error bounds and pixel/region counts."""
        return {
            "pixel_rocauc": self.pixel_rocauc(),
            "pro": self.pro(),
            "max_fpr": self.max_fpr,
            "bins": self.bins,
            "range": [self.low, self.high],
            "error_bounds": self.error_bounds(),
            "counts": {
                "normal_pixels": int(self.normal_hist.sum()),
                "defect_pixels": int(self.defect_hist.sum()),
                "regions": self.regions,
            },
        }


def f1_optimal_image_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of "anomalous when score >= threshold" over the exact sorted scores.

    scores: (N,) float; labels: (N,) bool, True = anomalous.
    """
    fpr, tpr, thresholds = roc_curve_points(scores, labels)
    positives = int(labels.sum())
    true_pos, false_pos = tpr * positives, fpr * (labels.size - positives)
    f1 = 2 * true_pos / (true_pos + false_pos + positives)
    best = int(np.argmax(f1[1:])) + 1  # point 0 is the empty prediction at +inf
    return float(thresholds[best]), float(f1[best])


def f1_optimal_pixel_threshold(metrics: PixelMetrics) -> tuple[float, float]:
    """(threshold, F1) maximising pixel F1 of "anomalous when score >= threshold" over the bin edges.

    Exact at each edge (a bin's pixels all lie on one side of it); needs defect pixels.
    """
    true_pos = np.cumsum(metrics.defect_hist[::-1])[::-1].astype(np.float64)  # [k]: defect pixels with score >= edges[k]
    false_pos = np.cumsum(metrics.normal_hist[::-1])[::-1].astype(np.float64)
    positives = true_pos[0]
    if positives == 0:
        raise ValueError("pixel F1 needs defect pixels; the ground-truth masks mark none")
    f1 = 2 * true_pos / (true_pos + false_pos + positives)
    best = int(np.argmax(f1))
    return float(metrics.edges[best]), float(f1[best])


def _ratio(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else numerator / denominator


@dataclass
class PixelDecisions:
    """Pooled pixel counts of binary decisions (a written mask) against the ground truth, streamed one image at a time.

    Counts are integers summed over every pixel of every image (MVTec AD 2's pooled segmentation F1,
    "SegF1" = 2 TP / (2 TP + FP + FN)); besides them, how many normal images have any flagged pixel.
    Memory is a few integers whatever the number of images.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    normal_images: int = 0
    normal_images_flagged: int = 0

    def update(self, flagged: np.ndarray, truth: np.ndarray, normal_image: bool) -> None:
        """Add one image: flagged and truth are H x W bool (True = defect); normal_image: a good test image."""
        flagged, truth = np.asarray(flagged), np.asarray(truth)
        if flagged.ndim != 2 or flagged.shape != truth.shape or flagged.dtype != bool or truth.dtype != bool:
            raise ValueError(
                f"flagged and truth must be H x W bool arrays of one shape, got {flagged.shape} {flagged.dtype} "
                f"and {truth.shape} {truth.dtype}"
            )
        true_pos = int(np.count_nonzero(flagged & truth))
        flagged_count, defect_count = int(np.count_nonzero(flagged)), int(np.count_nonzero(truth))
        self.tp += true_pos
        self.fp += flagged_count - true_pos
        self.fn += defect_count - true_pos
        self.tn += flagged.size - flagged_count - defect_count + true_pos
        if normal_image:
            self.normal_images += 1
            self.normal_images_flagged += flagged_count > 0

    def to_dict(self) -> dict[str, float | int | None]:
        """seg_f1, tpr, fpr (None where undefined: no defect or no normal pixel), the counts, and the normal images flagged."""
        return {
            "seg_f1": _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn),
            "tpr": _ratio(self.tp, self.tp + self.fn),
            "fpr": _ratio(self.fp, self.fp + self.tn),
            "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn,
            "normal_images_flagged": self.normal_images_flagged,
            "normal_images": self.normal_images,
            "share_normal_images_flagged": _ratio(self.normal_images_flagged, self.normal_images),
        }


def image_decisions(flagged: np.ndarray, labels: np.ndarray) -> dict[str, float | int | None]:
    """Quality of image verdicts: FPR on normal images, TPR on defective ones, precision and F1, and their counts.

    flagged: (N,) bool verdicts (True = anomalous); labels: (N,) bool truth (True = defective).
    A ratio is None where its denominator is 0 (e.g. precision when nothing is flagged).
    """
    flagged, labels = np.asarray(flagged), np.asarray(labels)
    if flagged.ndim != 1 or flagged.shape != labels.shape or flagged.dtype != bool or labels.dtype != bool:
        raise ValueError(
            f"flagged and labels must be 1-D bool arrays of equal length, got {flagged.shape} {flagged.dtype} "
            f"and {labels.shape} {labels.dtype}"
        )
    true_pos, false_pos = int(np.sum(flagged & labels)), int(np.sum(flagged & ~labels))
    defective = int(labels.sum())
    normal = labels.size - defective
    return {
        "fpr": _ratio(false_pos, normal),
        "tpr": _ratio(true_pos, defective),
        "precision": _ratio(true_pos, true_pos + false_pos),
        "f1": _ratio(2 * true_pos, true_pos + false_pos + defective),
        "flagged_normal": false_pos,
        "normal": normal,
        "flagged_defective": true_pos,
        "defective": defective,
    }


@dataclass(frozen=True)
class ThresholdSweep:
    """Every distinct decision "positive when score > threshold" over a set of scored items, exact.

    With M distinct finite scores v_1 > ... > v_M, decision j (j = 0 .. M) flags the items scoring v_j or more (j = 0:
    none). thresholds[j] is the threshold that takes it: v_1 for j = 0, the midpoint of v_j and v_{j+1}, and half the
    last gap below v_M for j = M (nextafter below it when M = 1), so no labelled score sits on a threshold.
    true_pos[j], false_pos[j]: the positive and negative items decision j flags. Items scored -inf are never flagged
    (an image a gated mask leaves empty), and count as positives or negatives all the same.
    """

    thresholds: np.ndarray
    """(M + 1,) float64, descending."""
    true_pos: np.ndarray
    """(M + 1,) int64, ascending from 0."""
    false_pos: np.ndarray
    """(M + 1,) int64, ascending from 0."""
    positives: int
    negatives: int

    @property
    def f1(self) -> np.ndarray:
        """(M + 1,) F1 = 2 TP / (2 TP + FP + FN) of each decision (0 where it is 0 / 0)."""
        denominator = self.true_pos + self.false_pos + self.positives
        return np.divide(2.0 * self.true_pos, denominator, out=np.zeros(self.true_pos.shape), where=denominator > 0)

    @property
    def tpr(self) -> np.ndarray:
        """(M + 1,) share of the positives each decision flags (0 without positives)."""
        return self.true_pos / max(self.positives, 1)

    @property
    def fpr(self) -> np.ndarray:
        """(M + 1,) share of the negatives each decision flags (0 without negatives)."""
        return self.false_pos / max(self.negatives, 1)

    def best_f1(self) -> int:
        """The decision of highest F1; of ties, the one flagging least (the highest threshold)."""
        return int(np.argmax(self.f1))

    def at_recall(self, recall: float) -> int:
        """The decision flagging least whose TPR is at least `recall` (0 < recall <= 1); needs positives."""
        if not 0 < recall <= 1:
            raise ValueError(f"recall must be in (0, 1], got {recall}")
        if self.positives == 0:
            raise ValueError("a recall target needs positive (defective) items; the labels mark none")
        reached = np.flatnonzero(self.true_pos >= recall * self.positives - 1e-9 * self.positives)
        if reached.size == 0:
            raise ValueError(f"no threshold reaches recall {recall}: only {self.true_pos[-1]} of {self.positives} positives "
                             "can be flagged (the others are never flagged)")
        return int(reached[0])


def _between(values: np.ndarray) -> np.ndarray:
    """(M + 1,) float64 thresholds of ThresholdSweep for the distinct values v_1 > ... > v_M, each one representable in
    the values' dtype (a float32 map is compared with a threshold in float32): where no value of that dtype lies
    strictly between v_j and v_{j+1}, the threshold is v_{j+1} itself, which "score > threshold" separates all the same."""
    if values.size == 0:
        return np.zeros(1)
    dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.dtype(np.float64)
    wide = values.astype(np.float64)
    below = wide[-1] - (wide[-2] - wide[-1]) / 2 if values.size > 1 else -np.inf
    lower = np.r_[wide[1:], below].astype(dtype)  # the value under each v_j (v_{M+1}: half a gap under v_M)
    middle = ((wide + lower.astype(np.float64)) / 2).astype(dtype)
    middle = np.where((middle < values) & np.isfinite(middle), middle, lower)
    if not np.isfinite(middle[-1]):  # one distinct value: the next one below it
        middle[-1] = np.nextafter(values[-1], dtype.type(-np.inf))
    return np.r_[wide[0], middle.astype(np.float64)]


def threshold_sweep(scores: np.ndarray, labels: np.ndarray) -> ThresholdSweep:
    """The exact sweep of "positive when score > threshold" over every distinct score (ThresholdSweep).

    scores: (N,) float, higher = more anomalous; -inf for an item never flagged; NaN and +inf are refused.
    labels: (N,) bool, True = positive (defective image, defect pixel).
    Sort-based, O(N log N) time: each class is sorted on its own (no N-long index array), and the count of each
    class above every distinct score found by binary search, so pooled pixel scores of many images fit in memory
    (about 4 bytes per item beyond the inputs when they are float32).
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must be 1-D arrays of equal length, got shapes {scores.shape} and {labels.shape}")
    if labels.dtype != bool:
        raise ValueError(f"labels must be bool (True = positive), got dtype {labels.dtype}; use labels.astype(bool)")
    if np.isnan(scores).any() or np.isposinf(scores).any():
        raise ValueError("scores contain NaN or +infinity; every item needs a finite score (-inf: never flagged)")
    positive, negative = np.sort(scores[labels]), np.sort(scores[~labels])
    values = np.union1d(positive[np.isfinite(positive)], negative[np.isfinite(negative)])[::-1]  # v_1 > ... > v_M

    def flagged(ordered: np.ndarray) -> np.ndarray:  # [j]: items of this class scoring v_j or more (j = 1 .. M)
        return ordered.size - np.searchsorted(ordered, values, side="left")

    return ThresholdSweep(
        thresholds=_between(values),
        true_pos=np.r_[0, flagged(positive)].astype(np.int64),
        false_pos=np.r_[0, flagged(negative)].astype(np.int64),
        positives=int(positive.size),
        negatives=int(negative.size),
    )
