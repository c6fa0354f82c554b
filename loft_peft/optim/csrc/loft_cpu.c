/* Fused CPU kernels for the LoFT-AdamW step (fp32), built on first use by loft_peft/optim/native.py.
 *
 * Each function computes what a function of loft_peft/optim/kernels.py computes for L same-shape layers (named in its
 * comment), differing only in fp32 rounding; tests/test_fast_path.py checks them against the reference maths.
 * The speed comes from doing a row block's whole computation while it is in the L1/L2 cache: the (k, l) matrices of
 * block 5 exist only as register tiles (4 x 64 with AVX-512), and the cross-term carry (eq. 11) runs row block by row
 * block beside the first-moment update, instead of a dozen passes of separate PyTorch operations over memory.
 * loft_alternating_step (at the end) chains the others into one alternating step, one call from Python.
 *
 * Shapes (per layer, C order): x, exp_avg (k, r); cross (k, R), R = r (r + 1) / 2 in torch.triu_indices order;
 * y (l, r); Gram pseudo-inverses and calibration matrices (r, r). Tensors that may be transposed views (the factors
 * and their gradients) come with explicit strides in elements.
 *
 * Written with GCC vector extensions (GCC or clang, compiled with -march=native), OpenMP over row blocks, no other
 * dependency. A vector is one register: 16 floats with AVX-512 (whose masked moves load_lanes / store_lanes use), 8
 * otherwise (AVX2; masked moves lane by lane); the register tiles are sized to fit. native.py uses the kernels on
 * x86-64 CPUs with AVX2 or AVX-512.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

/* A vector is one register: 16 floats with AVX-512 (32 registers), else 8 (AVX2's 16 registers of 8). A register
 * tile holds TILE_ROWS x TILE_VECS vectors, half the registers: 4 x 4 with AVX-512, 4 x 2 with AVX2 (built with
 * -mno-avx512f on an AVX-512 machine, 4 x 2 ran block 5 as fast as 4 x 3 and faster than 3 x 3, 5 x 2 or 6 x 2). */
#ifdef __AVX512F__
#define VEC 16
#define DEFAULT_TILE_VECS 4
#else
#define VEC 8
#define DEFAULT_TILE_VECS 2
#endif
#ifndef TILE_ROWS
#define TILE_ROWS 4    /* rows of a register tile */
#endif
#ifndef TILE_VECS
#define TILE_VECS DEFAULT_TILE_VECS  /* vectors (of VEC columns) of a register tile */
#endif
#ifndef CHUNK_ROWS
#define CHUNK_ROWS 32  /* rows a thread takes at once */
#endif
#ifndef COLUMN_BLOCK
#define COLUMN_BLOCK 256 /* columns of the (R, l) matrix kept in L2 while a chunk's rows pass over them */
#endif

typedef float vf __attribute__((vector_size(VEC * 4)));
typedef float vf_unaligned __attribute__((vector_size(VEC * 4), aligned(4), may_alias));
typedef int vi __attribute__((vector_size(VEC * 4)));

/* Keeps a loaded vector in a register instead of letting the compiler fold (repeat) the load into each use; x86
 * only (a vector is one register there with AVX-512, and with AVX for the 8-float vectors). */
#if defined(__AVX512F__) || (defined(__AVX__) && (defined(__x86_64__) || defined(__i386__)))
#define KEEP_IN_REGISTER(x) __asm__("" : "+v"(x))
#else
#define KEEP_IN_REGISTER(x) ((void)0)
#endif

static inline vf load(const float *p) { return *(const vf_unaligned *)p; }
static inline void store(float *p, vf x) { *(vf_unaligned *)p = x; }
static inline vf splat(float x) {  /* an initialiser, not a loop: GCC turns only this into one broadcast */
#if VEC == 16
    return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#else
    return (vf){x, x, x, x, x, x, x, x};
#endif
}

static inline float hsum(vf x) {
    float s = 0.0f;
    for (int i = 0; i < VEC; i++) s += x[i];
    return s;
}

/* Lanes of two vectors picked by index (below VEC: a, from VEC on: b); GCC before 12 lacks __builtin_shufflevector. */
#ifdef __clang__
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

/* The VEC sums of VEC vectors at once, (hsum(p[0]), ..., hsum(p[VEC - 1])), by a transposing butterfly of VEC - 1
 * additions: each level adds the two halves of pairs of vectors, so that lane groups come to hold one vector's sum. */
static inline vf hsum_vectors(const vf *p) {
#if VEC == 16
    vf a[8], b[4], c[2];
    for (int k = 0; k < 8; k++)  /* lanes 0-7: p[k], lanes 8-15: p[k + 8] */
        a[k] = SHUFFLE(p[k], p[k + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + SHUFFLE(p[k], p[k + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int k = 0; k < 4; k++)  /* lanes 4g..4g+3: p[k + 4g] */
        b[k] = SHUFFLE(a[k], a[k + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27)
             + SHUFFLE(a[k], a[k + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int k = 0; k < 2; k++)  /* lanes 2g, 2g+1: p[k + 2g] */
        c[k] = SHUFFLE(b[k], b[k + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
             + SHUFFLE(b[k], b[k + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    return SHUFFLE(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
         + SHUFFLE(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
#else
    vf a[4], b[2];
    for (int k = 0; k < 4; k++)  /* lanes 0-3: p[k], lanes 4-7: p[k + 4] */
        a[k] = SHUFFLE(p[k], p[k + 4], 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE(p[k], p[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int k = 0; k < 2; k++)  /* lanes 2g, 2g+1: p[k + 2g] */
        b[k] = SHUFFLE(a[k], a[k + 2], 0, 1, 8, 9, 4, 5, 12, 13) + SHUFFLE(a[k], a[k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    return SHUFFLE(b[0], b[1], 0, 8, 2, 10, 4, 12, 6, 14) + SHUFFLE(b[0], b[1], 1, 9, 3, 11, 5, 13, 7, 15);
#endif
}

static inline vf vsqrt(vf x) {
    vf r;
#pragma GCC unroll 16
    for (int i = 0; i < VEC; i++) r[i] = __builtin_sqrtf(x[i]);
    return r;
}

/* Lanes [lo, hi) of the vector at p, the others zero; and the store of lanes [lo, hi) of x to p, the others left
 * untouched (neither touches memory outside the lanes). AVX-512 masked moves, else lane by lane. */
static inline vf load_lanes(const float *p, int64_t lo, int64_t hi) {
#ifdef __AVX512F__
    return (vf)_mm512_maskz_loadu_ps((__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1)), p);
#else
    vf x = {0};
    for (int64_t e = lo; e < hi; e++) x[e] = p[e];
    return x;
#endif
}

static inline void store_lanes(float *p, vf x, int64_t lo, int64_t hi) {
#ifdef __AVX512F__
    _mm512_mask_storeu_ps(p, (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1)), (__m512)x);
#else
    for (int64_t e = lo; e < hi; e++) p[e] = x[e];
#endif
}

/* torch.lerp(start, end, weight) = start + weight (end - start), from the nearer end as ATen computes it. */
static inline vf lerp_vector(vf start, vf end, float weight) {
    if (fabsf(weight) < 0.5f) return start + splat(weight) * (end - start);
    return end - (end - start) * splat(1.0f - weight);
}

/* max(a, b) that keeps a NaN of either side, as torch.maximum does. */
static inline vf vmax(vf a, vf b) {
    vi pick_a = (a > b) | (a != a);
    return (vf)((pick_a & (vi)a) | (~pick_a & (vi)b));
}

/* max(a, b) that is b where b is NaN (x86's max: the second operand when either is NaN); one instruction on x86.
 * Block 5 uses it where only b's NaN must come through (a NaN in a makes the result NaN anyway). */
static inline vf vmax_keep_nan_of_b(vf a, vf b) {
#if defined(__AVX512F__) && VEC == 16
    return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX__) && VEC == 8
    return (vf)_mm256_max_ps((__m256)a, (__m256)b);
#else
    return vmax(b, a);
#endif
}

static inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* 64-byte aligned scratch (NULL when out of memory; the exported functions then report failure). */
static inline void *scratch_alloc(size_t bytes) { return aligned_alloc(64, (size_t)round_up((int64_t)bytes, 64)); }

/* The register tile every product here is made of: s[i][v] = sum_q rows[i * row_stride + q] matrix[q * ld + v * VEC],
 * i < BR rows, v < JV vectors, q < inner (rows (BR, inner) times the JV * VEC columns of matrix (inner, .)). */
static inline __attribute__((always_inline)) void product_tile(
    const int BR, const int JV, int64_t inner, const float *rows, int64_t row_stride, const float *matrix, int64_t ld,
    vf s[TILE_ROWS][TILE_VECS])
{
#pragma GCC unroll 16
    for (int i = 0; i < BR; i++)
#pragma GCC unroll 16
        for (int v = 0; v < JV; v++) s[i][v] = splat(0.0f);
    for (int64_t q = 0; q < inner; q++) {
        vf c[TILE_VECS];
#pragma GCC unroll 16
        for (int v = 0; v < JV; v++) {
            vf loaded = load(matrix + q * ld + v * VEC);  /* not c[v] itself: that would keep c in memory */
            KEEP_IN_REGISTER(loaded);
            c[v] = loaded;
        }
#pragma GCC unroll 16
        for (int i = 0; i < BR; i++) {
            const vf w = splat(rows[i * row_stride + q]);
#pragma GCC unroll 16
            for (int v = 0; v < JV; v++) s[i][v] += w * c[v];
        }
    }
}

/* out[i, :width] = rows[i, :] matrix for BR rows, in register tiles (width a multiple of VEC; out rows out_stride). */
static inline __attribute__((always_inline)) void rows_times_matrix(
    const int BR, int64_t inner, int64_t width, const float *rows, int64_t row_stride, const float *matrix,
    int64_t ld, float *out, int64_t out_stride)
{
    vf s[TILE_ROWS][TILE_VECS];
    int64_t j = 0;
    for (; j + TILE_VECS * VEC <= width; j += TILE_VECS * VEC) {
        product_tile(BR, TILE_VECS, inner, rows, row_stride, matrix + j, ld, s);
#pragma GCC unroll 16
        for (int i = 0; i < BR; i++)
#pragma GCC unroll 16
            for (int v = 0; v < TILE_VECS; v++) store(out + i * out_stride + j + v * VEC, s[i][v]);
    }
    for (; j < width; j += VEC) {
        product_tile(BR, 1, inner, rows, row_stride, matrix + j, ld, s);
#pragma GCC unroll 16
        for (int i = 0; i < BR; i++) store(out + i * out_stride + j, s[i][0]);
    }
}

/* ------------------------------------------------------------------------------------------------------------------
 * Block 5: kernels.projected_adam_update.
 *
 * For rows i of x: new_x[i] = decay x[i] + sum_j D[i, j] projector[:, j], with
 *   first  = m[i] . first_cols[:, j]         (a m~, first_cols = a y^T)
 *   second = p[i] . second_cols[:, j]        (v~, second_cols = the packed Khatri-Rao product, eq. 12)
 *   D      = first / (sqrt(max(second, first^2 or 0)) + eps)
 *   projector = scale (y^T y)^+ y^T          (scale = -lr sqrt(bc2) / (a bc1), see kernels.projected_adam_update)
 * ------------------------------------------------------------------------------------------------------------------ */

/* One register tile: BR rows from row pointer m / p, JV vectors of columns from column j. Adds the tile's share of
 * sum_j D[i, j] projector[b, j] to the vector partial sums partial[i * rank + b]. */
static inline __attribute__((always_inline)) void adam_tile(
    const int BR, const int JV, int64_t j, int64_t rank, int64_t packed, int64_t ld,
    const float *m, const float *p, const float *first_cols, const float *second_cols, const float *projector,
    vf *partial, float eps, int floored)
{
    vf f[TILE_ROWS][TILE_VECS], s[TILE_ROWS][TILE_VECS];
    product_tile(BR, JV, rank, m, rank, first_cols + j, ld, f);       /* a m~ (kept in L1 while v~ is formed) */
    product_tile(BR, JV, packed, p, packed, second_cols + j, ld, s);  /* v~ */
    const vf zero = splat(0.0f), veps = splat(eps);
#pragma GCC unroll 16
    for (int i = 0; i < BR; i++)
#pragma GCC unroll 16
        for (int v = 0; v < JV; v++) {
            /* a NaN in v~ (s) comes through; one in f makes D NaN anyway */
            vf bound = vmax_keep_nan_of_b(floored ? f[i][v] * f[i][v] : zero, s[i][v]);
            s[i][v] = f[i][v] / (vsqrt(bound) + veps);
        }
    for (int64_t b = 0; b < rank; b++) {
        const float *row = projector + b * ld + j;
        vf c[TILE_VECS];
#pragma GCC unroll 16
        for (int v = 0; v < JV; v++) c[v] = load(row + v * VEC);
#pragma GCC unroll 16
        for (int i = 0; i < BR; i++) {
            vf t = partial[i * rank + b];
#pragma GCC unroll 16
            for (int v = 0; v < JV; v++) t += s[i][v] * c[v];
            partial[i * rank + b] = t;
        }
    }
}

static inline __attribute__((always_inline)) void adam_rows(
    const int BR, int64_t j0, int64_t j1, int64_t rank, int64_t packed, int64_t ld,
    const float *m, const float *p, const float *first_cols, const float *second_cols, const float *projector,
    vf *partial, float eps, int floored)
{
    int64_t j = j0;
    for (; j + TILE_VECS * VEC <= j1; j += TILE_VECS * VEC)
        adam_tile(BR, TILE_VECS, j, rank, packed, ld, m, p, first_cols, second_cols, projector, partial, eps,
                  floored);
    for (; j < j1; j += VEC)
        adam_tile(BR, 1, j, rank, packed, ld, m, p, first_cols, second_cols, projector, partial, eps, floored);
}

/* Columns [j0, j1) (whole vectors) of the three matrices of one layer, from y (strided) and (y^T y)^+: first_cols
 * (r, ld), second_cols (R, ld), projector (r, ld). Columns [l, j1) are zero, so they add nothing (there
 * first = second = 0 and D = 0). y^T is copied in row by row (contiguous writes), then the rest is formed a vector of
 * columns at a time while that vector of y^T is in L1. */
static void build_columns(
    int64_t j0, int64_t j1, int64_t length, int64_t rank, int64_t ld, const float *y, int64_t y_row,
    int64_t y_col, const float *pinv, float first_scale, float projector_scale, float *first_cols,
    float *second_cols, float *projector)
{
    for (int64_t a = 0; a < rank; a++) {
        float *row = first_cols + a * ld;
        for (int64_t j = j0; j < j1; j++) row[j] = j < length ? y[j * y_row + a * y_col] : 0.0f;  /* y^T for now */
    }
    for (int64_t j = j0; j < j1; j += VEC) {
        int64_t q = 0;
        for (int64_t s = 0; s < rank; s++) {  /* (s, t) rows: y_s y_t, twice off the diagonal (exact doubling) */
            const vf ys = load(first_cols + s * ld + j), twice = ys + ys;
            store(second_cols + q++ * ld + j, ys * ys);
            for (int64_t t = s + 1; t < rank; t++, q++)
                store(second_cols + q * ld + j, load(first_cols + t * ld + j) * twice);
        }
        for (int64_t b = 0; b < rank; b++) {
            vf sum = splat(0.0f);
            for (int64_t a = 0; a < rank; a++) sum += splat(pinv[b * rank + a]) * load(first_cols + a * ld + j);
            store(projector + b * ld + j, sum * splat(projector_scale));
        }
        for (int64_t a = 0; a < rank; a++)
            store(first_cols + a * ld + j, load(first_cols + a * ld + j) * splat(first_scale));
    }
}

/* Leading dimension of the (., l) column matrices: l rounded up to whole vectors, plus one vector so that their
 * rows do not all fall into the same L1 cache sets when l is a multiple of a large power of two. */
static inline int64_t column_stride(int64_t length) { return round_up(length, VEC) + VEC; }

int64_t loft_projected_adam_scratch(int64_t layers, int64_t length, int64_t rank) {
    return layers * (2 * rank + rank * (rank + 1) / 2) * column_stride(length);
}

/* rank <= 256. scratch: loft_projected_adam_scratch(...) floats. out: L pointers, layer l's new factor (rows, rank)
 * at out[l] with strides out_row, out_col (it may be x itself: each element of x is read before it is written).
 * Returns 0, or 1 when a thread's buffer could not be allocated (out is then incomplete). */
int loft_projected_adam(
    int threads, int64_t layers, int64_t rows, int64_t length, int64_t rank,
    const float *x, int64_t x_layer, int64_t x_row, int64_t x_col,
    const float *exp_avg, const float *cross,
    const float *y, int64_t y_layer, int64_t y_row, int64_t y_col,
    const float *pinv, float decay, float first_scale, float projector_scale, float eps, int floored,
    float *scratch, float *const *out, int64_t out_row, int64_t out_col)
{
    const int64_t packed = rank * (rank + 1) / 2, padded = round_up(length, VEC), ld = column_stride(length);
    const int64_t per_layer = (2 * rank + packed) * ld;
    const int64_t chunks = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
    const int64_t column_chunks = (padded + 255) / 256;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
#pragma omp for schedule(static)
        for (int64_t task = 0; task < layers * column_chunks; task++) {
            const int64_t layer = task / column_chunks, j0 = (task % column_chunks) * 256;
            float *base = scratch + layer * per_layer;
            build_columns(j0, min64(j0 + 256, padded), length, rank, ld, y + layer * y_layer, y_row, y_col,
                          pinv + layer * rank * rank, first_scale, projector_scale, base, base + rank * ld,
                          base + (rank + packed) * ld);
        }
        vf *partial = scratch_alloc((size_t)CHUNK_ROWS * rank * sizeof(vf));
        failed |= partial == NULL;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < layers * chunks; task++) {
            if (partial == NULL) continue;
            const int64_t layer = task / chunks, start = (task % chunks) * CHUNK_ROWS;
            const int64_t stop = min64(start + CHUNK_ROWS, rows);
            const float *m = exp_avg + layer * rows * rank;
            const float *p = cross + layer * rows * packed;
            const float *first_cols = scratch + layer * per_layer;
            const float *second_cols = first_cols + rank * ld;
            const float *projector = second_cols + packed * ld;
            for (int64_t e = 0; e < (stop - start) * rank; e++) partial[e] = splat(0.0f);
            for (int64_t j0 = 0; j0 < padded; j0 += COLUMN_BLOCK) {
                const int64_t j1 = min64(j0 + COLUMN_BLOCK, padded);
                int64_t i = start;
                for (; i + TILE_ROWS <= stop; i += TILE_ROWS)
                    adam_rows(TILE_ROWS, j0, j1, rank, packed, ld, m + i * rank, p + i * packed, first_cols,
                              second_cols, projector, partial + (i - start) * rank, eps, floored);
                for (; i < stop; i++)
                    adam_rows(1, j0, j1, rank, packed, ld, m + i * rank, p + i * packed, first_cols, second_cols,
                              projector, partial + (i - start) * rank, eps, floored);
            }
            const float *x_layer_ptr = x + layer * x_layer;
            float *o = out[layer];
            for (int64_t i = start; i < stop; i++) {
                const vf *sums = partial + (i - start) * rank;
                int64_t b = 0;
                for (; b + VEC <= rank; b += VEC) {
                    const vf sum = hsum_vectors(sums + b);
                    for (int64_t e = 0; e < VEC; e++)
                        o[i * out_row + (b + e) * out_col] = decay * x_layer_ptr[i * x_row + (b + e) * x_col] + sum[e];
                }
                for (; b < rank; b++)
                    o[i * out_row + b * out_col] = decay * x_layer_ptr[i * x_row + b * x_col] + hsum(sums[b]);
            }
        }
        free(partial);
    }
    return failed;
}

/* ------------------------------------------------------------------------------------------------------------------
 * Blocks 2-4 for one side: the scaled gradient (eq. 5), the calibrated first moment (eq. 7) and second-moment state,
 * in place. kernels/adamw: torch.bmm(grad, other_pinv), the lerp of the first moment, kernels.update_cross_terms_
 * ("full") or Adam's elementwise second moment of the scaled gradient ("simple").
 *
 *   g~ = g (y^T y)^+
 *   m  <- lerp(g~, m C, beta1)                          (C = I when calibration is NULL; m <- g~ when beta1 = 0)
 *   full:   p <- lerp(g~ . g~, p T(C), beta2)           (T(C) = kernels.packed_congruence(C), T = I without C)
 *   simple: v <- beta2 v + (1 - beta2) g~^2
 * ------------------------------------------------------------------------------------------------------------------ */

/* Row (s, t) (the index-th in packed order) of T(C)[(s,t), (a,b)] = C[s,a] C[t,b] + [s < t] C[t,a] C[s,b], `padded`
 * floats (zero beyond R). */
static void congruence_row(int64_t rank, int64_t padded, int64_t index, const float *c, float *out) {
    int64_t s = 0;
    while (index >= rank - s) index -= rank - s++;
    const int64_t t = s + index;
    const float *cs = c + s * rank, *ct = c + t * rank;
    int64_t col = 0;
    for (int64_t a = 0; a < rank; col += rank - a, a++) {
        const float csa = cs[a], cta = ct[a];
        if (s < t)
            for (int64_t b = a; b < rank; b++) out[col + b - a] = csa * ct[b] + cta * cs[b];
        else
            for (int64_t b = a; b < rank; b++) out[col + b - a] = csa * ct[b];
    }
    for (; col < padded; col++) out[col] = 0.0f;
}

/* torch.lerp(start, end, weight) = start + weight (end - start) on n floats into out, computed from the nearer end as
 * ATen does; the branch is outside the loops so that both vectorise. out may be end. */
static inline void lerp_into(int64_t n, const float *start, const float *end, float weight, float *out) {
    if (fabsf(weight) < 0.5f) {
        for (int64_t e = 0; e < n; e++) out[e] = start[e] + weight * (end[e] - start[e]);
    } else {
        const float complement = 1.0f - weight;
        for (int64_t e = 0; e < n; e++) out[e] = end[e] - (end[e] - start[e]) * complement;
    }
}

/* Whether the cross terms are carried row by row as C^T P C (2 r^3 multiply-adds per row) instead of by the packed
 * R x R matrix T(C) (R^2 per row, register tiles over 4 rows). The T(C) GEMM runs closer to the FMA peak, but
 * measured on 1024 rows the matrices win at r = 16, where a row's work fits in registers (2.3x, see
 * carry_row_in_registers), and from r = 24 on (2x at r = 32, 8x at r = 64, where T(C) no longer fits in cache). */
static inline int carry_as_matrices(int64_t rank) { return rank == VEC || rank >= 24; }  /* VEC: one vector a row */

/* For r = VEC (16 with AVX-512: one vector per row of C), the whole update of a row's cross terms in registers:
 * p <- lerp(g~ g~^T, C^T P C, beta2), packed, in place. L = P C is built from the packed entries directly (entry
 * (s, t) adds p_st C[t] to L[s] and, off the diagonal, p_st C[s] to L[t]); row s of C^T L, lerped with g~_s g~,
 * then has lanes t >= s stored at p + q_s - s (q_s: the packed start of row s). c: C (VEC, VEC); g: the scaled
 * gradient's row. */
static void carry_row_in_registers(float *p, const float *c, vf g, float beta2) {
    vf l[VEC];
#pragma GCC unroll 16
    for (int a = 0; a < VEC; a++) l[a] = splat(0.0f);
#pragma GCC unroll 16
    for (int s = 0, q = 0; s < VEC; s++) {
        const vf cs = load(c + s * VEC);
#pragma GCC unroll 16
        for (int t = s; t < VEC; t++, q++) {
            const vf w = splat(p[q]);
            l[s] += w * load(c + t * VEC);
            if (t > s) l[t] += w * cs;
        }
    }
#pragma GCC unroll 16
    for (int s = 0; s < VEC; s++) {
        vf row = splat(0.0f);
#pragma GCC unroll 16
        for (int a = 0; a < VEC; a++) row += splat(c[a * VEC + s]) * l[a];
        store_lanes(p + s * VEC - s * (s - 1) / 2 - s, lerp_vector(splat(g[s]) * g, row, beta2), s, VEC);
    }
}

/* One row's carried cross terms, packed: C^T P C with P the symmetric (r, r) matrix of the packed row p. The work
 * matrices are (r, rv) with rv = r rounded up to whole vectors; `unpack` maps (a, b) to P's packed position. */
static void congruence_matrices(int64_t rank, int64_t rv, const float *p, const float *c, const int32_t *unpack,
                                float *full, float *left, float *out) {
    const int64_t nv = rv / VEC;
    for (int64_t e = 0; e < rank * rank; e++) full[e] = p[unpack[e]];
    for (int64_t a = 0; a < rank; a++) {  /* left = P C, rows of rv floats */
        for (int64_t v = 0; v < nv; v++) {
            vf acc = splat(0.0f);
            for (int64_t k = 0; k < rank; k++) acc += splat(full[a * rank + k]) * load(c + k * rv + v * VEC);
            store(left + a * rv + v * VEC, acc);
        }
    }
    int64_t q = 0;
    for (int64_t s = 0; s < rank; s++) {  /* (C^T left)[s, t] for t >= s */
        float row[256 + VEC] __attribute__((aligned(64)));
        for (int64_t v = s / VEC; v < nv; v++) {  /* vectors holding columns t >= s */
            vf acc = splat(0.0f);
            for (int64_t a = 0; a < rank; a++) acc += splat(c[a * rv + s]) * load(left + a * rv + v * VEC);
            store(row + v * VEC, acc);
        }
        for (int64_t t = s; t < rank; t++) out[q++] = row[t];
    }
}

static void pad_rows(int64_t rank, int64_t rv, const float *matrix, float *padded_matrix) {
    for (int64_t a = 0; a < rank; a++)
        for (int64_t b = 0; b < rv; b++) padded_matrix[a * rv + b] = b < rank ? matrix[a * rank + b] : 0.0f;
}

int64_t loft_update_moments_scratch(int64_t layers, int64_t rank) {
    const int64_t packed = rank * (rank + 1) / 2;
    if (carry_as_matrices(rank)) return layers * rank * round_up(rank, VEC);  /* C with rows padded */
    return layers * packed * round_up(packed, VEC);
}

/* rank <= 256. full: second = cross (L, rows, R), else exp_avg_sq (L, rows, r); both C order, as exp_avg.
 * calibration (L, r, r) or NULL. scratch: loft_update_moments_scratch(...) floats (used when full and calibrated).
 * LoFT-simple's step of the factor x (strided) from the new moments, when out is not NULL
 * (kernels.simple_adam_update): out = decay x + step_scale m / (sqrt(v) + step_eps), layer l's (rows, r) at out[l]
 * with strides out_row, out_col (it may be x itself: each element of x is read before it is written).
 * Returns 0, or 1 when a buffer could not be allocated (before anything is written, or with some rows updated). */
int loft_update_moments(
    int threads, int64_t layers, int64_t rows, int64_t rank,
    const float *grad, int64_t g_layer, int64_t g_row, int64_t g_col,
    const float *other_pinv, const float *calibration, float beta1, float beta2, int full,
    float *exp_avg, float *second, float *scratch,
    const float *x, int64_t x_layer, int64_t x_row, int64_t x_col, float decay, float step_scale, float step_eps,
    float *const *out, int64_t out_row, int64_t out_col)
{
    const int64_t packed = rank * (rank + 1) / 2, padded = round_up(packed, VEC);
    const int64_t chunks = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
    const int carry = full && calibration != NULL, matrices = carry_as_matrices(rank);
    const int64_t rv = round_up(rank, VEC);
    int32_t *unpack = NULL;
    if (carry && matrices && rank != VEC) {
        unpack = malloc(rank * rank * sizeof(int32_t));
        if (unpack == NULL) return 1;
        for (int64_t a = 0; a < rank; a++)
            for (int64_t b = 0; b < rank; b++) {
                const int64_t s = a < b ? a : b, t = a < b ? b : a;
                unpack[a * rank + b] = (int32_t)(s * rank - s * (s - 1) / 2 + (t - s));
            }
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        if (carry && matrices) {
#pragma omp for schedule(static)
            for (int64_t layer = 0; layer < layers; layer++)
                pad_rows(rank, rv, calibration + layer * rank * rank, scratch + layer * rank * rv);
        } else if (carry) {
#pragma omp for schedule(static)
            for (int64_t task = 0; task < layers * packed; task++) {  /* one row of T(C) */
                const int64_t layer = task / packed;
                congruence_row(rank, padded, task % packed, calibration + layer * rank * rank,
                               scratch + task * padded);
            }
        }
        float *carried = scratch_alloc((size_t)TILE_ROWS * padded * sizeof(float));
        float *work = scratch_alloc((size_t)(rank * rank + rank * rv) * sizeof(float));
        float *matrices_padded = scratch_alloc((size_t)2 * rank * rv * sizeof(float));  /* (y^T y)^+, C */
        float *outer = scratch_alloc((size_t)(padded + VEC) * sizeof(float));  /* one row's packed g~ g~^T */
        const int missing = carried == NULL || work == NULL || matrices_padded == NULL || outer == NULL;
        failed |= missing;
        /* rows of rv floats; scaled has one more vector, zero, read by the packed products of its last row */
        float grads[TILE_ROWS * 256];
        float scaled[TILE_ROWS * 256 + VEC] __attribute__((aligned(64))) = {0};
        float moments[TILE_ROWS * 256] __attribute__((aligned(64)));
        int64_t padded_layer = -1;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < layers * chunks; task++) {
            const int64_t layer = task / chunks, start = (task % chunks) * CHUNK_ROWS;
            const int64_t stop = min64(start + CHUNK_ROWS, rows);
            if (missing) continue;
            const float *g = grad + layer * g_layer, *pinv = other_pinv + layer * rank * rank;
            const float *c = calibration ? calibration + layer * rank * rank : NULL;
            const float *congruence = scratch + layer * (matrices ? rank * rv : packed * padded);
            float *m = exp_avg + layer * rows * rank;
            float *sec = second + layer * rows * (full ? packed : rank);
            float *pinv_padded = matrices_padded, *c_padded = matrices_padded + rank * rv;
            if (padded_layer != layer) {
                pad_rows(rank, rv, pinv, pinv_padded);
                if (c != NULL) pad_rows(rank, rv, c, c_padded);
                padded_layer = layer;
            }
            for (int64_t i0 = start; i0 < stop; i0 += TILE_ROWS) {
                const int64_t br = min64(TILE_ROWS, stop - i0);
                for (int64_t i = 0; i < br; i++)
                    for (int64_t a = 0; a < rank; a++) grads[i * rank + a] = g[(i0 + i) * g_row + a * g_col];
                if (br == TILE_ROWS)
                    rows_times_matrix(TILE_ROWS, rank, rv, grads, rank, pinv_padded, rv, scaled, rv);
                else
                    for (int64_t i = 0; i < br; i++)
                        rows_times_matrix(1, rank, rv, grads + i * rank, rank, pinv_padded, rv, scaled + i * rv, rv);
                float *mi = m + i0 * rank;  /* br consecutive rows */
                if (beta1 == 0.0f) {
                    for (int64_t i = 0; i < br; i++) memcpy(mi + i * rank, scaled + i * rv, rank * sizeof(float));
                } else {
                    if (c == NULL)
                        for (int64_t i = 0; i < br; i++) memcpy(moments + i * rv, mi + i * rank, rank * sizeof(float));
                    else if (br == TILE_ROWS)
                        rows_times_matrix(TILE_ROWS, rank, rv, mi, rank, c_padded, rv, moments, rv);
                    else
                        for (int64_t i = 0; i < br; i++)
                            rows_times_matrix(1, rank, rv, mi + i * rank, rank, c_padded, rv, moments + i * rv, rv);
                    for (int64_t i = 0; i < br; i++)
                        lerp_into(rank, scaled + i * rv, moments + i * rv, beta1, mi + i * rank);
                }
                if (!full) {
                    for (int64_t i = 0; i < br; i++) {
                        float *vi_ = sec + (i0 + i) * rank;
                        for (int64_t b = 0; b < rank; b++)
                            vi_[b] = vi_[b] * beta2 + (1.0f - beta2) * (scaled[i * rv + b] * scaled[i * rv + b]);
                        if (out == NULL) continue;
                        const float *xi = x + layer * x_layer + (i0 + i) * x_row, *mi_ = m + (i0 + i) * rank;
                        float *oi = out[layer] + (i0 + i) * out_row;
                        for (int64_t b = 0; b < rank; b++)
                            oi[b * out_col] = decay * xi[b * x_col] + step_scale * mi_[b] / (sqrtf(vi_[b]) + step_eps);
                    }
                    continue;
                }
                float *p = sec + i0 * packed;
                if (carry && matrices && rank == VEC) {
                    for (int64_t i = 0; i < br; i++)
                        carry_row_in_registers(p + i * packed, congruence, load(scaled + i * rv), beta2);
                    continue;
                } else if (carry && matrices) {
                    for (int64_t i = 0; i < br; i++)
                        congruence_matrices(rank, rv, p + i * packed, congruence, unpack, work, work + rank * rank,
                                            carried + i * padded);
                } else if (carry) {
                    if (br == TILE_ROWS)
                        rows_times_matrix(TILE_ROWS, packed, padded, p, packed, congruence, padded, carried, padded);
                    else
                        for (int64_t i = 0; i < br; i++)
                            rows_times_matrix(1, packed, padded, p + i * packed, packed, congruence, padded,
                                              carried + i * padded, padded);
                }
                for (int64_t i = 0; i < br; i++) {
                    float *pi = p + i * packed;
                    const float *row = scaled + i * rv;
                    if (rank <= VEC) {
                        /* Lane t of the vector at q_s - s is entry (s, t), lanes below s masked. The whole row is
                         * read before any of it is written: a load overlapping a pending masked store stalls. */
                        const vf g = load(row);
                        const float *from = carry ? carried + i * padded : pi;
                        vf old[VEC];
                        for (int64_t s = 0, q = 0; s < rank; q += rank - s, s++)
                            old[s] = load_lanes(from + q - s, s, rank);
                        for (int64_t s = 0, q = 0; s < rank; q += rank - s, s++)
                            store_lanes(pi + q - s, lerp_vector(splat(row[s]) * g, old[s], beta2), s, rank);
                        continue;
                    }
                    /* Packed entries (s, s..r-1) are adjacent: whole vectors from s on, each run's last vector
                     * spilling into the next run, which overwrites it (the buffer has a vector to spare). */
                    int64_t q = 0;
                    for (int64_t s = 0; s < rank; q += rank - s, s++) {
                        const vf w = splat(row[s]);
                        for (int64_t t = s; t < rank; t += VEC) store(outer + q + (t - s), w * load(row + t));
                    }
                    lerp_into(packed, outer, carry ? carried + i * padded : pi, beta2, pi);
                }
            }
        }
        free(carried);
        free(work);
        free(matrices_padded);
        free(outer);
    }
    free(unpack);
    return failed;
}

/* ------------------------------------------------------------------------------------------------------------------
 * kernels.gram_pinv (and kernels.gram_pinv_and_calibration): G = y^T y accumulated in double precision, its inverse
 * by a Cholesky factorisation, accepted when the factorisation succeeded and ||G||_F ||G^-1||_F <= limit (then it is
 * the pseudo-inverse the reference computes; the caller redoes the rejected matrices with an eigendecomposition),
 * and with the previous factor also eq. (7)'s C = prev^T y G^-1.
 * ------------------------------------------------------------------------------------------------------------------ */
static int spd_inverse(int64_t rank, const double *gram, double limit, double *inv, double *work) {
    /* Loops ordered so that the innermost runs along a row (contiguous, vectorised) rather than being a dot product.
     * work (2 r^2 + r doubles): the lower Cholesky factor (built in place of a copy of G), L^-1, L's current column. */
    double *l = work, *linv = work + rank * rank, *column = work + 2 * rank * rank;
    double gram_norm = 0.0, inverse_norm = 0.0;
    for (int64_t e = 0; e < rank * rank; e++) {
        gram_norm += gram[e] * gram[e];
        l[e] = gram[e];
        linv[e] = inv[e] = 0.0;
    }
    for (int64_t j = 0; j < rank; j++) {  /* right-looking: column j, then the update of the rows below it */
        const double d = l[j * rank + j];
        if (!(d > 0.0)) return 0;  /* also catches NaN */
        const double pivot = sqrt(d);
        for (int64_t i = j; i < rank; i++) column[i] = l[i * rank + j] /= pivot;
        for (int64_t i = j + 1; i < rank; i++) {
            const double w = column[i];
            for (int64_t k = j + 1; k <= i; k++) l[i * rank + k] -= w * column[k];
        }
    }
    for (int64_t i = 0; i < rank; i++) {  /* row i of L^-1: (e_i - sum_{k<i} L[i,k] (row k of L^-1)) / L[i,i] */
        double *row = linv + i * rank;
        row[i] = 1.0;
        for (int64_t k = 0; k < i; k++) {
            const double w = l[i * rank + k], *row_k = linv + k * rank;
            for (int64_t c = 0; c <= k; c++) row[c] -= w * row_k[c];
        }
        const double pivot = l[i * rank + i];
        for (int64_t c = 0; c <= i; c++) row[c] /= pivot;
    }
    for (int64_t k = 0; k < rank; k++) {  /* G^-1 = L^-T L^-1 = sum_k (row k of L^-1)^T (row k of L^-1) */
        const double *row_k = linv + k * rank;
        for (int64_t i = 0; i <= k; i++) {
            const double w = row_k[i];
            for (int64_t j = 0; j <= k; j++) inv[i * rank + j] += w * row_k[j];
        }
    }
    for (int64_t e = 0; e < rank * rank; e++) inverse_norm += inv[e] * inv[e];
    return sqrt(gram_norm) * sqrt(inverse_norm) <= limit;
}

/* Double-precision vectors of the Gram sums (VEC / 2 doubles, one register), and the register tile of those sums:
 * GRAM_TILE_ROWS rows x 2 vectors each of y^T y and prev^T y (16 registers of AVX-512's 32, 8 of AVX2's 16). */
#define DVEC (VEC / 2)
typedef double vd __attribute__((vector_size(VEC * 4)));
#if VEC == 16
#define GRAM_TILE_ROWS 4
#else
#define GRAM_TILE_ROWS 2
#endif
#define GRAM_STAGE 2048  /* doubles of y (and of prev) staged at once: 16 KB each, in L1 */

/* The tile of rows [a0, a0 + GRAM_TILE_ROWS) and columns [b0, b0 + 2 DVEC) of y^T y (with gram_too) and prev^T y
 * (with cross_too), summed over the n staged rows ys, ps (n, width) in row order and added into gram, cross. */
static inline __attribute__((always_inline)) void gram_tile(
    const int gram_too, const int cross_too, int64_t n, int64_t width, int64_t rank, int64_t a0, int64_t b0,
    const double *ys, const double *ps, double *restrict gram, double *restrict cross)
{
    vd g[GRAM_TILE_ROWS][2], x[GRAM_TILE_ROWS][2];
    for (int i = 0; i < GRAM_TILE_ROWS; i++)
        for (int v = 0; v < 2; v++) g[i][v] = x[i][v] = (vd){0};
    for (int64_t k = 0; k < n; k++) {
        const double *yk = ys + k * width, *pk = ps + k * width;
        const vd y0 = *(const vd *)(yk + b0), y1 = *(const vd *)(yk + b0 + DVEC);
#pragma GCC unroll 4
        for (int i = 0; i < GRAM_TILE_ROWS; i++) {
            if (gram_too) {
                const double w = yk[a0 + i];
                g[i][0] += w * y0;
                g[i][1] += w * y1;
            }
            if (cross_too) {
                const double w = pk[a0 + i];
                x[i][0] += w * y0;
                x[i][1] += w * y1;
            }
        }
    }
    for (int i = 0; i < GRAM_TILE_ROWS && a0 + i < rank; i++)
        for (int64_t e = 0; e < 2 * DVEC && b0 + e < rank; e++) {
            if (gram_too) gram[(a0 + i) * rank + b0 + e] += g[i][e / DVEC][e % DVEC];
            if (cross_too) cross[(a0 + i) * rank + b0 + e] += x[i][e / DVEC][e % DVEC];
        }
}

/* Over rows [start, stop) of one layer: sums[0:r*r] += y^T y (with gram_too) and, with prev, sums[r*r:2*r*r] +=
 * prev^T y. The rows are staged in double precision, as many at a time as fill GRAM_STAGE (zero-padded to whole
 * pairs of vectors), and each staged block's sums are accumulated in register tiles, in row order. */
static void gram_rows(int64_t start, int64_t stop, int64_t rank, const float *y, int64_t y_row, int64_t y_col,
                      const float *prev, int gram_too, double *sums) {
    double ys[GRAM_STAGE] __attribute__((aligned(64))), ps[GRAM_STAGE] __attribute__((aligned(64)));  /* 32 KB */
    const int64_t width = round_up(rank, 2 * DVEC), block = GRAM_STAGE / width;  /* rank <= 256: block >= 8 */
    double *gram = sums, *cross = sums + rank * rank;
    for (int64_t j0 = start; j0 < stop; j0 += block) {
        const int64_t n = min64(block, stop - j0);
        for (int64_t k = 0; k < n; k++)
            for (int64_t a = 0; a < width; a++) {
                ys[k * width + a] = a < rank ? y[(j0 + k) * y_row + a * y_col] : 0.0;
                if (prev != NULL) ps[k * width + a] = a < rank ? prev[(j0 + k) * rank + a] : 0.0;
            }
        for (int64_t a0 = 0; a0 < rank; a0 += GRAM_TILE_ROWS)
            for (int64_t b0 = 0; b0 < rank; b0 += 2 * DVEC) {
                if (gram_too && prev != NULL) gram_tile(1, 1, n, width, rank, a0, b0, ys, ps, gram, cross);
                else if (gram_too) gram_tile(1, 0, n, width, rank, a0, b0, ys, ps, gram, cross);
                else if (prev != NULL) gram_tile(0, 1, n, width, rank, a0, b0, ys, ps, gram, cross);
            }
    }
}

/* rank <= 256. y (L, l, r) strided; prev (L, l, r) C order or NULL; gram, out, calibration (L, r, r) C order.
 * Without given: the Gram matrices (in fp32, for the caller's eigendecomposition of rejected ones) into gram, the
 * accepted inverses into out, and with prev the calibration matrices prev^T y out. With given (L, r, r) inverses,
 * only calibration = prev^T y given. A layer's sums are always its first half of rows plus its second half, so the
 * same inputs give the same bits for any thread count and batch. accepted: L ints. Returns how many inverses were
 * accepted (a rejected layer's out and calibration are left unset; L with given), or -1 when out of memory. */
int64_t loft_gram_inverse(int threads, int64_t layers, int64_t length, int64_t rank, const float *y, int64_t y_layer,
                          int64_t y_row, int64_t y_col, const float *prev, const float *given, double limit,
                          float *gram, float *out, float *calibration, int32_t *accepted) {
    const int64_t square = rank * rank, per_layer = 2 * square, half = length / 2;
    double *sums = calloc((size_t)(2 * layers * per_layer), sizeof(double));  /* (L, 2 halves, gram | cross) */
    if (sums == NULL) return -1;
    int64_t count = 0;
#pragma omp parallel num_threads(threads) reduction(+ : count)
    {
#pragma omp for schedule(static)
        for (int64_t task = 0; task < 2 * layers; task++) {
            const int64_t layer = task / 2;
            gram_rows(task % 2 ? half : 0, task % 2 ? length : half, rank, y + layer * y_layer, y_row, y_col,
                      prev ? prev + layer * length * rank : NULL, given == NULL, sums + task * per_layer);
        }
        double *work = malloc((3 * square + rank) * sizeof(double));  /* NULL: not accepted, the caller redoes it */
#pragma omp for schedule(static)
        for (int64_t layer = 0; layer < layers; layer++) {
            double *g = sums + 2 * layer * per_layer, *cross = g + square;
            const double *second_half = g + per_layer;
            for (int64_t e = 0; e < per_layer; e++) g[e] += second_half[e];
            double *inv = work + 2 * square + rank;  /* after spd_inverse's work */
            if (given != NULL) {
                if (work == NULL) continue;  /* not counted: the caller raises */
                for (int64_t e = 0; e < square; e++) inv[e] = given[layer * square + e];
                accepted[layer] = 1;
            } else {
                for (int64_t e = 0; e < square; e++) gram[layer * square + e] = (float)g[e];
                accepted[layer] = work != NULL && spd_inverse(rank, g, limit, inv, work);
                if (!accepted[layer]) continue;
                for (int64_t e = 0; e < square; e++) inv[e] = out[layer * square + e] = (float)inv[e];
            }
            count++;
            if (prev == NULL) continue;
            for (int64_t a = 0; a < rank; a++) {  /* with the fp32 inverse, as a given one would be; row by row */
                double *row = work;
                for (int64_t b = 0; b < rank; b++) row[b] = 0.0;
                for (int64_t k = 0; k < rank; k++) {
                    const double w = cross[a * rank + k], *inv_row = inv + k * rank;
                    for (int64_t b = 0; b < rank; b++) row[b] += w * inv_row[b];
                }
                for (int64_t b = 0; b < rank; b++) calibration[layer * square + a * rank + b] = (float)row[b];
            }
        }
        free(work);
    }
    free(sums);
    return count;
}

/* ------------------------------------------------------------------------------------------------------------------
 * One alternating LoFT-AdamW step of L same-shape pairs in one call (kernels.alternating_step): which factors changed
 * since the last step, the Gram inverses not already known and the calibration matrices, the previous factors, both
 * sides' moments (blocks 2-4; LoFT-simple's step of the moving factor in the same pass), block 5 for the factor that
 * moves (LoFT-AdamW), and the step counts and phases. The same functions as the separate calls, in an order that gives
 * the same bits.
 * ------------------------------------------------------------------------------------------------------------------ */

/* One side of the pairs: the factor x (U = B or V = A^T) with its gradient and state. */
struct loft_factor {
    const float *x;                /* (L, rows, r), strided */
    int64_t x_layer, x_row, x_col;
    const float *grad;             /* (L, rows, r), strided */
    int64_t grad_layer, grad_row, grad_col;
    float *exp_avg, *second, *prev; /* (L, rows, r), cross terms (L, rows, R) or exp_avg_sq (L, rows, r), (L, rows, r),
                                     * C order, updated in place */
    const float *pinv_prev;        /* (L, r, r): (prev^T prev)^+, or NULL */
    const float *pinv_now;         /* (L, r, r): (x^T x)^+ computed elsewhere for these very values, or NULL */
    float *pinv;                   /* (L, r, r) out: (x^T x)^+ */
    float *calibration;            /* (L, r, r) scratch: eq. (7)'s C for the other side's moments */
    float *gram;                   /* (L, r, r) scratch for the Gram matrices */
    int64_t rows;
    int32_t calibrate;             /* calibrate the other side's moments when x changed */
    int32_t changed;               /* out: x differs from prev (in every layer) */
};

struct loft_step_options {
    int32_t threads;
    int64_t layers, rank;
    int32_t full;                  /* 1: LoFT-AdamW (cross terms, block 5), 0: LoFT-simple (elementwise) */
    float beta1, beta2;
    double limit;                  /* the acceptance bound of the Cholesky inverses (loft_gram_inverse) */
    int32_t move_b;                /* 1: U moves, 0: V moves */
    float decay;                   /* 1 - lr weight_decay */
    float first_scale, projector_scale, eps;  /* full: block 5's constants, as loft_projected_adam takes them */
    float step_scale, step_eps;    /* simple: the step's constants, as loft_update_moments takes them */
    int32_t floored;
    float *moments_scratch, *adam_scratch;  /* loft_update_moments_scratch, loft_projected_adam_scratch floats */
    int32_t *accepted;             /* L ints */
    float *const *out;             /* the moving factor's new value: layer l at out[l], strides out_row, out_col */
    int64_t out_row, out_col;
    float *step;                   /* L step counts: + 1 once the step is done */
    int64_t *phase;                /* L phases: set to next_phase once the step is done */
    int64_t next_phase;
};

/* Whether layer `layer` of x equals prev (as torch.equal: every element ==). */
static int layer_unchanged(const struct loft_factor *s, int64_t rank, int64_t layer) {
    const float *x = s->x + layer * s->x_layer, *prev = s->prev + layer * s->rows * rank;
    for (int64_t i = 0; i < s->rows; i++) {
        int differs = 0;
        for (int64_t a = 0; a < rank; a++) differs |= x[i * s->x_row + a * s->x_col] != prev[i * rank + a];
        if (differs) return 0;
    }
    return 1;
}

/* Returns 0; 1 when out of memory (the state may be partly updated, as with the separate calls); before any state is
 * written, 2 when a Gram inverse was not accepted and 3 when a factor changed in some layers only (the caller then
 * takes the general path, which handles both). */
int loft_alternating_step(struct loft_factor *u, struct loft_factor *v, const struct loft_step_options *o) {
    const int64_t layers = o->layers, rank = o->rank, square = layers * rank * rank;
    struct loft_factor *sides[2] = {u, v};
    for (int k = 0; k < 2; k++) {
        struct loft_factor *s = sides[k];
        int64_t unchanged = 0;
        for (int64_t layer = 0; layer < layers; layer++) unchanged += layer_unchanged(s, rank, layer);
        if (unchanged != 0 && unchanged != layers) return 3;
        s->changed = unchanged == 0;
    }
    for (int k = 0; k < 2; k++) {
        struct loft_factor *s = sides[k];
        /* as the separate calls choose: an unchanged factor's inverse from the last step, else one computed
         * elsewhere for these values, else computed here */
        const float *known = s->changed || s->pinv_prev == NULL ? s->pinv_now : s->pinv_prev;
        const int calibrate = s->calibrate && s->changed;
        if (known != NULL) {
            memcpy(s->pinv, known, (size_t)square * sizeof(float));
            if (calibrate && loft_gram_inverse(o->threads, layers, s->rows, rank, s->x, s->x_layer, s->x_row,
                                               s->x_col, s->prev, s->pinv, 0.0, NULL, NULL, s->calibration,
                                               o->accepted) != layers)
                return 1;
        } else {
            const int64_t count = loft_gram_inverse(
                o->threads, layers, s->rows, rank, s->x, s->x_layer, s->x_row, s->x_col, calibrate ? s->prev : NULL,
                NULL, o->limit, s->gram, s->pinv, calibrate ? s->calibration : NULL, o->accepted);
            if (count < 0) return 1;
            if (count < layers) return 2;
        }
    }
    for (int k = 0; k < 2; k++) {  /* prev <- x now: the new factor may be written over x below */
        const struct loft_factor *s = sides[k];
        if (!s->changed) continue;
        for (int64_t layer = 0; layer < layers; layer++)
            for (int64_t i = 0; i < s->rows; i++)
                for (int64_t a = 0; a < rank; a++)
                    s->prev[(layer * s->rows + i) * rank + a] = s->x[layer * s->x_layer + i * s->x_row + a * s->x_col];
    }
    const struct loft_factor *moving = o->move_b ? u : v, *other = o->move_b ? v : u;
    for (int k = 0; k < 2; k++) {  /* a side's gradient is scaled by the other's inverse, carried by its C */
        const struct loft_factor *s = sides[k], *o_side = sides[1 - k];
        const float *calibration = o_side->calibrate && o_side->changed ? o_side->calibration : NULL;
        const int steps = !o->full && s == moving;  /* LoFT-simple's step comes out of the moments' pass */
        if (loft_update_moments(o->threads, layers, s->rows, rank, s->grad, s->grad_layer, s->grad_row, s->grad_col,
                                o_side->pinv, calibration, o->beta1, o->beta2, o->full, s->exp_avg, s->second,
                                o->moments_scratch, s->x, s->x_layer, s->x_row, s->x_col, o->decay, o->step_scale,
                                o->step_eps, steps ? o->out : NULL, o->out_row, o->out_col))
            return 1;
    }
    if (o->full && loft_projected_adam(o->threads, layers, moving->rows, other->rows, rank, moving->x,
                                       moving->x_layer, moving->x_row, moving->x_col, moving->exp_avg, moving->second,
                                       other->x, other->x_layer, other->x_row, other->x_col, other->pinv, o->decay,
                                       o->first_scale, o->projector_scale, o->eps, o->floored, o->adam_scratch, o->out,
                                       o->out_row, o->out_col))
        return 1;
    for (int64_t layer = 0; layer < layers; layer++) {
        o->step[layer] += 1.0f;
        o->phase[layer] = o->next_phase;
    }
    return 0;
}
