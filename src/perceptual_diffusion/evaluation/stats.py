"""Paired statistics for two models sampled with the same seeds: a difference, its per-seed values, and a bootstrap CI.

The experiment trains models A and B from the same teacher for each training seed s and samples both with the same
sampling seeds, so sample i of A and sample i of B share seed and label. ``paired_bootstrap`` turns per-sample arrays
(as ``evaluate.evaluate_model(per_sample_path=...)`` writes them) into the mean difference of a statistic over
training seeds and a percentile interval from a hierarchical bootstrap (Davison and Hinkley 1997, on hierarchical
data): training seeds are resampled, and within each drawn seed the sample indices, the same indices for A and B
(pairing cancels the variation that A and B share through the seeds and labels).

Statistics are callables on a mapping of per-sample arrays. The factories here also know how to evaluate themselves
on a resample given only the count of each row (``prepare``), which is what makes 1,000 replicates of FID on 2,000
rows take seconds: the covariance comes from weighted sums and the matrix square root from one symmetric eigenvalue
problem (with fewer rows than features, as 1,000 samples in Inception's 2,048, that of the resample's Gram matrix:
23 ms instead of seconds). Any other callable works too, evaluated on the resampled rows. Pure numpy and torch;
nothing is downloaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

Arrays = Mapping[str, np.ndarray]
Resampled = Callable[[np.ndarray], np.ndarray]  # counts (R, N) of each row in R resamples -> R statistic values
BATCH = 32  # resamples evaluated at once: bounds memory (R x N x D temporaries) while batching the linear algebra
PRODUCTS_BYTES = 256 * 2**20  # FID keeps every row's outer product (lower triangle) when it fits in this much memory


@dataclass(frozen=True)
class PairedDifference:
    """Mean over training seeds of statistic(A) - statistic(B), per-seed differences and a bootstrap interval."""

    estimate: float
    per_seed: tuple[float, ...]
    ci_low: float
    ci_high: float
    signs_agree: bool
    n_seeds: int
    n_boot: int
    level: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``per_seed`` as a list)."""
        d = asdict(self)
        d["per_seed"] = list(self.per_seed)
        return d


class ResampledStatistic:
    """A statistic of per-sample arrays that can also be evaluated from row counts, without copying rows."""

    def prepare(self, arrays: Arrays) -> Resampled:
        """Precompute what does not depend on the resample; returns counts (R, N) -> values (R,)."""
        raise NotImplementedError

    def __call__(self, arrays: Arrays) -> float:
        """The statistic on all rows, each once."""
        n = _rows(arrays)
        return float(self.prepare(arrays)(np.ones((1, n)))[0])


def _rows(arrays: Arrays) -> int:
    """The common number of rows of the arrays (0-d arrays are ignored)."""
    lengths = {np.shape(v)[0] for v in arrays.values() if np.ndim(v) > 0}
    if len(lengths) != 1:
        raise ValueError(f"per-sample arrays must share one length, got lengths {sorted(lengths)}")
    return lengths.pop()


def _f64(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)


def _batched(f: Callable[[np.ndarray], np.ndarray]) -> Resampled:
    """Apply ``f`` to at most ``BATCH`` rows of counts at a time."""
    return lambda counts: np.concatenate([f(counts[i : i + BATCH]) for i in range(0, len(counts), BATCH)])


# ---------------------------------------------------------------------------------------------------------------
# Statistic factories.


class _MeanOf(ResampledStatistic):
    def __init__(self, key: str) -> None:
        self.key = key

    def prepare(self, arrays: Arrays) -> Resampled:
        x = np.asarray(arrays[self.key], dtype=np.float64)
        return lambda w: (w @ x) / w.sum(1)


def mean_of(key: str) -> ResampledStatistic:
    """The mean of one per-sample array, e.g. ``mean_of("exact")`` is exact precision."""
    return _MeanOf(key)


def _psd_sqrt(cov: Tensor) -> Tensor:
    """Symmetric square root of a covariance, negative round-off eigenvalues clipped to 0."""
    vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


class _FIDAgainst(ResampledStatistic):
    def __init__(self, ref_mu: Tensor | np.ndarray, ref_cov: Tensor | np.ndarray) -> None:
        self.mu = torch.from_numpy(_f64(ref_mu))
        cov = torch.from_numpy(_f64(ref_cov))
        self.trace = float(cov.trace())
        # Tr (S1 S2)^(1/2) = Tr (A S1 A)^(1/2) with A = S2^(1/2): S1 S2 and A S1 A are similar, and A S1 A is
        # symmetric, so its eigenvalues come from eigvalsh (faster and steadier than a general sqrtm).
        self.sqrt_ref = _psd_sqrt(cov)

    def prepare(self, arrays: Arrays) -> Resampled:
        f = torch.from_numpy(np.asarray(arrays["features"], dtype=np.float64))
        n, d = f.shape
        centre = f.mean(0)
        fc = f - centre  # centred once: the weighted moments then lose no digits to cancellation
        g = fc @ self.sqrt_ref  # rows in the reference's square-root basis: A S A is their weighted covariance
        norms = (fc**2).sum(1)  # Tr S needs only the rows' squared norms
        # Fewer rows than features (1,000 samples in Inception's 2,048): the resample's covariance has rank below
        # its row count, and the nonzero eigenvalues of A S A = G' W G' / (m - 1) are those of the small matrix
        # W^1/2 G' G'^T W^1/2 / (m - 1) over the rows it holds. The same trace, exactly, at (N/D)^3 of the cost.
        trace_sqrt = self._dual(g) if n < d else self._primal(g)

        def values(counts: np.ndarray) -> np.ndarray:
            w = torch.from_numpy(counts).to(torch.float64)
            m = w.sum(1)
            mean_c = (w @ fc) / m[:, None]
            tr_cov = (w @ norms - m * (mean_c**2).sum(1)) / (m - 1)
            d2 = ((mean_c + centre - self.mu) ** 2).sum(1) + tr_cov + self.trace - 2 * trace_sqrt(w, m, mean_c)
            return d2.clamp(min=0).numpy()  # round-off of a distance that is really 0

        return _batched(values)

    def _primal(self, g: Tensor) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """Tr (A S A)^(1/2) of each resample from its D x D weighted covariance."""
        n, d = g.shape
        rows, cols = torch.tril_indices(d, d)
        # The lower triangle of every row's outer product: each resample's second moment is then one matrix
        # product with the counts, half the work of a full D x D product per resample. Skipped when too large.
        products = g[:, rows] * g[:, cols] if n * len(rows) * 8 <= PRODUCTS_BYTES else None

        def trace_sqrt(w: Tensor, m: Tensor, mean_c: Tensor) -> Tensor:
            mean_g = mean_c @ self.sqrt_ref
            if products is not None:
                second = torch.zeros(len(w), d, d, dtype=torch.float64)
                second[:, rows, cols] = w @ products  # eigvalsh reads the lower triangle only
            else:
                second = (g.T[None] * w[:, None, :]) @ g
            inner = (second - m[:, None, None] * mean_g[:, :, None] * mean_g[:, None, :]) / (m - 1)[:, None, None]
            return torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().sum(1)

        return trace_sqrt

    @staticmethod
    def _dual(g: Tensor) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """Tr (A S A)^(1/2) of each resample from the Gram matrix of the rows it holds (weights w, total m): with
        k = K w / m and c = w.k / m, the weighted-centred Gram matrix is K - k 1' - 1 k' + c."""
        gram = g @ g.T

        def trace_sqrt(w: Tensor, m: Tensor, mean_c: Tensor) -> Tensor:
            out = torch.empty(len(w), dtype=torch.float64)
            for r in range(len(w)):
                keep = torch.nonzero(w[r]).squeeze(1)
                wr = w[r, keep]
                k = gram[keep][:, keep]
                kw = k @ wr / m[r]
                centred = k - kw[:, None] - kw[None, :] + (wr @ kw) / m[r]
                root = wr.sqrt()
                inner = root[:, None] * centred * root[None, :] / (m[r] - 1)
                out[r] = torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().sum()
            return out

        return trace_sqrt


def fid_against(ref_mu: Tensor | np.ndarray, ref_cov: Tensor | np.ndarray) -> ResampledStatistic:
    """FID (Heusel et al. 2017) of the "features" rows against a fixed reference mean and covariance."""
    return _FIDAgainst(ref_mu, ref_cov)


def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    return (x @ y.T / x.shape[1] + 1.0) ** 3  # KID's cubic kernel (Binkowski et al. 2018)


class _KIDAgainst(ResampledStatistic):
    def __init__(self, ref_features: Tensor | np.ndarray, chunk: int = 2048) -> None:
        self.ref = torch.from_numpy(_f64(ref_features))
        self.chunk = chunk
        n = len(self.ref)
        if n < 2:
            raise ValueError("KID needs at least 2 reference rows")
        total = 0.0
        for i in range(0, n, chunk):  # the reference's within-set term, in row chunks: 10,000^2 kernels fit nowhere
            k = _poly_kernel(self.ref[i : i + chunk], self.ref)
            total += float(k.sum() - k.diagonal(offset=i).sum())
        self.within_ref = total / (n * (n - 1))

    def prepare(self, arrays: Arrays) -> Resampled:
        f = torch.from_numpy(np.asarray(arrays["features"], dtype=np.float64))
        gram = _poly_kernel(f, f)  # N x N: 32 MB at 2,000 rows
        diag = gram.diagonal().clone()
        cross = torch.cat([_poly_kernel(f[i : i + self.chunk], self.ref).mean(1) for i in range(0, len(f), self.chunk)])

        def values(counts: np.ndarray) -> np.ndarray:
            w = torch.from_numpy(counts).to(torch.float64)
            m = w.sum(1)
            # Sum over ordered pairs of distinct resample positions: w^T K w - sum_i w_i K_ii (duplicates included,
            # as in any bootstrap of a U-statistic).
            within = (((w @ gram) * w).sum(1) - w @ diag) / (m * (m - 1))
            return (within + self.within_ref - 2 * (w @ cross) / m).numpy()

        return _batched(values)


def kid_against(ref_features: Tensor | np.ndarray) -> ResampledStatistic:
    """Unbiased MMD^2 with KID's cubic kernel of the "features" rows against fixed reference rows, all rows, no
    subsets (``metrics.mmd_unbiased``)."""
    return _KIDAgainst(ref_features)


def _distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return torch.cdist(torch.from_numpy(x), torch.from_numpy(y)).numpy()


class _KNNAgainst(ResampledStatistic):
    """Precision or coverage against real k-NN balls, the radii computed once (as ``prdc`` computes them)."""

    def __init__(self, ref_features: Tensor | np.ndarray, k: int, kind: str, chunk: int = 1024) -> None:
        self.ref, self.kind, self.chunk = _f64(ref_features), kind, chunk
        if len(self.ref) <= k:
            raise ValueError(f"k={k} needs more than {k} reference rows")
        # prdc's radius: the (k+1)-th smallest distance from a real row to all real rows, itself included.
        self.radii = np.concatenate(
            [
                np.partition(_distances(self.ref[i : i + chunk], self.ref), k, axis=1)[:, k]
                for i in range(0, len(self.ref), chunk)
            ]
        )

    def prepare(self, arrays: Arrays) -> Resampled:
        f = np.asarray(arrays["features"], dtype=np.float64)
        if self.kind == "precision":
            # Whether each fake row lies in some real ball: a property of the row alone, so duplicated rows in a
            # resample count as often as they are drawn and nothing else changes.
            inside = np.concatenate(
                [
                    (_distances(f[i : i + self.chunk], self.ref) < self.radii).any(1)
                    for i in range(0, len(f), self.chunk)
                ]
            ).astype(np.float64)
            return lambda w: (w @ inside) / w.sum(1)
        # Coverage: a real ball is covered when some drawn fake row lies in it; keep the (real, fake) pairs that could.
        real_idx, fake_idx = [], []
        for i in range(0, len(self.ref), self.chunk):
            r, c = np.nonzero(_distances(self.ref[i : i + self.chunk], f) < self.radii[i : i + self.chunk, None])
            real_idx.append(r + i)
            fake_idx.append(c)
        real_idx, fake_idx = np.concatenate(real_idx), np.concatenate(fake_idx)
        n_real = len(self.ref)

        def values(w: np.ndarray) -> np.ndarray:
            out = np.empty(len(w))
            for j, wr in enumerate(w):
                covered = np.zeros(n_real, dtype=bool)
                covered[real_idx[wr[fake_idx] > 0]] = True
                out[j] = covered.mean()
            return out

        return values


def precision_against(ref_features: Tensor | np.ndarray, k: int = 3) -> ResampledStatistic:
    """Improved precision (Kynkäänniemi et al. 2019): the fraction of "features" rows inside some real k-NN ball."""
    return _KNNAgainst(ref_features, k, "precision")


def coverage_against(ref_features: Tensor | np.ndarray, k: int = 3) -> ResampledStatistic:
    """Coverage (Naeem et al. 2020): the fraction of real k-NN balls that contain some "features" row."""
    return _KNNAgainst(ref_features, k, "coverage")


# ---------------------------------------------------------------------------------------------------------------
# The paired hierarchical bootstrap.


def _prepared(statistic: Callable[[Arrays], float], arrays: Arrays) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """(indices (R, N), counts (R, N)) -> R values: by counts for a ``ResampledStatistic``, else on copied rows."""
    if isinstance(statistic, ResampledStatistic):
        fast = statistic.prepare(arrays)
        return lambda idx, counts: fast(counts)

    def slow(idx: np.ndarray, counts: np.ndarray) -> np.ndarray:
        return np.array([statistic({k: v[row] if np.ndim(v) else v for k, v in arrays.items()}) for row in idx])

    return slow


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """Row ``r`` of the result counts how often each of the ``n`` samples appears in ``idx[r]``."""
    offsets = (idx + n * np.arange(len(idx))[:, None]).ravel()
    return np.bincount(offsets, minlength=len(idx) * n).reshape(len(idx), n).astype(np.float64)


def resampled_values(statistic: Callable[[Arrays], float], arrays: Arrays, idx: np.ndarray) -> np.ndarray:
    """The statistic on each resample ``arrays[idx[r]]`` (``idx``: (R, N) row indices): by row counts, without
    copying rows, for a ``ResampledStatistic`` (FID's precomputation then runs once, not R times)."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    idx = np.asarray(idx)
    with _one_thread():
        return _prepared(statistic, arrays)(idx, _counts(idx, _rows(arrays)))


def paired_bootstrap(
    a: Sequence[Arrays],
    b: Sequence[Arrays],
    statistic: Callable[[Arrays], float],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Mean over training seeds of statistic(a[s]) - statistic(b[s]), with a paired hierarchical bootstrap interval.

    a[s] and b[s] hold per-sample arrays of training seed s, the same length and row order (sample i of both from
    the same sampling seed). Each replicate draws the training seeds with replacement and, within each drawn seed,
    the sample indices with replacement, the same indices for a and b; its value is the mean over drawn seeds of
    the differences. The interval is the percentile interval at ``level``; deterministic given ``seed``.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same number (>= 1) of training seeds for a and b, got {len(a)} and {len(b)}")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot} and {level}")
    a = [{k: np.asarray(v) for k, v in arrays.items()} for arrays in a]  # an NpzFile re-reads on every access
    b = [{k: np.asarray(v) for k, v in arrays.items()} for arrays in b]
    sizes = []
    for s, (x, y) in enumerate(zip(a, b)):
        n = _rows(x)
        if _rows(y) != n:
            raise ValueError(f"training seed {s}: a has {n} samples, b {_rows(y)}; they must be paired row by row")
        sizes.append(n)
    with _one_thread():
        return _bootstrap(a, b, sizes, statistic, n_boot, level, seed)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread: the bootstrap's many small batched eigvalsh calls ran ~60x slower on two threads of
    a loaded 2-core machine than on one (thread hand-offs cost more than the 128 x 128 problems)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _bootstrap(
    a: list[dict[str, np.ndarray]],
    b: list[dict[str, np.ndarray]],
    sizes: list[int],
    statistic: Callable[[Arrays], float],
    n_boot: int,
    level: float,
    seed: int,
) -> PairedDifference:
    """The body of :func:`paired_bootstrap`, on validated, materialised arrays."""
    rng = np.random.default_rng(seed)
    n_seeds = len(sizes)
    drawn = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # replicate r's training seeds
    diffs = np.empty((n_boot, n_seeds))
    per_seed = []
    for s, n in enumerate(sizes):  # one seed at a time: a prepared statistic can hold hundreds of MB
        fa, fb = _prepared(statistic, a[s]), _prepared(statistic, b[s])
        everything, ones = np.arange(n)[None], np.ones((1, n))
        per_seed.append(float(fa(everything, ones)[0] - fb(everything, ones)[0]))
        where = np.nonzero(drawn == s)
        idx = rng.integers(0, n, size=(len(where[0]), n))  # one index draw per drawn copy, shared by a and b
        if len(idx):
            counts = _counts(idx, n)
            diffs[where] = fa(idx, counts) - fb(idx, counts)
        del fa, fb
    replicates = diffs.mean(1)
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    estimate = float(np.mean(per_seed))
    return PairedDifference(
        estimate=estimate,
        per_seed=tuple(per_seed),
        ci_low=float(low),
        ci_high=float(high),
        signs_agree=all(d > 0 for d in per_seed) or all(d < 0 for d in per_seed),
        n_seeds=n_seeds,
        n_boot=n_boot,
        level=level,
    )


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, and sample std (ddof=1) only with at least 3 values: a "±" of fewer than 3 numbers says little."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("summary of no values")
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size >= 3 else None, "n": int(v.size)}
