/* The pair-sum kernel's elementwise passes fused into one loop nest per block (CPU, float32).
 *
 * The C statement of `_triton_pairs._pair_block_kernel`: the same inputs, the same formulas, the
 * same outputs (see `_cpu_pairs.py` and `_triton_pairs.py` for the mathematics). Each row of the
 * block is walked twice from the core's first-level cache: the first walk sums the pair terms and
 * rho_i = sum_j C_ij c_ij, the second writes the coefficients over the Gram entries. The rows are
 * shared with the threads of Torch's OpenMP team when the caller asks for more than one
 * (`parallel_rows`); each row's results are the same whichever thread walks it.
 * Built by `_cpu_pairs.py` with the machine's C compiler; no Python or Torch header is needed.
 */
#include <math.h>
#include <stdint.h>

#ifdef WITH_LIBMVEC
/* glibc's vector forms of the kernels' functions (libmvec, linked by `_cpu_pairs.py` where it exists), which <math.h>
 * declares only under -ffast-math: with them the walks of the log, power and Gaussian kernels vectorise too. */
#pragma omp declare simd notinbranch
extern float expf(float);
#pragma omp declare simd notinbranch
extern float logf(float);
#pragma omp declare simd notinbranch
extern float powf(float, float);
#endif

/* kernels.MIN_SQUARED_DISTANCE, defined by `_cpu_pairs.py` on the compiler's command line */
#ifndef MIN_SQ
#error "MIN_SQ (the smallest squared distance) must be defined: build with _cpu_pairs.py"
#endif

enum { RIESZ = 0, GAUSSIAN = 1, CLOSEST_PAIRS = 2 };
enum { LOG_POWER = 0, INVERSE_SQUARE = 1, INVERSE = 2, OTHER_POWER = 3 };

/* A kernel's numbers for one batch element; its family, power case and half space are literals of each walk. */
typedef struct {
    float power;
    float two_t;
    float param; /* the Gaussian's shift or the closest pairs' threshold of this batch element */
} kernel_t;

#define INLINE static inline __attribute__((always_inline))

/* f(c) and f'(c): `RieszKernel`, `GaussianKernel`, `ClosestPairsKernel`. Inside the walks `kind` and `power_case`
 * are literals (see WALKS), so each family compiles to its own vectorised loop. */
INLINE void kernel_terms(int kind, int power_case, float power, float two_t, float param, float c, float *value,
                         float *slope) {
    if (kind == RIESZ) {
        float raw = 2.0f - 2.0f * c;
        float sq = raw < MIN_SQ ? MIN_SQ : raw; /* a NaN stays NaN, as clamp_min keeps it */
        float v, s;
        if (power_case == LOG_POWER) {
            v = -logf(sq);
            s = (1.0f / sq) * 2.0f;
        } else if (power_case == INVERSE_SQUARE) {
            v = 1.0f / sq;
            s = v * v * 2.0f;
        } else if (power_case == INVERSE) {
            v = 1.0f / sqrtf(sq);
            s = v / sq * power;
        } else {
            v = powf(sq, -0.5f * power);
            s = v / sq * power;
        }
        *value = v;
        *slope = raw > MIN_SQ ? s : 0.0f; /* no slope where the clamp holds */
    } else if (kind == GAUSSIAN) {
        float v = expf(two_t * (c - 1.0f) - param);
        *value = v;
        *slope = two_t * v;
    } else {
        float closest = c >= param ? 1.0f : 0.0f;
        *value = (1.0f - c) * -2.0f * closest;
        *slope = closest * 2.0f;
    }
}

/* The term of an ordered pair and its coefficient: f(c) + f(-c) and 2 (f'(c) - f'(-c)) in half space. */
INLINE void pair_terms(int kind, int power_case, int half, const kernel_t *k, float c, float *value, float *slope) {
    kernel_terms(kind, power_case, k->power, k->two_t, k->param, c, value, slope);
    if (half) {
        float v, s;
        kernel_terms(kind, power_case, k->power, k->two_t, k->param, -c, &v, &s);
        *value += v;
        *slope = (*slope - s) * 2.0f;
    }
}

/* Sums over columns [lo, hi) of one row: the pair terms, and the slopes times the cosines (for rho).
 * The cosine of entry j is the Gram entry, or (g r_i) r_j for raw rows (`raw`). */
INLINE void walk_values_t(int kind, int power_case, int half, int raw, const kernel_t *k, const float *g,
                          const float *cols, float r_i, int64_t lo, int64_t hi, float *values, float *rho) {
    float value_sum = 0.0f, rho_sum = 0.0f;
#pragma omp simd reduction(+ : value_sum, rho_sum)
    for (int64_t j = lo; j < hi; ++j) {
        float c = raw ? g[j] * r_i * cols[j] : g[j];
        float v, s;
        pair_terms(kind, power_case, half, k, c, &v, &s);
        value_sum += v;
        rho_sum += s * c;
    }
    *values = value_sum;
    *rho = rho_sum;
}

/* Columns [lo, hi) of one row's coefficients, times `row_factor` (and r_j for raw rows), over its Gram entries. */
INLINE void walk_slopes_t(int kind, int power_case, int half, int raw, const kernel_t *k, float *g, const float *cols,
                          float r_i, float row_factor, int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t j = lo; j < hi; ++j) {
        float c = raw ? g[j] * r_i * cols[j] : g[j];
        float v, s;
        pair_terms(kind, power_case, half, k, c, &v, &s);
        s *= row_factor;
        g[j] = raw ? s * cols[j] : s;
    }
}

/* One specialised pair of walks per (kind, power case, half space, raw rows). */
#define WALKS(NAME, KIND, CASE, HALF, RAW)                                                                           \
    static void values_##NAME(const kernel_t *k, const float *g, const float *cols, float r_i, int64_t lo,        \
                              int64_t hi, float *values, float *rho) {                                               \
        walk_values_t(KIND, CASE, HALF, RAW, k, g, cols, r_i, lo, hi, values, rho);                                \
    }                                                                                                                \
    static void slopes_##NAME(const kernel_t *k, float *g, const float *cols, float r_i, float row_factor,         \
                              int64_t lo, int64_t hi) {                                                              \
        walk_slopes_t(KIND, CASE, HALF, RAW, k, g, cols, r_i, row_factor, lo, hi);                                 \
    }
#define WALKS_HALF_RAW(NAME, KIND, CASE)              \
    WALKS(NAME##_f_g, KIND, CASE, 0, 0)               \
    WALKS(NAME##_f_r, KIND, CASE, 0, 1)               \
    WALKS(NAME##_h_g, KIND, CASE, 1, 0)               \
    WALKS(NAME##_h_r, KIND, CASE, 1, 1)
WALKS_HALF_RAW(log, RIESZ, LOG_POWER)
WALKS_HALF_RAW(inverse_square, RIESZ, INVERSE_SQUARE)
WALKS_HALF_RAW(inverse, RIESZ, INVERSE)
WALKS_HALF_RAW(power, RIESZ, OTHER_POWER)
WALKS_HALF_RAW(gaussian, GAUSSIAN, OTHER_POWER)
WALKS_HALF_RAW(closest, CLOSEST_PAIRS, OTHER_POWER)

typedef void (*values_fn)(const kernel_t *, const float *, const float *, float, int64_t, int64_t, float *, float *);
typedef void (*slopes_fn)(const kernel_t *, float *, const float *, float, float, int64_t, int64_t);

#define PICK(NAME)                                                                                  \
    do {                                                                                            \
        *values = half ? (raw ? values_##NAME##_h_r : values_##NAME##_h_g)                         \
                       : (raw ? values_##NAME##_f_r : values_##NAME##_f_g);                        \
        *slopes = half ? (raw ? slopes_##NAME##_h_r : slopes_##NAME##_h_g)                         \
                       : (raw ? slopes_##NAME##_f_r : slopes_##NAME##_f_g);                        \
    } while (0)

static void pick_walks(int kind, int power_case, int half, int raw, values_fn *values, slopes_fn *slopes) {
    if (kind == GAUSSIAN) PICK(gaussian);
    else if (kind == CLOSEST_PAIRS) PICK(closest);
    else if (power_case == LOG_POWER) PICK(log);
    else if (power_case == INVERSE_SQUARE) PICK(inverse_square);
    else if (power_case == INVERSE) PICK(inverse);
    else PICK(power);
}

/* A call's rows shared among the threads of Torch's own OpenMP pool (`parallel_rows`).
 *
 * The library links no OpenMP runtime: `_cpu_pairs.py` hands it the `GOMP_parallel` entry of the runtime that Torch
 * loaded, so the team is the one the products run on (whose idle threads are still spinning after a product, and take
 * the rows at once), not a second pool competing with it for the cores. Rows are claimed a grain at a time from one
 * atomic counter, so a thread that starts late finds the rows taken by the others. */
#include <stdatomic.h>
#include <stdlib.h>

typedef void (*rows_fn)(void *context, int64_t lo, int64_t hi);
typedef void (*team_fn)(void *data);
typedef void (*gomp_parallel_fn)(team_fn fn, void *data, unsigned threads, unsigned flags);
typedef int (*thread_number_fn)(void);

#define GRAIN_ENTRIES 16384 /* entries per claim: tens of microseconds of work */

static gomp_parallel_fn gomp_parallel;
static thread_number_fn thread_number;
static _Atomic int64_t helped; /* rows walked by threads other than the caller, for the tests */

/* Takes the OpenMP runtime's `GOMP_parallel` and `omp_get_thread_num` (both null: every call on the caller's thread). */
void use_openmp_runtime(void *parallel, void *get_thread_num) {
    gomp_parallel = (gomp_parallel_fn)parallel;
    thread_number = (thread_number_fn)get_thread_num;
}

/* How many rows threads other than the caller have walked in this process. */
int64_t rows_walked_by_helpers(void) { return atomic_load(&helped); }

typedef struct {
    rows_fn fn;
    void *context;
    int64_t total, grain;
    _Atomic int64_t next;
} rows_job_t;

static void claim_rows(void *data) {
    rows_job_t *job = (rows_job_t *)data;
    int64_t walked = 0;
    for (;;) {
        int64_t lo = atomic_fetch_add(&job->next, job->grain);
        if (lo >= job->total) break;
        int64_t hi = lo + job->grain < job->total ? lo + job->grain : job->total;
        job->fn(job->context, lo, hi);
        walked += hi - lo;
    }
    if (walked && thread_number() != 0) atomic_fetch_add_explicit(&helped, walked, memory_order_relaxed);
}

/* fn(context, lo, hi) over rows [0, total) of `row_length` entries each, on up to `threads` threads. Rows are
 * independent: which thread walks a row changes nothing in its results. */
static void parallel_rows(rows_fn fn, void *context, int64_t total, int64_t row_length, int threads) {
    int64_t grain = GRAIN_ENTRIES / (row_length > 0 ? row_length : 1);
    if (grain < 1) grain = 1;
    if (threads < 2 || total <= grain || gomp_parallel == 0) {
        fn(context, 0, total);
        return;
    }
    rows_job_t job = {fn, context, total, grain, 0};
    gomp_parallel(claim_rows, &job, (unsigned)threads, 0);
}

/* The arguments of one `pair_block_sums_f32` call, shared by the threads that walk its rows. */
typedef struct {
    float *gram;
    int64_t batch, rows, m, stride_gb, stride_gr;
    const float *sq, *row_scale, *col_scale, *param;
    int64_t param_stride, diag, width;
    int kind, power_case, half, with_grad;
    float power, two_t;
    values_fn walk_values;
    slopes_fn walk_slopes;
    double *out;
} block_t;

/* Rows [lo, hi) of the block, counted over the batch (row q is row q % rows of element q / rows). */
static void block_rows(void *context, int64_t lo, int64_t hi) {
    const block_t *a = (const block_t *)context;
    int kind = a->kind, power_case = a->power_case, half = a->half;
    float power = a->power, two_t = a->two_t;
    int64_t rows = a->rows, m = a->m, batch = a->batch, diag = a->diag, width = a->width;
    for (int64_t q = lo; q < hi; ++q) {
        int64_t b = q / rows, i = q % rows;
        kernel_t k = {power, two_t, a->param[b * a->param_stride]};
        const float *cols = a->col_scale ? a->col_scale + b * m : 0;
        float *g = a->gram + b * a->stride_gb + i * a->stride_gr;
        float sq_i = a->sq[q];
        float r_i = a->row_scale ? a->row_scale[q] : 1.0f;
        float anti = 0.0f, self_coeff = 0.0f;
        if (half) { /* the pair (i, -i): cosine -|w_i|^2 */
            float anti_slope;
            kernel_terms(kind, power_case, power, two_t, k.param, -sq_i, &anti, &anti_slope);
            self_coeff = anti_slope * -2.0f;
        }
        double rho = (double)self_coeff * sq_i; /* the self pair's share of rho_i = sum_j C_ij c_ij */
        double pair = 0.0, tile = 0.0;
        int64_t self = i + diag;
        /* [0, self) and (self, m), each cut at `width` for the tile's sum */
        int64_t cuts[4][2] = {{0, self < width ? self : width},
                              {self + 1 < width ? self + 1 : width, width},
                              {width, self < m ? self : m},
                              {self + 1 > width ? self + 1 : width, m}};
        for (int part = 0; part < 4; ++part) {
            int64_t from = cuts[part][0] < 0 ? 0 : cuts[part][0];
            int64_t to = cuts[part][1] > m ? m : cuts[part][1];
            if (from >= to) continue;
            float values, part_rho;
            a->walk_values(&k, g, cols, r_i, from, to, &values, &part_rho);
            pair += values;
            rho += part_rho;
            if (part < 2) tile += values;
        }
        a->out[q] = pair;
        a->out[batch * rows + q] = tile;
        a->out[2 * batch * rows + q] = anti;
        if (!a->with_grad) continue;
        float row_factor = a->row_scale ? r_i : 1.0f;
        int64_t before = self < 0 ? 0 : (self < m ? self : m);
        a->walk_slopes(&k, g, cols, r_i, row_factor, 0, before);
        a->walk_slopes(&k, g, cols, r_i, row_factor, self + 1 < 0 ? 0 : self + 1, m);
        if (self >= 0 && self < m) { /* C_ii: the antipodal pair's, minus rho_i where the projection is folded */
            float diagonal = a->row_scale ? (float)((double)self_coeff - rho) * r_i : self_coeff;
            g[self] = cols ? diagonal * cols[self] : diagonal;
        }
    }
}

/* Row sums of pair terms (all columns but the self pair, and the leading `width` columns apart) and of the antipodal
 * terms, into out[0..3][b * rows + i]; with `with_grad`, the coefficients over the Gram entries (`_cpu_pairs.py`).
 * `gram` rows are contiguous (column stride 1); `sq`, `row_scale` are [batch, rows] and `col_scale` [batch, m], dense.
 * The rows are shared among up to `threads` threads (`parallel_rows`); each row's results do not depend on it. */
int pair_block_sums_f32(float *gram, int64_t batch, int64_t rows, int64_t m, int64_t stride_gb, int64_t stride_gr,
                        const float *sq, const float *row_scale, const float *col_scale, const float *param,
                        int64_t param_stride, int64_t diag, int64_t width, int kind, int power_case, float power,
                        float two_t, int half, int with_grad, double *out, int threads) {
    block_t a = {gram, batch, rows, m, stride_gb, stride_gr, sq, row_scale, col_scale, param, param_stride, diag,
                 width, kind, power_case, half, with_grad, power, two_t, 0, 0, out};
    pick_walks(kind, power_case, half, col_scale != 0, &a.walk_values, &a.walk_slopes);
    parallel_rows(block_rows, &a, batch * rows, m, threads);
    return 0;
}

/* Hard MHS's search for the closest pairs (`separation._closest_pairs_sum`), over one n x n Gram matrix of raw rows
 * (row stride `ld`, column stride 1). */

/* Rows of `scale_and_largest_f32`: each row's upper triangle scaled in place, its largest and smallest pair cosine
 * and its NaNs. */
typedef struct {
    float *gram;
    int64_t n, ld;
    const float *r;
    float *high, *low;
    int *nans;
} scale_t;

static void scale_rows(void *context, int64_t lo, int64_t hi) {
    const scale_t *a = (const scale_t *)context;
    int64_t n = a->n;
    const float *r = a->r;
    for (int64_t i = lo; i < hi; ++i) {
        float *g = a->gram + i * a->ld;
        float r_i = r[i];
        float self = g[i] * r_i * r_i; /* the self pair is no candidate (its -c_ii is, in half space) */
        g[i] = self;
        float high = -INFINITY, low = INFINITY;
        int nans = self != self;
#pragma omp simd reduction(max : high) reduction(min : low) reduction(+ : nans)
        for (int64_t j = i + 1; j < n; ++j) {
            float c = g[j] * r_i * r[j];
            g[j] = c;
            nans += c != c;
            high = c > high ? c : high;
            low = c < low ? c : low;
        }
        a->high[i] = high;
        a->low[i] = low;
        a->nans[i] = nans;
    }
}

/* Scales the upper triangle (j >= i) of the Gram matrix to cosines in place, (g_ij r_i) r_j, and returns the largest
 * pair cosine: over i < j of c_ij, and in half space of -c_ij and of the antipodal pairs' -c_ii. NaN if any entry is
 * NaN (or out of memory). The entries below the diagonal are neither read nor written. */
float scale_and_largest_f32(float *gram, int64_t n, int64_t ld, const float *r, int half, int threads) {
    float *extremes = (float *)malloc(2 * n * sizeof(float));
    int *nans = (int *)malloc(n * sizeof(int));
    float best = -INFINITY;
    int nan_seen = extremes == 0 || nans == 0;
    if (!nan_seen) {
        scale_t a = {gram, n, ld, r, extremes, extremes + n, nans};
        /* row i has n - i entries: the grain is set by the average row */
        parallel_rows(scale_rows, &a, n, n / 2, threads);
        for (int64_t i = 0; i < n; ++i) {
            nan_seen |= nans[i] != 0;
            if (a.high[i] > best) best = a.high[i];
            if (half) {
                if (-a.low[i] > best) best = -a.low[i];
                if (-gram[i * ld + i] > best) best = -gram[i * ld + i];
            }
        }
    }
    free(extremes);
    free(nans);
    return nan_seen ? NAN : best;
}

/* Rows of `tied_pairs_f32`'s first look: whether row i's upper triangle holds a pair that reaches the threshold. */
typedef struct {
    const float *cos;
    int64_t n, ld;
    float threshold;
    int half;
    unsigned char *candidate;
} tie_rows_t;

static void find_tied_rows(void *context, int64_t lo, int64_t hi) {
    const tie_rows_t *a = (const tie_rows_t *)context;
    for (int64_t i = lo; i < hi; ++i) {
        const float *c = a->cos + i * a->ld;
        float high = -INFINITY, low = INFINITY;
#pragma omp simd reduction(max : high) reduction(min : low)
        for (int64_t j = i + 1; j < a->n; ++j) {
            high = c[j] > high ? c[j] : high;
            low = c[j] < low ? c[j] : low;
        }
        a->candidate[i] = high >= a->threshold || (a->half && -low >= a->threshold);
    }
}

/* The pairs whose cosine reaches `threshold` over the upper triangle of a cosine matrix: (i, j, +1) for c_ij, and in
 * half space (i, j, -1) for -c_ij and (i, i, -1) for the antipodal pair's -c_ii. Writes at most `capacity` of them
 * and returns how many there are (-1 out of memory). A vectorised look first, on `threads` threads: most rows hold no
 * tie; the rows that do are listed in order. */
int64_t tied_pairs_f32(const float *cos, int64_t n, int64_t ld, float threshold, int half, int64_t *rows,
                       int64_t *cols, float *signs, int64_t capacity, int threads) {
    unsigned char *candidate = (unsigned char *)malloc(n > 0 ? n : 1);
    if (candidate == 0) return -1;
    tie_rows_t a = {cos, n, ld, threshold, half, candidate};
    /* row i has n - i - 1 entries: the grain is set by the average row */
    parallel_rows(find_tied_rows, &a, n, n / 2, threads);
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) {
        const float *c = cos + i * ld;
        for (int64_t j = candidate[i] ? i + 1 : n; j < n; ++j) {
            int plus = c[j] >= threshold, minus = half && -c[j] >= threshold;
            if (!(plus | minus)) continue;
            if (plus) {
                if (count < capacity) rows[count] = i, cols[count] = j, signs[count] = 1.0f;
                ++count;
            }
            if (minus) {
                if (count < capacity) rows[count] = i, cols[count] = j, signs[count] = -1.0f;
                ++count;
            }
        }
        if (half && -c[i] >= threshold) {
            if (count < capacity) rows[count] = i, cols[count] = i, signs[count] = -1.0f;
            ++count;
        }
    }
    free(candidate);
    return count;
}

/* The Gram matrices' mirroring (`_matmul.gram`): the lower triangle written from the upper one, a tile at a time.
 *
 * Entries (i, j), j > i, of a block of rows [r0, r1) and columns [c0, c1) of each batch element are copied to (j, i).
 * ATen's copy of a transposed view took 3.5 ns per entry at n = 2048: the rows of a power-of-two matrix lie a
 * multiple of 4 KiB apart, so the destination rows that one source row feeds share a set of the first-level cache
 * and evict each other. Here a MIRROR_TILE x MIRROR_TILE tile is read row by row into a buffer, transposed there,
 * and each destination row's piece copied out at once (64: faster than 16 or 32 on CPU D, 16-32 KiB of buffer).
 * The destination rows are shared among the threads: no two threads write the same entry. */
#define MIRROR_TILE 64

typedef struct {
    char *base;
    int64_t ld, stride_b, r0, r1, c0, c1;
} mirror_t;

#define MIRROR_ROWS(NAME, TYPE)                                                                               \
    static void NAME(void *context, int64_t lo, int64_t hi) {                                                 \
        const mirror_t *a = (const mirror_t *)context;                                                        \
        int64_t span = a->c1 - a->c0, ld = a->ld; /* destination rows per batch element */                   \
        TYPE tile[MIRROR_TILE][MIRROR_TILE];                                                                  \
        for (int64_t q = lo; q < hi;) {                                                                       \
            TYPE *g = (TYPE *)a->base + (q / span) * a->stride_b;                                             \
            int64_t jb = a->c0 + q % span, je = jb + MIRROR_TILE;                                             \
            if (je > a->c1) je = a->c1;                                                                       \
            if (je - jb > hi - q) je = jb + (hi - q);                                                         \
            for (int64_t ib = a->r0; ib < a->r1 && ib < je; ib += MIRROR_TILE) {                              \
                int64_t ie = ib + MIRROR_TILE < a->r1 ? ib + MIRROR_TILE : a->r1;                             \
                for (int64_t i = ib; i < ie; ++i)                                                             \
                    for (int64_t j = jb; j < je; ++j) tile[j - jb][i - ib] = g[i * ld + j];                   \
                for (int64_t j = jb; j < je; ++j) {                                                           \
                    TYPE *dst = g + j * ld;                                                                   \
                    int64_t top = j < ie ? j : ie; /* strictly above the diagonal: i < j */                   \
                    for (int64_t i = ib; i < top; ++i) dst[i] = tile[j - jb][i - ib];                         \
                }                                                                                             \
            }                                                                                                 \
            q += je - jb;                                                                                     \
        }                                                                                                     \
    }

MIRROR_ROWS(mirror_rows_f32, float)
MIRROR_ROWS(mirror_rows_f64, double)

/* Copies the entries (i, j) with r0 <= i < r1, c0 <= j < c1 and j > i of each of `batch` matrices (row stride `ld`,
 * column stride 1, batch stride `stride_b`, elements of `element_size` bytes: 4 or 8) to (j, i), on up to `threads`
 * threads. The entries read lie strictly above the diagonal and those written strictly below: they never overlap.
 * Returns 0, or -1 for another element size. */
int mirror_block(void *base, int64_t element_size, int64_t batch, int64_t ld, int64_t stride_b, int64_t r0, int64_t r1,
                 int64_t c0, int64_t c1, int threads) {
    if (element_size != 4 && element_size != 8) return -1;
    if (r1 <= r0 || c1 <= c0 || batch <= 0) return 0;
    mirror_t a = {(char *)base, ld, stride_b, r0, r1, c0, c1};
    parallel_rows(element_size == 4 ? mirror_rows_f32 : mirror_rows_f64, &a, batch * (c1 - c0), r1 - r0, threads);
    return 0;
}

/* The operating system's ids of the threads of Torch's OpenMP team of `threads` (`_runnable_tasks`: their states are
 * told apart from other tasks'). Each thread of one parallel region writes its own at its number; the team's threads
 * are the pool's, the same for every region of that size from this caller. Returns how many were written: `threads`,
 * or 0 without the runtime (`use_openmp_runtime`) or off Linux. */
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

typedef struct {
    int64_t *ids;
    int64_t threads;
} team_ids_t;

static void note_thread_id(void *data) {
    team_ids_t *a = (team_ids_t *)data;
    int k = thread_number();
#ifdef __linux__
    if (k >= 0 && k < a->threads) a->ids[k] = (int64_t)syscall(SYS_gettid);
#else
    (void)a;
    (void)k;
#endif
}

int64_t team_thread_ids(int64_t *ids, int64_t threads) {
#ifdef __linux__
    if (gomp_parallel == 0 || thread_number == 0 || threads < 1) return 0;
    for (int64_t k = 0; k < threads; ++k) ids[k] = -1;
    team_ids_t a = {ids, threads};
    gomp_parallel(note_thread_id, &a, (unsigned)threads, 0);
    for (int64_t k = 0; k < threads; ++k)
        if (ids[k] < 0) return 0; /* a smaller team than asked: no ids */
    return threads;
#else
    (void)ids;
    (void)threads;
    return 0;
#endif
}
