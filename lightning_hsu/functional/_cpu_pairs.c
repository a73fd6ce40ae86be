/* The pair-sum kernel's elementwise passes fused into one loop nest per block (CPU, float32).
 *
 * The C statement of `_triton_pairs._pair_block_kernel`: the same inputs, the same formulas, the
 * same outputs (see `_cpu_pairs.py` and `_triton_pairs.py` for the mathematics). Each row of the
 * block is walked twice from the core's first-level cache: the first walk sums the pair terms and
 * rho_i = sum_j C_ij c_ij, the second writes the coefficients over the Gram entries. Single
 * threaded on purpose: the caller runs the pair sums' passes on one thread (`passes_on_one_thread`).
 * Built by `_cpu_pairs.py` with the machine's C compiler; no Python or Torch header is needed.
 */
#include <math.h>
#include <stdint.h>

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

/* Row sums of pair terms (all columns but the self pair, and the leading `width` columns apart) and of the antipodal
 * terms, into out[0..3][b * rows + i]; with `with_grad`, the coefficients over the Gram entries (`_cpu_pairs.py`).
 * `gram` rows are contiguous (column stride 1); `sq`, `row_scale` are [batch, rows] and `col_scale` [batch, m], dense. */
int pair_block_sums_f32(float *gram, int64_t batch, int64_t rows, int64_t m, int64_t stride_gb, int64_t stride_gr,
                        const float *sq, const float *row_scale, const float *col_scale, const float *param,
                        int64_t param_stride, int64_t diag, int64_t width, int kind, int power_case, float power,
                        float two_t, int half, int with_grad, double *out) {
    values_fn walk_values;
    slopes_fn walk_slopes;
    pick_walks(kind, power_case, half, col_scale != 0, &walk_values, &walk_slopes);
    for (int64_t b = 0; b < batch; ++b) {
        kernel_t k = {power, two_t, param[b * param_stride]};
        const float *cols = col_scale ? col_scale + b * m : 0;
        for (int64_t i = 0; i < rows; ++i) {
            float *g = gram + b * stride_gb + i * stride_gr;
            float sq_i = sq[b * rows + i];
            float r_i = row_scale ? row_scale[b * rows + i] : 1.0f;
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
                int64_t lo = cuts[part][0] < 0 ? 0 : cuts[part][0];
                int64_t hi = cuts[part][1] > m ? m : cuts[part][1];
                if (lo >= hi) continue;
                float values, part_rho;
                walk_values(&k, g, cols, r_i, lo, hi, &values, &part_rho);
                pair += values;
                rho += part_rho;
                if (part < 2) tile += values;
            }
            out[b * rows + i] = pair;
            out[batch * rows + b * rows + i] = tile;
            out[2 * batch * rows + b * rows + i] = anti;
            if (!with_grad) continue;
            float row_factor = row_scale ? r_i : 1.0f;
            int64_t before = self < 0 ? 0 : (self < m ? self : m);
            walk_slopes(&k, g, cols, r_i, row_factor, 0, before);
            walk_slopes(&k, g, cols, r_i, row_factor, self + 1 < 0 ? 0 : self + 1, m);
            if (self >= 0 && self < m) { /* C_ii: the antipodal pair's, minus rho_i where the projection is folded */
                float diagonal = row_scale ? (float)((double)self_coeff - rho) * r_i : self_coeff;
                g[self] = cols ? diagonal * cols[self] : diagonal;
            }
        }
    }
    return 0;
}

/* Hard MHS's search for the closest pairs (`separation._closest_pairs_sum`), over one n x n Gram matrix of raw rows
 * (row stride `ld`, column stride 1). */

/* Scales the Gram matrix to cosines in place, (g_ij r_i) r_j, and returns the largest pair cosine: over i != j of
 * c_ij, and in half space of -c_ij and of the antipodal pairs' -c_ii. NaN if any entry is NaN. */
float scale_and_largest_f32(float *gram, int64_t n, int64_t ld, const float *r, int half) {
    float best = -INFINITY;
    int nan_seen = 0;
    for (int64_t i = 0; i < n; ++i) {
        float *g = gram + i * ld;
        float r_i = r[i];
        float high = -INFINITY, low = INFINITY;
        int nans = 0;
#pragma omp simd reduction(max : high) reduction(min : low) reduction(+ : nans)
        for (int64_t j = 0; j < n; ++j) {
            float c = g[j] * r_i * r[j];
            g[j] = c;
            nans += c != c;
            /* the self pair is not a candidate (its -c_ii is, below): left out of both extremes */
            float candidate_high = j == i ? -INFINITY : c;
            float candidate_low = j == i ? INFINITY : c;
            high = candidate_high > high ? candidate_high : high;
            low = candidate_low < low ? candidate_low : low;
        }
        nan_seen |= nans != 0;
        if (high > best) best = high;
        if (half) {
            if (-low > best) best = -low;
            if (-g[i] > best) best = -g[i];
        }
    }
    return nan_seen ? NAN : best;
}

/* The pairs whose cosine reaches `threshold` over the upper triangle of a cosine matrix: (i, j, +1) for c_ij, and in
 * half space (i, j, -1) for -c_ij and (i, i, -1) for the antipodal pair's -c_ii. Writes at most `capacity` of them
 * and returns how many there are. */
int64_t tied_pairs_f32(const float *cos, int64_t n, int64_t ld, float threshold, int half, int64_t *rows,
                       int64_t *cols, float *signs, int64_t capacity) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) {
        const float *c = cos + i * ld;
        float high = -INFINITY, low = INFINITY;
#pragma omp simd reduction(max : high) reduction(min : low)
        for (int64_t j = i + 1; j < n; ++j) { /* a vectorised look first: most rows hold no tie */
            high = c[j] > high ? c[j] : high;
            low = c[j] < low ? c[j] : low;
        }
        int64_t first = high >= threshold || (half && -low >= threshold) ? i + 1 : n;
        for (int64_t j = first; j < n; ++j) {
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
    return count;
}
