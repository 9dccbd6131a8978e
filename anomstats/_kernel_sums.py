"""Chunked, multi-threaded sums of Gaussian kernels in whitened coordinates.

Private helper of :class:`anomstats.GaussianKDE`. Everything here works on *whitened* coordinates
(the kernel covariance is the identity), so the only quantity needed per (query, centre) pair is the
squared Euclidean distance ``r2``. For each query ``p_j`` the module returns the pair
``(log_sum_j, sum_j)`` with

    S_j = sum_i w_i exp(-|p_j - x_i|^2 / 2),   log_sum_j = log S_j,

``sum_j`` being ``S_j`` itself whenever it is a safely normal number (and NaN otherwise).

How it is computed (in blocks whose temporaries stay within a memory budget, so nothing scales with
``n * m``):

* Squared distances. For ``d <= DIRECT_MAX_D`` by direct differences, one coordinate at a time (the
  rounding is relative to the distance itself, which exact-mixture checks in 1-D and 2-D need). For
  larger ``d`` by one matrix product of augmented arrays (BLAS) that yields ``-r2 / 2`` directly; its
  rounding is relative to the squared norms, which is why the caller centres data and queries at the
  weighted mean, and why data spread more than ``PRODUCT_MAX_RADIUS`` bandwidths from that mean take the
  direct route whatever ``d`` (:func:`anomstats._rules.product_route_is_accurate`).
* Plain weighted sums ``sum_i w_i exp(-r2 / 2)`` (matrix-vector products): exact to rounding whenever the
  sum is far above the underflow threshold, the common case.
* Rows whose plain sum is tiny (far queries: hundreds of bandwidths away, or thousands of dimensions) are
  computed by a log-sum-exp with a per-query shift, so ``log S`` stays finite wherever the exact value is.
  Rows that are provably far (triangle inequality against the centres' radius) go there directly. Rows
  whose squared norm overflows the dtype (or is NaN from an overflowed whitening) are beyond every kernel's
  reach: ``log S = -inf``, ``S = 0``, never NaN.
* ``exp`` arguments are clamped at the dtype's floor (``log(tiny) + 1``, see :mod:`anomstats._rules`) when a
  block holds smaller ones: results that underflow make
  ``np.exp`` 10-80 times slower, and the clamped terms are negligible against the floor above.

Leave-one-out sums (:func:`leave_one_out_sums`) use the same blocks with the centres as their own
queries: each centre's own pair is removed from its sum (zeroed after ``exp`` on the plain route, set to
``-inf`` before the shift on the log-sum-exp route, so the shift is the nearest *other* centre), and
optionally the kernel-weighted averages of per-centre values ride along as one small matrix product per
block (the gradients of bandwidth selection need them).

Query blocks are spread over a small thread pool (kept between calls: starting threads costs about as
much as a small evaluation). NumPy releases the GIL in its element-wise loops and in
BLAS calls. During a call BLAS is held to one thread (through ``threadpoolctl`` when it is installed; the
limit is process-wide for the duration of the call), since BLAS threads for these small products cost
more than they bring and would oversubscribe the cores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from scipy import linalg
from scipy.linalg import get_lapack_funcs

from ._budget import DEFAULT_MEMORY_BUDGET as _DEFAULT_BUDGET
from ._validation import check_memory_budget
from ._parallel import resolve_workers, run_chunks, single_threaded_blas
from ._rules import DIRECT_MAX_D, exp_floor, product_route_is_accurate, trusted_sum_floor

#: Default budget, in bytes, for the per-call temporaries that would otherwise scale with ``n * m``.
DEFAULT_MEMORY_BUDGET: int = _DEFAULT_BUDGET



# Block sizes (the memory budget can only make them smaller). Direct-route blocks are big enough that
# each NumPy call runs for tens of microseconds, so that worker threads overlap instead of queueing for
# the GIL between short calls (measured: 1-D calls on 10^4 elements gained nothing from a second thread,
# 16 x 10^4 blocks gained 1.6x); at most this many centres per block row.
_DIRECT_BLOCK_BYTES: int = 1 << 20
_DIRECT_MAX_COLS: int = 16384

# Whitening takes the product with the inverse factor from this many points per dimension on (the inverse
# costs d³/3 flops, the product 2·k·d² against the solve's k·d²).
_WHITEN_PRODUCT_MIN_RATIO: int = 4

# Below this many (query, centre) pairs per worker, extra threads cost more than they save.
_MIN_PAIRS_PER_WORKER: int = 1 << 18

# Product-route blocks: 1 MiB (in the core's L2 with the product's operands).
_PRODUCT_BLOCK_BYTES: int = 1 << 20

# Query rows per block on the product route, at most (centres per block follow from the block size). Tall
# blocks (1024 x 128) beat squarish ones (128 x 1024) by about 10 % with two workers, measured on the
# d = 2 KDE (10^4 x 10^4) whose product has only d + 2 = 4 terms: its output pass, not its flops, is what
# costs, and the narrow centre slice keeps the product's packed operand and the weights in L1.
_PRODUCT_BLOCK_ROWS: int = 1024

# Row blocks per worker, at least, where the queries allow: tall blocks would otherwise leave one worker
# idle at the end (5000 queries in 1024-row blocks are five tasks for two workers).
_TASKS_PER_WORKER: int = 4

# ... but never rows fewer than this for the sake of balance (short blocks cost in per-call overhead).
_MIN_BALANCED_ROWS: int = 128


class WhitenedCentres:
    """Kernel centres in whitened coordinates with their weights, prepared once for many evaluations.

    Parameters
    ----------
    centres : ndarray, shape (n, d)
        Whitened kernel centres (kernel covariance = identity), ideally centred at their weighted mean,
        which keeps the product form accurate. Float32, float64 or long double.
    weights : ndarray, shape (n,)
        Strictly positive weights (drop zero-weight centres before: they contribute nothing).
    values : ndarray, shape (n, q), optional
        Per-centre values whose kernel-weighted averages ``sum_i w_i k_ij v_i / sum_i w_i k_ij`` the sums
        also return (see :func:`leave_one_out_sums`).
    """

    def __init__(self, centres: np.ndarray, weights: np.ndarray, values: np.ndarray | None = None) -> None:
        centres = np.asarray(centres)
        self.dtype = centres.dtype
        self.n, self.d = centres.shape
        # Work with u = z / sqrt(2): then |u_p - u_x|^2 is r2 / 2, saving a scaling pass per block.
        self.scaled = np.ascontiguousarray(centres * self.dtype.type(np.sqrt(0.5)))
        self.weights = np.ascontiguousarray(weights, dtype=self.dtype)
        self.log_weights = np.log(self.weights)
        # What each block's kernel values are multiplied by: on the plain route the weights (a matrix-vector
        # product), or [w, w * v] when values ride along; on the shifted route, where the weights sit in the
        # exponents, [1, v] (and a plain row sum without values).
        self.n_values = 0 if values is None else np.shape(values)[1]
        self.plain_operand = self.weights
        self.shifted_operand = None
        if values is not None:
            values = np.asarray(values, dtype=self.dtype).reshape(self.n, self.n_values)
            self.plain_operand = np.ascontiguousarray(
                np.column_stack([self.weights, self.weights[:, None] * values])
            )
            self.shifted_operand = np.ascontiguousarray(np.column_stack([np.ones(self.n, self.dtype), values]))
        half_sq = np.einsum("ij,ij->i", self.scaled, self.scaled)
        # Radius of the centres in scaled coordinates: |u_p - u_x| >= |u_p| - radius for every centre.
        self.radius = np.sqrt(half_sq.max()) if self.n else self.dtype.type(0)
        # BLAS only handles single/double precision; long double always takes the direct route, and so do data
        # spread too wide for the expanded square's rounding (half_sq is |z|²/2 in bandwidths).
        self.use_products = (
            self.d > DIRECT_MAX_D
            and self.dtype in (np.float32, np.float64)
            and product_route_is_accurate(2.0 * float(self.radius) ** 2)
        )
        if self.use_products:
            # [u_x, 1, -|u_x|^2] . [2 u_p, -|u_p|^2, 1] = -|u_p - u_x|^2 = -r2 / 2.
            plain = np.empty((self.d + 2, self.n), dtype=self.dtype)
            plain[: self.d] = self.scaled.T
            plain[self.d] = 1.0
            plain[self.d + 1] = -half_sq
            self.plain_rhs = plain
            # [u_x, log w - |u_x|^2] . [2 u_p, 1] = log w - r2 / 2 + |u_p|^2 (row constant added back later).
            shifted = np.empty((self.d + 1, self.n), dtype=self.dtype)
            shifted[: self.d] = self.scaled.T
            shifted[self.d] = self.log_weights - half_sq
            self.shifted_rhs = shifted
        else:
            self.scaled_by_dim = np.ascontiguousarray(self.scaled.T)


def whiten(x: np.ndarray, mean: np.ndarray, cho: np.ndarray) -> np.ndarray:
    """``L^{-1} (x - mean)`` for columns of ``x`` (d, k); returned as (k, d), C-contiguous."""
    centred = x - mean[:, None]
    if centred.dtype in (np.float32, np.float64):
        # One BLAS thread: for small d BLAS threads cost far more than the solve (a 2 x 2 solve for 300
        # points took 6 ms with two threads on a busy machine, 0.1 ms with one), and for large d the
        # threads keep spinning after the solve, stealing the cores from the kernel-sum workers that
        # follow (d = 100, m = 2000: the evaluation took 28 ms after a threaded solve, 18.5 ms after one
        # single-threaded solve).
        with single_threaded_blas():
            d, k = centred.shape
            if k >= _WHITEN_PRODUCT_MIN_RATIO * d:
                # Many points: one product with the inverse factor. OpenBLAS's triangular solve runs at under
                # a third of its matrix-product rate for d ~ 100 (2000 points: 1.3 ms to solve, 0.85 ms for
                # the inverse and the product with twice the flops; a 13 ms evaluation). Both have forward
                # errors of order cond(L)·d·eps; scipy's gaussian_kde whitens by a product too (with the
                # Cholesky factor of the precision). The inverse is formed in the wider of the two dtypes, as
                # the solve runs, from the lower triangle of ``cho`` only (trtri leaves the rest of its copy as
                # it was: a factor from cho_factor has junk there). A singular factor falls to the solve.
                common = np.result_type(centred.dtype, cho.dtype)
                inverse, info = get_lapack_funcs("trtri", dtype=common)(np.asarray(cho, dtype=common), lower=1)
                if info == 0:
                    return np.asarray(centred.T @ np.tril(inverse).T, dtype=centred.dtype)
            z = linalg.solve_triangular(cho, centred, lower=True, check_finite=False)
        return np.ascontiguousarray(z.T, dtype=centred.dtype)
    # Long double: LAPACK has no such type; forward substitution, vectorised over the points.
    d = cho.shape[0]
    z = np.empty((centred.shape[1], d), dtype=centred.dtype)
    for k in range(d):
        acc = centred[k] - z[:, :k] @ cho[k, :k] if k else centred[k].copy()
        z[:, k] = acc / cho[k, k]
    return z


def _block_shape(n: int, m: int, itemsize: int, workers: int, memory_budget: int,
                 direct: bool) -> tuple[int, int]:
    """Query rows and centre columns of one block, within the budget and the size target."""
    # Per worker: the block, plus a scratch block for the direct differences.
    budget_elems = memory_budget // (max(1, workers) * (2 if direct else 1) * itemsize)
    target = _DIRECT_BLOCK_BYTES if direct else _PRODUCT_BLOCK_BYTES
    elems = max(1, min(budget_elems, target // itemsize))
    if direct:
        cols = max(1, min(n, _DIRECT_MAX_COLS, elems))
        return _balanced_rows(max(1, min(m, elems // cols)), m, workers), cols
    rows = _balanced_rows(max(1, min(m, _PRODUCT_BLOCK_ROWS, elems)), m, workers)
    cols = max(1, min(n, elems // rows))
    return rows, cols


def _balanced_rows(rows: int, m: int, workers: int) -> int:
    """Rows per block, lowered so that every worker stays busy to the end, even when ``m`` is small."""
    if workers > 1:
        rows = min(rows, max(_MIN_BALANCED_ROWS, -(-m // (_TASKS_PER_WORKER * workers))), -(-m // workers))
    return max(1, rows)


def kernel_sums(
    centres: WhitenedCentres,
    points: np.ndarray,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted Gaussian kernel sums at whitened, finite query points.

    Parameters
    ----------
    centres : WhitenedCentres
        Prepared kernel centres and weights.
    points : ndarray, shape (m, d)
        Whitened query points. A row whose squared norm is not finite (it overflowed, or the whitening of a
        far query overflowed to inf or NaN) gets ``log_sums = -inf`` and ``sums = 0``: every kernel
        underflows there.
    memory_budget : int
        Upper bound in bytes on the block temporaries, all threads together.
    workers : int, optional
        Worker threads; defaults to :func:`anomstats._parallel.resolve_workers` (serial without threadpoolctl).

    Returns
    -------
    log_sums : ndarray, shape (m,)
        ``log sum_i w_i exp(-r2_ij / 2)``, finite wherever the exact value is.
    sums : ndarray, shape (m,)
        The plain sums where they were computed without a shift (accurate to rounding), NaN for the rows
        that needed the shifted recomputation.
    """
    log_sums, sums, _ = _sums(centres, points, memory_budget, workers, leave_one_out=False)
    return log_sums, sums


def leave_one_out_sums(
    centres: WhitenedCentres,
    points: np.ndarray,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Kernel sums at the centres themselves, each without its own term.

    Parameters
    ----------
    centres : WhitenedCentres
        Prepared centres (at least two); with ``values`` (n, q) the averages below are returned too.
    points : ndarray, shape (n, d)
        The centres' whitened coordinates, unscaled (row ``i`` is centre ``i``).
    memory_budget, workers
        As for :func:`kernel_sums`.

    Returns
    -------
    log_sums : ndarray, shape (n,)
        ``log sum_{j != i} w_j exp(-r2_ij / 2)``, finite wherever the exact value is.
    averages : ndarray, shape (n, q), or None
        ``sum_{j != i} w_j k_ij v_j / sum_{j != i} w_j k_ij`` for the centres' values, None without values.

    Examples
    --------
    >>> z = np.array([[0.0], [1.0], [3.0]])
    >>> c = WhitenedCentres(z, np.full(3, 1 / 3), values=z)
    >>> log_sums, averages = leave_one_out_sums(c, z)
    >>> bool(np.isclose(log_sums[0], np.log((np.exp(-0.5) + np.exp(-4.5)) / 3)))
    True
    >>> bool(averages[2, 0] < 1.0 + 1e-12)  # centre 2's neighbours, weighted by their kernel values
    True
    """
    log_sums, _, averages = _sums(centres, points, memory_budget, workers, leave_one_out=True)
    return log_sums, averages


def _sums(
    centres: WhitenedCentres, points: np.ndarray, memory_budget: int, workers: int | None, leave_one_out: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The driver of both public sums: blocks, workers, plain route and shifted fallback."""
    points = np.ascontiguousarray(points, dtype=centres.dtype) * centres.dtype.type(np.sqrt(0.5))
    m = points.shape[0]
    sums = np.empty(m, dtype=centres.dtype)
    log_sums = np.empty(m, dtype=centres.dtype)
    averages = np.empty((m, centres.n_values), dtype=centres.dtype) if centres.n_values else None
    if m == 0:
        return log_sums, sums, averages
    memory_budget = check_memory_budget(memory_budget)
    workers = resolve_workers(workers)
    direct = not centres.use_products
    rows, cols = _block_shape(centres.n, m, centres.dtype.itemsize, workers, memory_budget, direct)
    floor = trusted_sum_floor(centres.dtype)  # weights sum to one
    with np.errstate(over="ignore", invalid="ignore"):
        half_sq = np.einsum("ij,ij->i", points, points)
    # A query whose squared norm overflows (or whose whitening overflowed to inf or NaN) is beyond the
    # dtype's reach from every centre: -|p - x|²/2 < -max/2 + ... underflows every kernel, so its sum is 0 and
    # its log -inf. Computing it would form inf - inf (NaN) in the products and shifts below.
    lost = ~np.isfinite(half_sq)
    if lost.any():
        log_sums[lost] = -np.inf
        sums[lost] = 0.0
        if averages is not None:
            averages[lost] = np.nan
    # Rows that are certainly far from every centre (by the triangle inequality against the centres'
    # radius) would fail the plain-sum floor anyway: send them straight to the shifted route.
    gap = np.sqrt(np.where(lost, 0.0, half_sq)) - centres.radius
    far = (gap > 0) & (gap * gap > -np.log(floor))
    # Every exponent is -r2/2 >= -(|u_p| + radius)^2: rows where that bound stays above the clamp need no
    # check for small exponents. Those that may need it go last, so that only the last few blocks pay the
    # check (with 2 % of the queries far out, scattered rows had put one into nearly every block, and every
    # block paid the clamp, a pass as slow as exp itself). A two-way partition, not a sort by norm: sorting
    # took 5 ms of a 63 ms (n, m, d) = (1000, 64000, 8) evaluation, before the workers start. Each row's sum
    # is independent of its block.
    near = np.flatnonzero(~far & ~lost)
    outer = (np.sqrt(half_sq[near]) + centres.radius) ** 2 > -exp_floor(centres.dtype)
    may_clamp = np.zeros(m, dtype=bool)
    may_clamp[near] = outer
    near = np.concatenate([near[~outer], near[outer]])
    tasks = [(False, chunk) for chunk in _chunks(near, rows)]
    tasks += [(True, chunk) for chunk in _chunks(np.flatnonzero(far & ~lost), rows)]
    if not tasks:
        return log_sums, sums, averages
    # Threads only pay off when each has enough pairs to work through.
    active = max(1, min(workers, len(tasks), (centres.n * m) // _MIN_PAIRS_PER_WORKER))

    def store(index: np.ndarray, logs: np.ndarray, plain, avg) -> None:
        log_sums[index] = logs
        sums[index] = plain
        if averages is not None:
            averages[index] = avg

    def run(worker: int) -> None:
        # Buffers are allocated once per worker: a fresh large allocation costs a page fault per page.
        buffers = _Buffers(rows, min(cols, centres.n), centres.dtype, with_scratch=direct)
        for shifted_only, index in tasks[worker::active]:
            own = index if leave_one_out else None
            block_points = points[index]
            if shifted_only:
                logs, avg = _shifted_log_sums(centres, block_points, cols, buffers, own)
                store(index, logs, np.nan, avg)
                continue
            clamp_rows = np.flatnonzero(may_clamp[index])
            clamp_from = int(clamp_rows[0]) if clamp_rows.size else index.size
            plain, avg = _plain_sums(centres, block_points, cols, buffers, own, clamp_from)
            with np.errstate(divide="ignore"):
                store(index, np.log(plain), plain, avg)
            low = np.flatnonzero(~(plain >= floor))
            if low.size:
                low_own = None if own is None else own[low]
                logs, avg = _shifted_log_sums(centres, block_points[low], cols, buffers, low_own)
                store(index[low], logs, np.nan, avg)

    # BLAS is held to one thread even with one worker: the blocks are small, and BLAS threads started
    # (and spinning) for every small product cost more than they bring.
    run_chunks(run, range(active), active)
    return log_sums, sums, averages


def _chunks(index: np.ndarray, size: int) -> list[np.ndarray]:
    return [index[start : start + size] for start in range(0, index.size, size)]


class _Buffers:
    """Per-worker scratch blocks of ``rows * cols`` elements, reused across row blocks in any shape that fits."""

    def __init__(self, rows: int, cols: int, dtype: np.dtype, with_scratch: bool) -> None:
        self.capacity = rows * cols
        self.block = np.empty(self.capacity, dtype=dtype)
        # Only direct differences need a second block.
        self.scratch = np.empty(self.capacity, dtype=dtype) if with_scratch else self.block

    def cols_for(self, rows: int, cols: int, n: int) -> int:
        """Centres per block for ``rows`` query rows: ``cols``, or more where fewer rows leave room.

        Short row blocks (the few far rows, or a block's rows that need the shifted route) would otherwise
        run as many thin blocks, each paying the fixed cost of its NumPy calls: 91 far rows against 10⁴
        centres took 79 blocks of 91 x 128.
        """
        return max(1, min(n, max(cols, self.capacity // max(rows, 1))))

    def views(self, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        size = rows * cols
        return self.block[:size].reshape(rows, cols), self.scratch[:size].reshape(rows, cols)



def _direct_half_sq(centres: WhitenedCentres, points: np.ndarray, start: int, stop: int,
                    out: np.ndarray, scratch: np.ndarray) -> None:
    """``out[j, i] = |u_p_j - u_x_i|^2`` (i.e. r2 / 2) for centres ``start:stop``, by direct differences."""
    coords = centres.scaled_by_dim
    np.subtract(points[:, 0:1], coords[0, start:stop], out=out)
    np.square(out, out=out)
    for k in range(1, centres.d):
        np.subtract(points[:, k : k + 1], coords[k, start:stop], out=scratch)
        np.square(scratch, out=scratch)
        np.add(out, scratch, out=out)


def _plain_sums(
    centres: WhitenedCentres, points: np.ndarray, cols: int, buffers: _Buffers, own: np.ndarray | None,
    clamp_from: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``sum_i w_i exp(-r2 / 2)`` (and the averages of the values) for a block of query rows.

    ``own`` (leave-one-out) holds each row's own centre, whose term is left out. Rows before
    ``clamp_from`` have no exponent below the clamp (see :func:`_clamped_exp`).
    """
    rows, d = points.shape
    dtype = centres.dtype
    operand = centres.plain_operand
    total = np.zeros((rows,) + operand.shape[1:], dtype=dtype)
    augmented = None
    if centres.use_products:
        augmented = np.empty((rows, d + 2), dtype=dtype)
        np.multiply(points, 2.0, out=augmented[:, :d])
        augmented[:, d] = -np.einsum("ij,ij->i", points, points)
        augmented[:, d + 1] = 1.0
    rhs = centres.plain_rhs if centres.use_products else None
    for start, stop, block in _exponent_blocks(centres, points, cols, buffers, augmented, rhs, _negate):
        _clamped_exp(block, clamp_from)
        _set_own(block, own, start, stop, 0.0)
        total += block @ operand[start:stop]
    if total.ndim == 1:
        return total, None
    return total[:, 0], total[:, 1:] / total[:, :1]


def _set_own(block: np.ndarray, own: np.ndarray | None, start: int, stop: int, value: float) -> None:
    """Set each row's own pair (centre ``own[row]``, if among columns ``start:stop``) to ``value``."""
    if own is None:
        return
    row = np.flatnonzero((own >= start) & (own < stop))
    block[row, own[row] - start] = value


def _negate(centres: WhitenedCentres, block: np.ndarray, start: int, stop: int) -> None:
    np.negative(block, out=block)  # -r2 / 2


def _log_weight_minus(centres: WhitenedCentres, block: np.ndarray, start: int, stop: int) -> None:
    np.subtract(centres.log_weights[start:stop], block, out=block)  # log w - r2 / 2


def _exponent_blocks(
    centres: WhitenedCentres,
    points: np.ndarray,
    cols: int,
    buffers: _Buffers,
    augmented: np.ndarray | None,
    rhs: np.ndarray | None,
    finish_direct: Callable[[WhitenedCentres, np.ndarray, int, int], None],
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(start, stop, block)`` over blocks of centres, ``block`` holding each pair's exponent.

    On the product route one product of the augmented queries with ``rhs`` (columns ``start:stop``) gives
    the exponent; on the direct route the halved squared distances are formed by differences and
    ``finish_direct`` turns them into the same exponent. ``block`` is a per-worker buffer, reused.
    """
    rows = points.shape[0]
    for start in range(0, centres.n, cols):
        stop = min(start + cols, centres.n)
        block, scratch = buffers.views(rows, stop - start)
        if centres.use_products:
            np.matmul(augmented, rhs[:, start:stop], out=block)
        else:
            _direct_half_sq(centres, points, start, stop, block, scratch)
            finish_direct(centres, block, start, stop)
        yield start, stop, block


def _shifted_log_sums(
    centres: WhitenedCentres, points: np.ndarray, cols: int, buffers: _Buffers, own: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``log sum_i w_i exp(-r2 / 2)`` by a log-sum-exp with a running per-query shift (and the averages)."""
    rows, d = points.shape
    dtype = centres.dtype
    cols = buffers.cols_for(rows, cols, centres.n)
    augmented = None
    if centres.use_products:
        augmented = np.empty((rows, d + 1), dtype=dtype)
        np.multiply(points, 2.0, out=augmented[:, :d])
        augmented[:, d] = 1.0
    # Exponents e_ij = log w_i - r2_ij / 2 (+ |u_p|^2 on the product route, removed at the end).
    running_max = np.full(rows, -np.inf, dtype=dtype)
    operand = centres.shifted_operand
    running_sum = np.zeros(rows if operand is None else (rows, operand.shape[1]), dtype=dtype)
    rhs = centres.shifted_rhs if centres.use_products else None
    exponents = _exponent_blocks(centres, points, cols, buffers, augmented, rhs, _log_weight_minus)
    for start, stop, block in exponents:
        # The own pair is removed before the shift is chosen: the shift is the nearest *other* centre.
        _set_own(block, own, start, stop, -np.inf)
        new_max = np.maximum(running_max, block.max(axis=1))
        # A row whose block held only its own pair keeps -inf; shift by 0 there (its terms are all 0).
        shift = np.where(np.isfinite(new_max), new_max, 0.0)
        block -= shift[:, None]
        _clamped_exp(block)
        _set_own(block, own, start, stop, 0.0)
        # Rescale what was accumulated under the previous shift (exp(-inf) = 0 on the first block).
        with np.errstate(invalid="ignore"):
            scale = np.where(np.isfinite(running_max), np.exp(running_max - shift), 0.0)
        if operand is None:
            running_sum *= scale
            running_sum += block.sum(axis=1)
        else:
            running_sum *= scale[:, None]
            running_sum += block @ operand[start:stop]
        running_max = np.where(np.isfinite(new_max), new_max, running_max)
    total = running_sum if operand is None else running_sum[:, 0]
    result = running_max + np.log(total)
    if centres.use_products:
        result -= np.einsum("ij,ij->i", points, points)
    if operand is None:
        return result, None
    return result, running_sum[:, 1:] / running_sum[:, :1]


def _clamped_exp(block: np.ndarray, clamp_from: int = 0) -> None:
    """``exp`` in place, arguments clamped below at :func:`anomstats._rules.exp_floor` when any is smaller.

    Only rows ``clamp_from:`` are checked and clamped: callers pass the first row whose exponents may
    fall below the floor (the rows before it are known not to, to rounding: the product route's
    exponents may sit a few ulps below their bound, harmlessly).

    Results that underflow make ``np.exp`` 10 to 80 times slower (subnormal and zero results leave the
    vector path), and far pairs are common. Clamping adds at most ``e·tiny`` per term relative to
    weights summing to one: far below the trusted-sum floor that sends a row to the shifted route
    (:func:`anomstats._rules.trusted_sum_floor`), and negligible in a shifted sum whose largest term is 1.
    """
    # Checking costs a fast reduction; the clamp itself (np.maximum) is as slow as exp, so only when needed.
    tail = block[clamp_from:]
    if tail.size:
        floor = exp_floor(block.dtype)
        if tail.min() < floor:
            np.maximum(tail, floor, out=tail)
    np.exp(block, out=block)
