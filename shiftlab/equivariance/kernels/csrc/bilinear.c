/* The circular bilinear comparison in one read of each shifted map (see shiftlab/native.py).

   For every (shift s, image b) of a chunk it returns, summed over channels, rows and columns:
     lags[s][b][l]  = sum x[i][j] * x[(i + lh) % H][(j + lw) % W]     x = the shifted map
     diff[s][b][l]  = the same for d = x - roll(a, (qh, qw))           exact shifts only
     cross[s][b]    = sum_t wr_t sum g_k[(i + or_t) % H][j] * x[i][j]  inexact shifts only
   where a is the image's reference map and g_k[i][j] = sum_u wc_u a[i][(j + oc_u) % W] is the
   reference filtered by the shift's column taps (set k, built once per block of channels and
   shared by the shifts of the chunk that use it). The caller turns lag sums into quadratic
   forms.

   A block of channels (planes side by side in memory) is one flat vector: a 2-D circular lag
   (l_h, l_w) is the flat lag l_h * w + l_w, which is right except (1) where it runs off the end
   of a plane into the next one (k values per plane, corrected with the plane's own start) and
   (2) in the |l_w| columns that wrap round within a row (one value per row, corrected from
   the plane's first and last columns). So the five lag sums of the 3-tap norm and the row
   taps of the cross term are one vectorised pass over the block (fused_pass), nine
   accumulators wide: each shifted value is loaded from memory once. Planes of at most
   SMALL_PLANE values, where those corrections would cost as much as the pass, are transposed
   channels-last instead (channels_last_block): a 2-D lag is then a move between positions'
   channel vectors and needs no correction.

   shiftlab_difference (at the end) serves the exact and Fourier alignments.

   Work is split by (image, channel) ranges over OpenMP threads (shiftlab_bilinear_parallel),
   or by the caller over Python threads when the library was built without OpenMP. Sums are
   float over at most BLOCK products, then double. */
#include <stdlib.h>
#include <string.h>

#define BLOCK 4096 /* float partial sums over at most this many products, then double */
#define NOINLINE __attribute__((noinline)) /* whole-block functions: a profile shows each */

static int wrap(int i, int n)
{
    i %= n;
    return i < 0 ? i + n : i;
}

static int shortest(int offset, int n)
{
    offset = wrap(offset, n);
    return offset > n / 2 ? offset - n : offset;
}

#define NL 5 /* lag sums per pass: the 3-tap norm has five distinct lags */
#define NT 4 /* row taps per pass: the cross filter has at most four per axis */
#define VEC 16
#define SMALL_PLANE 256 /* planes of at most this many values go channels last */

/* over n in [0, count): sums[l] += x[n] * y[n + lag[l]], cross[t] += x[n] * f[n + tap[t]] */
NOINLINE static void fused_pass(const float *restrict x, const float *restrict y, const long *lag,
                                const float *restrict f, const long *tap, long count, double *sums,
                                double *cross)
{
    for (long start = 0; start < count; start += BLOCK) {
        long stop = start + BLOCK < count ? start + BLOCK : count, n = start;
        float al[NL][VEC] = {{0.0f}}, at[NT][VEC] = {{0.0f}};
        for (; n + VEC <= stop; n += VEC)
            for (int v = 0; v < VEC; ++v) {
                float value = x[n + v];
                for (int l = 0; l < NL; ++l)
                    al[l][v] += value * y[n + v + lag[l]];
                for (int t = 0; t < NT; ++t)
                    at[t][v] += value * f[n + v + tap[t]];
            }
        for (; n < stop; ++n) {
            for (int l = 0; l < NL; ++l)
                al[l][0] += x[n] * y[n + lag[l]];
            for (int t = 0; t < NT; ++t)
                at[t][0] += x[n] * f[n + tap[t]];
        }
        for (int l = 0; l < NL; ++l) {
            float part = 0.0f;
            for (int v = 0; v < VEC; ++v)
                part += al[l][v];
            sums[l] += (double)part;
        }
        for (int t = 0; t < NT; ++t) {
            float part = 0.0f;
            for (int v = 0; v < VEC; ++v)
                part += at[t][v];
            cross[t] += (double)part;
        }
    }
}

typedef struct {
    int H, W, n_lags;
    int lh[NL], lw[NL];   /* lh >= 0, lw in [-W/2, W/2], flat lag lh * W + lw >= 0 */
    long flat[NL], reach; /* reach: the largest flat lag */
    int unit_columns;     /* every |lw| <= 1 and lh <= 1 (the 3-tap norm's lags) */
} Lags;

typedef float lanes_t __attribute__((vector_size(4 * VEC)));

static inline lanes_t load(const float *p)
{
    lanes_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static float lane_sum(lanes_t v)
{
    float total = 0.0f;
    for (int k = 0; k < VEC; ++k)
        total += v[k];
    return total;
}

/* acc += x[m] * (y[m] - z[m]) over m < n, lane-wise: summed across lanes once per block */
static inline void dot_diff_into(lanes_t *acc, const float *x, const float *y, const float *z,
                                 long n)
{
    long m = 0;
    for (; m + VEC <= n; m += VEC)
        *acc += load(x + m) * (load(y + m) - load(z + m));
    for (; m < n; ++m)
        (*acc)[0] += x[m] * (y[m] - z[m]);
}

/* The lag sums of `count` planes x (side by side) and, for the row taps (flat offsets tap[t]
   = o_t * W, |o_t| <= margin rows, n_taps of them), cross[t] += sum over the planes of
   f[(i + o_t) % H] . x[i], where f holds the planes' filtered references side by side with
   `margin` rows of the block wrapped round before and after. Scratch: `tail` 2 * reach floats,
   `first` and `last` H + 2 each. */
NOINLINE static void block_sums(const float *x, int count, const Lags *g, const float *f,
                                const long *tap, int n_taps, float *tail, float *first, float *last,
                                double *sums, double *cross)
{
    int H = g->H, W = g->W;
    long plane = (long)H * W, size = plane * count, reach = g->reach;
    /* the block as one circular vector: the lags that stay inside, then the last `reach`
       values against a copy of the block's end and start */
    fused_pass(x, x, g->flat, f, tap, size - reach, sums, cross);
    memcpy(tail, x + size - reach, sizeof(float) * reach);
    memcpy(tail + reach, x, sizeof(float) * reach);
    fused_pass(tail, tail, g->flat, f + size - reach, tap, reach, sums, cross);
    lanes_t lag_fix[NL] = {{0}}, tap_fix[NT] = {{0}};
    for (int c = 0; c < count && count > 1; ++c) {
        /* (1) the end of plane c was paired with the start of the next plane, not its own */
        const float *own = x + c * plane, *next = x + (c + 1 < count ? c + 1 : 0) * plane;
        const float *prev = x + (c > 0 ? c - 1 : count - 1) * plane;
        for (int l = 0; l < g->n_lags; ++l) {
            long k = g->flat[l];
            if (k)
                dot_diff_into(&lag_fix[l], own + plane - k, own, next, k);
        }
        for (int t = 0; t < n_taps; ++t) {
            long o = tap[t];
            const float *fown = f + c * plane;
            if (o > 0)
                dot_diff_into(&tap_fix[t], own + plane - o, fown, f + (next - x), o);
            else if (o < 0)
                dot_diff_into(&tap_fix[t], own, fown + plane + o, f + (prev - x) + plane + o, -o);
        }
    }
    for (int c = 0; c < count; ++c) {
        /* (2) the wrapping columns: the flat lag paired them with the row after (lw > 0) or
           before (lw < 0) the right one */
        const float *p = x + c * plane;
        if (g->unit_columns) {
            /* each plane's first and last columns, with two rows of wrap-around: each
               correction is then a short dot */
            for (int i = 0; i < H + 2; ++i) {
                int row = i < H ? i : i - H; /* i % H without a division */
                row = row < H ? row : row - H;  /* H = 1: row 2 is row 0 */
                first[i] = p[(long)row * W];
                last[i] = p[(long)row * W + W - 1];
            }
            for (int l = 0; l < g->n_lags; ++l) {
                int lh = g->lh[l], lw = g->lw[l];
                if (!lw)
                    continue;
                /* lw = 1: column W - 1 of row i went with column 0 of row i + lh + 1, not
                   i + lh; lw = -1: column 0 of row i with column W - 1 of row i + lh - 1 */
                const float *mine = lw > 0 ? last : first, *other = lw > 0 ? first : last;
                int good = lh % H, bad = lw > 0 ? (lh + 1) % H : (lh + H - 1) % H;
                dot_diff_into(&lag_fix[l], mine, other + good, other + bad, H);
            }
            continue;
        }
        for (int l = 0; l < g->n_lags; ++l) {
            int lh = g->lh[l], lw = g->lw[l];
            if (!lw)
                continue;
            int right = lh % H, wrong = lw > 0 ? (lh + 1) % H : (lh + H - 1) % H;
            int width = lw > 0 ? lw : -lw, from = lw > 0 ? W - lw : 0, to = lw > 0 ? 0 : W + lw;
            for (int i = 0; i < H; ++i) {
                dot_diff_into(&lag_fix[l], p + (long)i * W + from, p + (long)right * W + to,
                              p + (long)wrong * W + to, width);
                right = right + 1 == H ? 0 : right + 1;
                wrong = wrong + 1 == H ? 0 : wrong + 1;
            }
        }
    }
    for (int l = 0; l < g->n_lags; ++l)
        sums[l] += (double)lane_sum(lag_fix[l]);
    for (int t = 0; t < n_taps; ++t)
        cross[t] += (double)lane_sum(tap_fix[t]);
}

typedef float eight_t __attribute__((vector_size(32)));
typedef int eight_index_t __attribute__((vector_size(32)));

/* two-vector shuffles: GCC's builtin takes a mask vector, Clang's the indices (the Clang form
   is not compiled on the machines this was developed on) */
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (eight_index_t){__VA_ARGS__})
#endif

/* out[m][c] = in[c][m] for `count` planes of `plane` values, channels last with a row stride
   of `lanes` >= count (the extra lanes are zeros). 8 x 8 tiles in registers. */
NOINLINE static void transpose(float *restrict out, const float *restrict in, int count, int lanes,
                               long plane)
{
    int full_c = count / 8 * 8;
    long full_m = plane / 8 * 8;
    for (long m0 = 0; m0 < full_m; m0 += 8)
        for (int c0 = 0; c0 < full_c; c0 += 8) {
            eight_t r[8], t[8], u[8];
            for (int k = 0; k < 8; ++k)
                memcpy(&r[k], in + (long)(c0 + k) * plane + m0, sizeof(eight_t));
            for (int k = 0; k < 8; k += 2) {
                t[k] = SHUFFLE(r[k], r[k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
                t[k + 1] = SHUFFLE(r[k], r[k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
            }
            for (int k = 0; k < 8; k += 4) {
                u[k] = SHUFFLE(t[k], t[k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
                u[k + 1] = SHUFFLE(t[k], t[k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
                u[k + 2] = SHUFFLE(t[k + 1], t[k + 3], 0, 1, 8, 9, 4, 5, 12, 13);
                u[k + 3] = SHUFFLE(t[k + 1], t[k + 3], 2, 3, 10, 11, 6, 7, 14, 15);
            }
            for (int k = 0; k < 4; ++k) {
                eight_t first = SHUFFLE(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
                eight_t second = SHUFFLE(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
                memcpy(out + (m0 + k) * lanes + c0, &first, sizeof(eight_t));
                memcpy(out + (m0 + k + 4) * lanes + c0, &second, sizeof(eight_t));
            }
        }
    for (long m = 0; m < plane; ++m) { /* the edges, and zeros in the extra lanes */
        int from = m < full_m ? full_c : 0;
        for (int c = from; c < count; ++c)
            out[m * lanes + c] = in[(long)c * plane + m];
        for (int c = count; c < lanes; ++c)
            out[m * lanes + c] = 0.0f;
    }
}


/* Small planes: block_sums on the block with channels last (xt, ft: plane x lanes). A 2-D
   circular lag is then a move from one position's channel vector to another's, so nothing
   needs correcting, and channels are the vector lanes. nbr[l * plane + m]: the position lag l
   takes m to; taps[t]: row offsets (t < n_taps). */
NOINLINE static void transposed_sums(const float *xt, int lanes, const Lags *g, const int *nbr,
                                     const float *ft, const int *taps, int n_taps, double *sums,
                                     double *cross)
{
    int H = g->H, W = g->W;
    long plane = (long)H * W;
    const int *n0 = nbr, *n1 = nbr + plane, *n2 = nbr + 2 * plane, *n3 = nbr + 3 * plane;
    const int *n4 = nbr + 4 * plane;
    for (int c0 = 0; c0 < lanes; c0 += VEC) {
        lanes_t a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0};
        lanes_t t0 = {0}, t1 = {0}, t2 = {0}, t3 = {0};
        const float *x0 = xt + c0, *f0 = n_taps ? ft + c0 : x0;
        for (int i = 0; i < H; ++i) {
            /* a missing tap reads row i: its sum is unused */
            long r0 = (long)wrap(i + (n_taps > 0 ? taps[0] : 0), H) * W * lanes;
            long r1 = (long)wrap(i + (n_taps > 1 ? taps[1] : 0), H) * W * lanes;
            long r2 = (long)wrap(i + (n_taps > 2 ? taps[2] : 0), H) * W * lanes;
            long r3 = (long)wrap(i + (n_taps > 3 ? taps[3] : 0), H) * W * lanes;
            for (int j = 0; j < W; ++j) {
                long m = (long)i * W + j, col = (long)j * lanes;
                lanes_t x = load(x0 + m * lanes);
                a0 += x * load(x0 + (long)n0[m] * lanes);
                a1 += x * load(x0 + (long)n1[m] * lanes);
                a2 += x * load(x0 + (long)n2[m] * lanes);
                a3 += x * load(x0 + (long)n3[m] * lanes);
                a4 += x * load(x0 + (long)n4[m] * lanes);
                t0 += x * load(f0 + r0 + col);
                t1 += x * load(f0 + r1 + col);
                t2 += x * load(f0 + r2 + col);
                t3 += x * load(f0 + r3 + col);
            }
        }
        lanes_t lag_acc[NL] = {a0, a1, a2, a3, a4}, tap_acc[NT] = {t0, t1, t2, t3};
        for (int l = 0; l < g->n_lags; ++l)
            sums[l] += (double)lane_sum(lag_acc[l]);
        for (int t = 0; t < n_taps; ++t)
            cross[t] += (double)lane_sum(tap_acc[t]);
    }
}

/* out = sum_u w_u a[i][(j + o_u) % W] over an h x w plane, o_u in [-W/2, W/2] */
NOINLINE static void filter_columns(float *restrict out, const float *restrict a, int H, int W,
                                    int n_taps, const int *offsets, const float *weights)
{
    long size = (long)H * W, low = 0, high = 0;
    for (int u = 0; u < n_taps; ++u) {
        low = offsets[u] < low ? offsets[u] : low;
        high = offsets[u] > high ? offsets[u] : high;
    }
    /* flat: out[n] = sum_u w_u a[(n + o_u) % size], all taps in one pass (one store) */
    long start = -low < size ? -low : size, stop = size - high > start ? size - high : start;
    if (n_taps == 4) {
        const float *a0 = a + offsets[0], *a1 = a + offsets[1], *a2 = a + offsets[2];
        const float *a3 = a + offsets[3];
        float w0 = weights[0], w1 = weights[1], w2 = weights[2], w3 = weights[3];
#pragma omp simd
        for (long n = start; n < stop; ++n)
            out[n] = w0 * a0[n] + w1 * a1[n] + w2 * a2[n] + w3 * a3[n];
    } else if (n_taps == 3) {
        const float *a0 = a + offsets[0], *a1 = a + offsets[1], *a2 = a + offsets[2];
        float w0 = weights[0], w1 = weights[1], w2 = weights[2];
#pragma omp simd
        for (long n = start; n < stop; ++n)
            out[n] = w0 * a0[n] + w1 * a1[n] + w2 * a2[n];
    } else {
        memset(out + start, 0, sizeof(float) * (stop - start));
        for (int u = 0; u < n_taps; ++u) {
            const float *src = a + offsets[u];
            float w = weights[u];
#pragma omp simd
            for (long n = start; n < stop; ++n)
                out[n] += w * src[n];
        }
    }
    for (int end = 0; end < 2; ++end) /* the ends, where a flat offset runs off the plane */
        for (long n = end ? stop : 0; n < (end ? size : start); ++n) {
            float v = 0.0f;
            for (int u = 0; u < n_taps; ++u)
                v += weights[u] * a[((n + offsets[u]) % size + size) % size];
            out[n] = v;
        }
    for (int u = 0; u < n_taps; ++u) {
        int o = offsets[u];
        float w = weights[u];
        /* the |o| wrapping columns of each row took their value from the next (o > 0) or
           the previous (o < 0) row: a column at a time, down the rows */
        for (int m = 0; m < (o > 0 ? o : -o); ++m) {
            int j = o > 0 ? W - o + m : m, source = o > 0 ? m : W + o + m;
            int step = o > 0 ? 1 : H - 1;
            for (int i = 0; i < H; ++i) {
                int other = i + step < H ? i + step : i + step - H;
                out[(long)i * W + j] += w * (a[(long)i * W + source] - a[(long)other * W + source]);
            }
        }
    }
}

/* One block of `count` channels (of image b) with small planes, channels last: the
   reference once, each filtered reference from it (vector lanes, no corrections), then per
   shift the shifted block and, for exact shifts, the difference. scratch: (n_sets + 3) *
   plane * lanes floats. */
static void channels_last_block(const float *a, const float *shifted, long stride_s,
                                long stride_b, int n_shifts, int n_images, int b, int count,
                                int lanes, const Lags *g, const int *nbr, int n_lags,
                                const int *mode, const int *roll, const int *row_start,
                                const int *row_count, const int *row_off, const double *row_w,
                                const int *col_set, int n_sets, const int *set_start,
                                const int *set_count, const int *col_off, const float *col_w,
                                long first_plane, float *scratch, double *out_lags,
                                double *out_diff, double *out_cross)
{
    int H = g->H, W = g->W;
    long plane = (long)H * W, t_size = plane * lanes;
    float *at = scratch, *ft = at + t_size, *xt = ft + t_size * n_sets, *dt = xt + t_size;
    transpose(at, a, count, lanes, plane);
    for (int k = 0; k < n_sets; ++k) {
        float *f = ft + k * t_size;
        for (int j = 0; j < W; ++j) {
            /* column j of set k reads these columns (at most NT taps per pass) */
            for (int first = set_start[k]; first < set_start[k] + set_count[k]; first += NT) {
                int used = set_start[k] + set_count[k] - first;
                used = used < NT ? used : NT;
                long source[NT];
                float weight[NT];
                for (int u = 0; u < NT; ++u) {
                    source[u] = (long)wrap(j + (u < used ? col_off[first + u] : 0), W) * lanes;
                    weight[u] = u < used ? col_w[first + u] : 0.0f;
                }
                for (int i = 0; i < H; ++i) {
                    const float *row = at + (long)i * W * lanes;
                    float *out = f + ((long)i * W + j) * lanes;
                    for (int c = 0; c < lanes; c += VEC) {
                        lanes_t v = first == set_start[k] ? (lanes_t){0} : load(out + c);
                        v += weight[0] * load(row + source[0] + c) +
                             weight[1] * load(row + source[1] + c) +
                             weight[2] * load(row + source[2] + c) +
                             weight[3] * load(row + source[3] + c);
                        memcpy(out + c, &v, sizeof(v));
                    }
                }
            }
        }
    }
    double unused[NT];
    for (int s = 0; s < n_shifts; ++s) {
        long slot = (long)s * n_images + b;
        transpose(xt, shifted + s * stride_s + b * stride_b + first_plane * plane, count, lanes,
                  plane);
        double sums[NL] = {0.0}, cross[NT] = {0.0}, total = 0.0, spare[NL];
        int taps[NT] = {0}, n_taps = mode[s] == 0 ? row_count[s] : 0;
        for (int first = row_start[s]; first < row_start[s] + n_taps || first == row_start[s];
             first += NT) {
            /* more than NT taps: further passes, their lag sums unused */
            int used = row_start[s] + n_taps - first;
            used = used < NT ? used : NT;
            for (int t = 0; t < used; ++t)
                taps[t] = shortest(row_off[first + t], H);
            transposed_sums(xt, lanes, g, nbr, ft + (long)col_set[s] * t_size, taps, used,
                            first == row_start[s] ? sums : spare, cross);
            for (int t = 0; t < used; ++t)
                total += row_w[first + t] * cross[t];
            memset(cross, 0, sizeof(cross));
        }
        out_cross[slot] += total;
        for (int l = 0; l < n_lags; ++l)
            out_lags[slot * n_lags + l] += sums[l];
        if (mode[s] != 1)
            continue;
        int qh = roll[2 * s], qw = roll[2 * s + 1]; /* exact: d = x - roll(a, (qh, qw)) */
        for (int i = 0; i < H; ++i)
            for (int j = 0; j < W; ++j) {
                long m = (long)i * W + j, source = (long)wrap(i - qh, H) * W + wrap(j - qw, W);
                for (int c = 0; c < lanes; c += VEC) {
                    lanes_t d = load(xt + m * lanes + c) - load(at + source * lanes + c);
                    memcpy(dt + m * lanes + c, &d, sizeof(d));
                }
            }
        double dsums[NL] = {0.0};
        transposed_sums(dt, lanes, g, nbr, dt, NULL, 0, dsums, unused);
        for (int l = 0; l < n_lags; ++l)
            out_diff[slot * n_lags + l] += dsums[l];
    }
}

/* Returns 0, or -1 when scratch memory could not be allocated or n_lags > NL. */
int shiftlab_bilinear(const float *ref, const float *shifted, long stride_s, long stride_b,
                      int n_shifts, int n_images, int channels, int H, int W,
                      int first_bc, int last_bc,
                      int n_lags, const int *lags_in,
                      const int *mode, const int *roll,
                      const int *row_start, const int *row_count, const int *row_off,
                      const double *row_w,
                      const int *col_set, int n_sets, const int *set_start,
                      const int *set_count, const int *col_off_in, const float *col_w,
                      double *out_lags, double *out_diff, double *out_cross)
{
    if (n_lags > NL)
        return -1;
    long plane = (long)H * W;
    Lags g = {H, W, n_lags, {0}, {0}, {0}, 0, 1};
    for (int l = 0; l < n_lags; ++l) {
        /* (lh, lw) and its mirror (-lh, -lw) give the same sum: take the one with a small
           non-negative flat lag */
        int lh = shortest(lags_in[2 * l], H), lw = shortest(lags_in[2 * l + 1], W);
        if (lh < 0 || (lh == 0 && lw < 0)) {
            lh = -lh;
            lw = -lw;
        }
        g.lh[l] = lh;
        g.lw[l] = lw;
        g.flat[l] = (long)lh * W + lw;
        g.reach = g.flat[l] > g.reach ? g.flat[l] : g.reach;
        /* the first/last-column corrections read rows lh - 1 .. lh + H: H + 2 rows kept */
        g.unit_columns &= lw >= -1 && lw <= 1 && lh <= 1;
    }
    int total_taps = n_sets ? set_start[n_sets - 1] + set_count[n_sets - 1] : 0;
    int total_rows = n_shifts ? row_start[n_shifts - 1] + row_count[n_shifts - 1] : 0;
    int margin = 0;
    for (int t = 0; t < total_rows; ++t) {
        int o = abs(shortest(row_off[t], H));
        margin = o > margin ? o : margin;
    }
    /* channels per block: the block's filtered references fill about half of a 1 MiB L2
       cache, and a block spans at least a few thousand values (one long pass) */
    int block = n_sets ? (int)((1L << 19) / ((long)sizeof(float) * plane * n_sets)) : 64;
    block = block < 1 ? 1 : block;
    long f_stride = plane * block + 2L * margin * W; /* one set's block, wrapped rows each side */
    /* small planes with enough channels for the vector lanes: channels last, in blocks whose
       scratch (the reference, its filtered copies, a shifted block, a difference) fills
       about half the L2 cache */
    int channels_last = plane <= SMALL_PLANE && channels >= VEC;
    int lanes = (int)((1L << 19) / ((long)sizeof(float) * plane * (n_sets + 3))) / VEC * VEC;
    lanes = lanes < VEC ? VEC : lanes;
    long t_size = channels_last ? plane * lanes * (n_sets + 3) : 0;
    int *col_off = (int *)malloc(sizeof(int) * (total_taps + 1));
    int *nbr = (int *)malloc(sizeof(int) * (NL * plane + 1));
    float *filtered = (float *)malloc(sizeof(float) * (f_stride * n_sets + plane * block +
                                                       2 * g.reach + 2 * (H + 2) + 1 + t_size));
    if (!col_off || !filtered || !nbr) {
        free(col_off);
        free(filtered);
        free(nbr);
        return -1;
    }
    float *diff = filtered + f_stride * n_sets, *tail = diff + plane * block;
    float *first = tail + 2 * g.reach, *last = first + H + 2;
    float *transposed = last + H + 2;
    for (int l = 0; l < NL && channels_last; ++l) /* a missing lag (l >= n_lags): m to m */
        for (int i = 0; i < H; ++i)
            for (int j = 0; j < W; ++j)
                nbr[l * plane + (long)i * W + j] = l >= n_lags ? (int)((long)i * W + j) :
                    (int)((long)((i + g.lh[l]) % H) * W + wrap(j + g.lw[l], W));
    for (int u = 0; u < total_taps; ++u)
        col_off[u] = shortest(col_off_in[u], W);
    double unused[NT];
    for (int bc = first_bc; bc < last_bc && channels_last;) {
        int b = bc / channels, c0 = bc % channels, count = lanes;
        count = count < channels - c0 ? count : channels - c0;
        count = count < last_bc - bc ? count : last_bc - bc;
        channels_last_block(ref + ((long)b * channels + c0) * plane, shifted, stride_s, stride_b,
                            n_shifts, n_images, b, count, (count + VEC - 1) / VEC * VEC, &g, nbr,
                            n_lags, mode, roll, row_start, row_count, row_off, row_w, col_set,
                            n_sets, set_start, set_count, col_off, col_w, c0, transposed,
                            out_lags, out_diff, out_cross);
        bc += count;
    }
    for (int bc = first_bc; bc < last_bc && !channels_last;) {
        /* a block of channels of one image: every shift streams through the block's planes,
           side by side in memory, while the block's filtered references stay in the cache */
        int b = bc / channels, c0 = bc % channels, count = block;
        count = count < channels - c0 ? count : channels - c0;
        count = count < last_bc - bc ? count : last_bc - bc;
        long size = plane * count, wrapped = (long)margin * W;
        const float *a = ref + ((long)b * channels + c0) * plane;
        for (int k = 0; k < n_sets; ++k) {
            float *f = filtered + k * f_stride + wrapped;
            for (int ci = 0; ci < count; ++ci)
                filter_columns(f + ci * plane, a + ci * plane, H, W, set_count[k],
                               col_off + set_start[k], col_w + set_start[k]);
            /* margin <= H / 2 rows of the block's other end, before and after it */
            memcpy(f - wrapped, f + size - wrapped, sizeof(float) * wrapped);
            memcpy(f + size, f, sizeof(float) * wrapped);
        }
        for (int s = 0; s < n_shifts; ++s) {
            long slot = (long)s * n_images + b;
            const float *x = shifted + s * stride_s + b * stride_b + (long)c0 * plane;
            double sums[NL] = {0.0}, cross[NT] = {0.0};
            long tap[NT] = {0};
            if (mode[s] == 0 && row_count[s] > 0) {
                const float *f = filtered + (long)col_set[s] * f_stride + wrapped;
                double total = 0.0, spare[NL];
                for (int first_tap = row_start[s]; first_tap < row_start[s] + row_count[s];
                     first_tap += NT) {
                    int taps = row_start[s] + row_count[s] - first_tap;
                    taps = taps < NT ? taps : NT;
                    for (int t = 0; t < NT; ++t)
                        tap[t] = t < taps ? (long)shortest(row_off[first_tap + t], H) * W : 0;
                    /* more than NT taps: further passes, their lag sums unused */
                    block_sums(x, count, &g, f, tap, taps, tail, first, last,
                               first_tap == row_start[s] ? sums : spare, cross);
                    for (int t = 0; t < taps; ++t)
                        total += row_w[first_tap + t] * cross[t];
                    memset(cross, 0, sizeof(cross));
                }
                out_cross[slot] += total;
            } else {
                /* no taps: the pass reads the block itself as its f (tap 0), results unused */
                block_sums(x, count, &g, x, tap, 0, tail, first, last, sums, unused);
            }
            for (int l = 0; l < n_lags; ++l)
                out_lags[slot * n_lags + l] += sums[l];
            if (mode[s] == 1) { /* exact: d = x - roll(a, (qh, qw)) */
                int qh = roll[2 * s], qw = roll[2 * s + 1];
                int shift = wrap(-qw, W), split = W - shift; /* d[j] = x[j] - a[(j + shift) % W] */
                for (int ci = 0; ci < count; ++ci)
                    for (int i = 0; i < H; ++i) {
                        const float *arow = a + ci * plane + (long)wrap(i - qh, H) * W;
                        const float *xrow = x + ci * plane + (long)i * W;
                        float *drow = diff + ci * plane + (long)i * W;
#pragma omp simd
                        for (int j = 0; j < split; ++j)
                            drow[j] = xrow[j] - arow[j + shift];
#pragma omp simd
                        for (int j = split; j < W; ++j)
                            drow[j] = xrow[j] - arow[j + shift - W];
                    }
                double dsums[NL] = {0.0};
                block_sums(diff, count, &g, diff, tap, 0, tail, first, last, dsums, unused);
                for (int l = 0; l < n_lags; ++l)
                    out_diff[slot * n_lags + l] += dsums[l];
            }
        }
        bc += count;
    }
    free(filtered);
    free(col_off);
    free(nbr);
    return 0;
}

#ifdef _OPENMP
#include <omp.h>

/* shiftlab_bilinear over all (image, channel) pairs, split over n_threads OpenMP threads. Built
   against the OpenMP runtime PyTorch has loaded (libgomp.so.1), this is PyTorch's own thread
   pool, whose workers would otherwise spin on the cores after each convolution. */
int shiftlab_bilinear_parallel(const float *ref, const float *shifted, long stride_s,
                               long stride_b, int n_shifts, int n_images, int channels, int H,
                               int W, int n_threads, int n_lags, const int *lags_in,
                               const int *mode, const int *roll, const int *row_start,
                               const int *row_count, const int *row_off, const double *row_w,
                               const int *col_set, int n_sets, const int *set_start,
                               const int *set_count, const int *col_off_in, const float *col_w,
                               double *out_lags, double *out_diff, double *out_cross)
{
    int units = n_images * channels, status = 0;
    long n_sums = (long)n_shifts * n_images * n_lags, n_slots = (long)n_shifts * n_images;
#pragma omp parallel num_threads(n_threads) reduction(| : status)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int first = (int)((long)units * t / n), last = (int)((long)units * (t + 1) / n);
        double *mine = (double *)calloc(2 * n_sums + n_slots + 1, sizeof(double));
        if (!mine) {
            status |= 1;
        } else {
            status |= shiftlab_bilinear(ref, shifted, stride_s, stride_b, n_shifts, n_images,
                                        channels, H, W, first, last, n_lags, lags_in, mode, roll,
                                        row_start, row_count, row_off, row_w, col_set, n_sets,
                                        set_start, set_count, col_off_in, col_w, mine,
                                        mine + n_sums, mine + 2 * n_sums) != 0;
#pragma omp critical
            {
                for (long k = 0; k < n_sums; ++k) {
                    out_lags[k] += mine[k];
                    out_diff[k] += mine[n_sums + k];
                }
                for (long k = 0; k < n_slots; ++k)
                    out_cross[k] += mine[2 * n_sums + k];
            }
            free(mine);
        }
    }
    return status ? -1 : 0;
}
#endif

/* The exact and Fourier alignments' comparison in one read of each shifted map: for every
   (shift s, image b), over the (image, channel) pairs [first_bc, last_bc),
     out_sq[s][b]   += sum x^2
     out_diff[s][b] += sum (x - roll(a, (qh_s, qw_s)))^2
   with x the shifted map and a the reference (already shifted by a fraction, for Fourier), whose
   image, channel and row strides are ref_b, ref_c, ref_row (a Fourier source is a slice of a
   wider matrix product): row by row, each in two runs (planes of at least a few hundred values:
   see align.py). */
int shiftlab_difference(const float *ref, const float *shifted, long stride_s, long stride_b,
                        int n_shifts, int n_images, int channels, int H, int W, int first_bc,
                        int last_bc, long ref_b, long ref_c, long ref_row, const int *index,
                        const int *roll, double *out_sq, double *out_diff)
{
    long plane = (long)H * W;
    for (int bc = first_bc; bc < last_bc; ++bc) {
        int b = bc / channels, c = bc % channels;
        const float *a = ref + b * ref_b + c * ref_c;
        for (int s = 0; s < n_shifts; ++s) {
            const float *x = shifted + index[s] * stride_s + b * stride_b + (long)c * plane;
            int qh = wrap(roll[2 * s], H), qw = wrap(roll[2 * s + 1], W);
            double sq = 0.0, diff = 0.0;
            for (int i = 0; i < H; ++i) {
                /* row i of roll(a, q) is row i - qh of a, its columns rolled by qw: two runs */
                const float *xrow = x + (long)i * W, *arow = a + wrap(i - qh, H) * ref_row;
                float part_sq = 0.0f, part_diff = 0.0f;
#pragma omp simd reduction(+ : part_sq, part_diff)
                for (int j = 0; j < qw; ++j) {
                    float d = xrow[j] - arow[j - qw + W];
                    part_sq += xrow[j] * xrow[j];
                    part_diff += d * d;
                }
#pragma omp simd reduction(+ : part_sq, part_diff)
                for (int j = qw; j < W; ++j) {
                    float d = xrow[j] - arow[j - qw];
                    part_sq += xrow[j] * xrow[j];
                    part_diff += d * d;
                }
                sq += (double)part_sq;
                diff += (double)part_diff;
            }
            out_sq[(long)s * n_images + b] += sq;
            out_diff[(long)s * n_images + b] += diff;
        }
    }
    return 0;
}

#ifdef _OPENMP
int shiftlab_difference_parallel(const float *ref, const float *shifted, long stride_s,
                                 long stride_b, int n_shifts, int n_images, int channels, int H,
                                 int W, int n_threads, long ref_b, long ref_c, long ref_row,
                                 const int *index, const int *roll, double *out_sq,
                                 double *out_diff)
{
    int units = n_images * channels, status = 0;
    long n_slots = (long)n_shifts * n_images;
#pragma omp parallel num_threads(n_threads) reduction(| : status)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int first = (int)((long)units * t / n), last = (int)((long)units * (t + 1) / n);
        double *mine = (double *)calloc(2 * n_slots + 1, sizeof(double));
        if (!mine) {
            status |= 1;
        } else {
            shiftlab_difference(ref, shifted, stride_s, stride_b, n_shifts, n_images, channels,
                                H, W, first, last, ref_b, ref_c, ref_row, index, roll, mine,
                                mine + n_slots);
#pragma omp critical
            for (long k = 0; k < n_slots; ++k) {
                out_sq[k] += mine[k];
                out_diff[k] += mine[n_slots + k];
            }
            free(mine);
        }
    }
    return status ? -1 : 0;
}
#endif
