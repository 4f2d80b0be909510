"""DeepCluster++'s choice of representative tiles, made reproducible: per slide, scale the encoder features,
reduce them with PCA, cluster them with k-means, split each cluster into equal-frequency groups by distance
to its centre, and sample a fraction of every group.

Everything here is a function of the features in a canonical row order, the settings and the slide's name:
the caller sorts the rows (by coordinates or tile path) first, so the order of rows, files or slides on
disk never changes the result.
"""
import hashlib
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from core.errors import UserError

N_INIT = 3  # k-means restarts, as DeepCluster++; the best of them by inertia is kept
MAD_TO_SD = 1.4826  # a normal distribution's standard deviation per median absolute deviation
MIN_MSE = 1e-12  # a perfect reconstruction's MSE, 0, is counted as this for its logarithm


@dataclass(frozen=True)
class Settings:
    """The selection settings (Config's select_* keys and seed); recorded with each slide's outputs so that
    a rerun with other settings redoes the slide."""
    pca_dims: int
    clusters: int
    distance_groups: int
    fraction: float
    qc: float
    seed: int

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.select_pca_dims, cfg.select_clusters, cfg.select_distance_groups,
                        cfg.select_fraction, cfg.select_qc, cfg.seed)

    def record(self):
        return asdict(self)


@dataclass
class Selection:
    """One slide's result, one entry per row of the features: cluster and distance group (-1 for a tile
    left out by the quality check), whether it was selected, whether the quality check left it out, its
    robust z-score (NaN without QC values), and its first two principal components (for the picture)."""
    cluster: np.ndarray
    group: np.ndarray
    selected: np.ndarray
    outlier: np.ndarray
    qc_score: np.ndarray
    pca2: np.ndarray
    clusters: int


def slide_seed(seed, name):
    """A 32-bit random state from the seed and the slide's name: the same for a slide wherever it comes in
    the list of slides, and different between slides."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode("utf-8", "backslashreplace")).digest()
    return int.from_bytes(digest[:4], "big")


def robust_z(values):
    """(values - median) / (MAD_TO_SD * median absolute deviation); zeros when the deviation is zero."""
    values = np.asarray(values, dtype=np.float64)
    median = np.median(values)
    scale = MAD_TO_SD * np.median(np.abs(values - median))
    return (values - median) / scale if scale > 0 else np.zeros_like(values)


def qc_score(qc_mse):
    """The quality-check score of each tile: the robust z-score, within the slide, of the logarithm of its
    reconstruction MSE. Both tails are artefacts: far above 0, tiles the autoencoder reconstructs much worse
    than the slide's typical tile (pen, debris); far below, much better than any tissue (out of focus,
    blurred: a blurred tile loses the detail that makes tissue hard to reconstruct)."""
    return robust_z(np.log(np.maximum(np.asarray(qc_mse, dtype=np.float64), MIN_MSE)))


def embed(features, kept, pca_dims):
    """Scaled features, reduced to pca_dims principal components when the slide has more tiles than that
    (with fewer, PCA could only rotate the data, which leaves every k-means distance as it is), fitted on
    the rows in kept and applied to every row; and every row's first two principal components."""
    x = np.asarray(features, dtype=np.float64)
    scaler = StandardScaler().fit(x[kept])
    x = scaler.transform(x)
    dims = min(pca_dims, x.shape[1])
    if len(kept) > dims and dims < x.shape[1]:
        # covariance_eigh: exact and deterministic (no random projection), and fast for many more rows than columns.
        x = PCA(n_components=dims, svd_solver="covariance_eigh").fit(x[kept]).transform(x)
        return x, x[:, :2]
    components = min(2, len(kept), x.shape[1])
    with warnings.catch_warnings():  # one tile, or identical ones, have no variance to divide by: plotted at 0
        warnings.simplefilter("ignore", RuntimeWarning)
        pca2 = PCA(n_components=components, svd_solver="full").fit(x[kept]).transform(x)
    return x, np.pad(pca2, ((0, 0), (0, 2 - components)))


def cluster(x, k, random_state):
    """k-means labels of the rows of x, numbered by the first row of each cluster (so that the numbers do not
    depend on k-means' internal order), and each row's distance to its cluster's centre."""
    with warnings.catch_warnings():
        # Fewer distinct tiles than k (duplicates) is allowed: fewer clusters.
        warnings.simplefilter("ignore", ConvergenceWarning)
        kmeans = KMeans(n_clusters=k, n_init=N_INIT, random_state=random_state).fit(x)
    raw = kmeans.labels_
    distance = np.linalg.norm(x - kmeans.cluster_centers_[raw], axis=1)
    _, first = np.unique(raw, return_index=True)
    order = np.argsort(first, kind="stable")
    renumber = np.empty(raw.max() + 1, dtype=np.int64)
    renumber[np.unique(raw)[order]] = np.arange(len(order))
    return renumber[raw], distance


def distance_groups(labels, distance, groups):
    """Each row's distance group within its cluster: the cluster's rows by increasing distance (ties in row
    order) split into `groups` parts whose sizes differ by at most one, 0 nearest the centre."""
    result = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        ranked = members[np.lexsort((members, distance[members]))]
        for group, part in enumerate(np.array_split(ranked, groups)):
            result[part] = group
    return result


def sample(labels, groups, fraction, rng):
    """Whether each row is selected: fraction of every non-empty (cluster, group) rounded down, at least one,
    drawn without replacement, clusters and groups visited in order."""
    selected = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        for group in np.unique(groups[labels == label]):
            members = np.flatnonzero((labels == label) & (groups == group))
            count = max(1, int(len(members) * fraction))
            selected[rng.choice(members, size=count, replace=False)] = True
    return selected


def select(features, settings, name, qc_mse=None):
    """The Selection of one slide's features (N x D, rows in canonical order); qc_mse: each tile's
    reconstruction MSE, or None. With settings.qc > 0 the tiles whose |qc_score| exceeds it are left out.
    Runs on one thread: several threads add up k-means' and BLAS's partial sums in whatever order they
    finish, which moves results in the last bits and can then move a tile to another cluster."""
    with threadpool_limits(limits=1):
        return _select(features, settings, name, qc_mse)


def _select(features, settings, name, qc_mse):
    n = len(features)
    score = qc_score(qc_mse) if qc_mse is not None else np.full(n, np.nan)
    outlier = np.abs(score) > settings.qc if settings.qc > 0 and qc_mse is not None else np.zeros(n, dtype=bool)
    kept = np.flatnonzero(~outlier)
    if not len(kept):
        raise UserError(f"select_qc = {settings.qc} leaves out every tile of {name}: use a larger threshold (3 or more)")
    state = slide_seed(settings.seed, name)
    x, pca2 = embed(features, kept, settings.pca_dims)
    k = min(settings.clusters or math.ceil(math.sqrt(len(kept))), len(kept))
    labels, distance = cluster(x[kept], k, state)
    groups = distance_groups(labels, distance, settings.distance_groups)
    chosen = sample(labels, groups, settings.fraction, np.random.default_rng(state))
    full = {"cluster": labels, "group": groups, "selected": chosen}
    arrays = {}
    for key, values in full.items():
        arrays[key] = np.full(n, False if key == "selected" else -1, dtype=values.dtype)
        arrays[key][kept] = values
    return Selection(**arrays, outlier=outlier, qc_score=score, pca2=pca2, clusters=int(labels.max()) + 1)
