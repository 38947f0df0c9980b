/* The circular bilinear comparison in one read of each shifted map (see shiftlab/native.py).

   For every (shift s, image b) of a chunk it returns, summed over channels, rows and columns:
     lags[s][b][l]  = sum x[i][j] * x[(i + lh) % H][(j + lw) % W]     x = the shifted map
     diff[s][b][l]  = the same for d = x - roll(a, (qh, qw))           exact shifts only
     cross[s][b]    = sum_t wr_t sum g_k[(i + or_t) % H][j] * x[i][j]  inexact shifts only
   where a is the image's reference map and g_k[i][j] = sum_u wc_u a[i][(j + oc_u) % W] is the
   reference filtered by the shift's column taps (set k, built once per channel and shared by
   the shifts of the chunk that use it). The caller turns lag sums into quadratic forms.

   A 2-D circular lag (l_h, l_w) of an h x w plane is the flat lag l_h * w + l_w of the plane
   seen as one vector, except in the |l_w| columns that wrap, where the flat partner sits one
   row off: a small correction. So the five lag sums of the 3-tap norm and the (up to four)
   row taps of the cross term are one vectorised pass over the shifted plane (fused_pass),
   with nine accumulators: each shifted value is loaded once.

   Work is split by (image, channel) ranges: the caller runs one call per thread (ctypes drops
   the GIL), each with its own output arrays, and adds them. A channel of the reference, its
   filtered copies and one shifted channel stay in the CPU cache while all of the chunk's shifts
   go by, so each shifted map is read from memory once. Row sums are float (vectorised), summed
   in double. No OpenMP runtime: only `omp simd` hints (-fopenmp-simd). */
#include <stdlib.h>
#include <string.h>

#define BLOCK 4096 /* float partial sums over at most this many products, then double */
#define LANES 64    /* independent float accumulators: a single one would wait on each add */

static double dot(const float *restrict x, const float *restrict y, long n)
{
    double total = 0.0;
    for (long start = 0; start < n; start += BLOCK) {
        long stop = start + BLOCK < n ? start + BLOCK : n, k = start;
        float acc[LANES] = {0.0f}, part = 0.0f;
        for (; k + LANES <= stop; k += LANES)
            for (int l = 0; l < LANES; ++l)
                acc[l] += x[k + l] * y[k + l];
        for (; k < stop; ++k)
            part += x[k] * y[k];
        for (int width = LANES / 2; width > 0; width /= 2) /* a tree: vector adds */
            for (int l = 0; l < width; ++l)
                acc[l] += acc[l + width];
        part += acc[0];
        total += (double)part;
    }
    return total;
}

static int wrap(int i, int n)
{
    i %= n;
    return i < 0 ? i + n : i;
}

#define NL 5 /* lag sums per pass: the 3-tap norm has five distinct lags */
#define NT 4 /* row taps per pass: the cross filter has at most four per axis */
#define VEC 16

/* over n in [0, count): sums[l] += x[n] * y[n + lag[l]], cross[t] += x[n] * f[n + tap[t]] */
static void fused_pass(const float *restrict x, const float *restrict y, const long *lag,
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
    int lh[NL], lw[NL]; /* lw in (-W/2, W/2], flat lag lh * W + lw >= 0 */
    long flat[NL], reach; /* reach: the largest flat lag */
    int unit_columns;     /* every |lw| <= 1 */
} Lags;

/* sums[l] += sum_{i,j} x[i][j] x[(i + lh) % H][(j + lw) % W] for the lags, and
   cross[t] += sum_i f[(i + o_t) % H] . x[i] for the row taps: f is the filtered reference
   with `margin` wrapped rows before and after it (f_ext + margin * W is its row 0), tap[t] =
   o_t * W with |o_t| <= margin. `tail` is scratch of 2 * reach floats, `first` and `last` of
   H + 2 floats each. */
static void plane_sums(const float *x, const Lags *g, const float *f_ext, int margin,
                       const long *tap, float *tail, float *first, float *last, double *sums,
                       double *cross)
{
    long size = (long)g->H * g->W, reach = g->reach < size ? g->reach : size;
    const float *f = f_ext + (long)margin * g->W;
    /* the flat lags that stay inside the plane, then the last `reach` values against a
       copy of the end and the start of the plane */
    fused_pass(x, x, g->flat, f, tap, size - reach, sums, cross);
    memcpy(tail, x + size - reach, sizeof(float) * reach);
    memcpy(tail + reach, x, sizeof(float) * reach);
    fused_pass(tail, tail, g->flat, f + size - reach, tap, reach, sums, cross);
    int H = g->H, W = g->W;
    if (g->unit_columns) {
        /* every column lag is -1, 0 or 1: the wrapping column of each row, read once into
           short arrays with two rows of wrap-around, makes each correction a short dot */
        for (int i = 0; i < H + 2; ++i) {
            int row = i < H ? i : i - H;
            first[i] = x[(long)row * W];
            last[i] = x[(long)row * W + W - 1];
        }
        for (int l = 0; l < g->n_lags; ++l) {
            int lh = g->lh[l], lw = g->lw[l];
            if (!lw)
                continue;
            /* lw = 1: column W - 1 of row i was paired with column 0 of row i + lh + 1
               instead of row i + lh; lw = -1: column 0 of row i with column W - 1 of row
               i + lh - 1 instead of i + lh (lh >= 1 then) */
            const float *own = lw > 0 ? last : first, *other = lw > 0 ? first : last;
            int good = lh % H, bad = lw > 0 ? (lh + 1) % H : (lh + H - 1) % H;
            float part = 0.0f;
            for (int i = 0; i < H; ++i)
                part += own[i] * (other[good + i] - other[bad + i]);
            sums[l] += (double)part;
        }
        return;
    }
    for (int l = 0; l < g->n_lags; ++l) {
        /* the wrapping columns: the flat lag paired them with the row after (lw > 0) or
           before (lw < 0) the right one */
        int lh = g->lh[l], lw = g->lw[l];
        if (!lw)
            continue;
        int right = lh % H, wrong = lw > 0 ? (lh + 1) % H : (lh + H - 1) % H; /* rows, for i = 0 */
        int width = lw > 0 ? lw : -lw, from = lw > 0 ? W - lw : 0, to = lw > 0 ? 0 : W + lw;
        float part = 0.0f;
        for (int i = 0; i < H; ++i) {
            const float *row = x + (long)i * W + from;
            const float *good = x + (long)right * W + to, *bad = x + (long)wrong * W + to;
            for (int j = 0; j < width; ++j)
                part += row[j] * (good[j] - bad[j]);
            right = right + 1 == H ? 0 : right + 1;
            wrong = wrong + 1 == H ? 0 : wrong + 1;
        }
        sums[l] += (double)part;
    }
}

/* out = sum_u w_u a[i][(j + o_u) % W] over an h x w plane, o_u in (-W/2, W/2] */
static void filter_columns(float *restrict out, const float *restrict a, int H, int W,
                           int n_taps, const int *offsets, const float *weights)
{
    long size = (long)H * W;
    memset(out, 0, sizeof(float) * size);
    for (int u = 0; u < n_taps; ++u) {
        long k = wrap(offsets[u], (int)size); /* flat: out[n] += w a[(n + o) % size] */
        float w = weights[u];
#pragma omp simd
        for (long n = 0; n < size - k; ++n)
            out[n] += w * a[n + k];
#pragma omp simd
        for (long n = size - k; n < size; ++n)
            out[n] += w * a[n + k - size];
        int o = offsets[u];
        for (int i = 0; i < H && o; ++i) {
            /* the o wrapping columns of row i took their value from the next (o > 0) or the
               previous (o < 0) row */
            float *row = out + (long)i * W;
            const float *right = a + (long)i * W;
            if (o > 0) {
                const float *wrong = a + (long)((i + 1) % H) * W;
                for (int j = W - o; j < W; ++j)
                    row[j] += w * (right[j + o - W] - wrong[j + o - W]);
            } else {
                const float *wrong = a + (long)((i + H - 1) % H) * W;
                for (int j = 0; j < -o; ++j)
                    row[j] += w * (right[j + o + W] - wrong[j + o + W]);
            }
        }
    }
}

static int shortest(int offset, int n)
{
    offset = wrap(offset, n);
    return offset > n / 2 ? offset - n : offset;
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
        g.unit_columns &= lw >= -1 && lw <= 1;
    }
    int total_taps = n_sets ? set_start[n_sets - 1] + set_count[n_sets - 1] : 0;
    int total_rows = n_shifts ? row_start[n_shifts - 1] + row_count[n_shifts - 1] : 0;
    int margin = 0;
    for (int t = 0; t < total_rows; ++t) {
        int o = abs(shortest(row_off[t], H));
        margin = o > margin ? o : margin;
    }
    long extended = (long)(H + 2 * margin) * W;
    /* channels per block: their filtered references fill about half of a 1 MiB L2 cache */
    int block = n_sets ? (int)((1L << 19) / ((long)sizeof(float) * extended * n_sets)) : 64;
    block = block < 1 ? 1 : block;
    int *col_off = (int *)malloc(sizeof(int) * (total_taps + 1));
    float *filtered = (float *)malloc(sizeof(float) * (extended * n_sets * block + 2 * plane +
                                                       2 * g.reach + 2 * (H + 2) + 1));
    /* a pass without taps reads the plane itself as its f (tap 0), the results unused */
    if (!col_off || !filtered) {
        free(col_off);
        free(filtered);
        return -1;
    }
    float *diff = filtered + extended * n_sets * block, *tail = diff + plane;
    float *first = tail + 2 * g.reach, *last = first + H + 2;
    for (int u = 0; u < total_taps; ++u)
        col_off[u] = shortest(col_off_in[u], W);
    double unused[NT];
    for (int bc = first_bc; bc < last_bc;) {
        /* a block of channels of one image: every shift streams through the block's planes,
           which lie side by side in memory, while the block's filtered references stay in the
           cache */
        int b = bc / channels, c0 = bc % channels, count = block;
        count = count < channels - c0 ? count : channels - c0;
        count = count < last_bc - bc ? count : last_bc - bc;
        for (int ci = 0; ci < count; ++ci)
            for (int k = 0; k < n_sets; ++k) {
                float *f = filtered + ((long)ci * n_sets + k) * extended;
                filter_columns(f + (long)margin * W, ref + ((long)b * channels + c0 + ci) * plane,
                               H, W, set_count[k], col_off + set_start[k], col_w + set_start[k]);
                /* margin <= H / 2: the wrapped rows before and after */
                memcpy(f, f + (long)H * W, sizeof(float) * margin * W);
                memcpy(f + (long)(H + margin) * W, f + (long)margin * W, sizeof(float) * margin * W);
            }
        for (int s = 0; s < n_shifts; ++s) {
            long slot = (long)s * n_images + b;
            for (int ci = 0; ci < count; ++ci) {
                int c = c0 + ci;
                const float *a = ref + ((long)b * channels + c) * plane;
                const float *x = shifted + s * stride_s + b * stride_b + (long)c * plane;
                /* the next plane of the walk, while this one is worked on */
                const float *next = ci + 1 < count ? x + plane
                                    : s + 1 < n_shifts ? x + stride_s - (long)ci * plane : NULL;
                for (long k = 0; next && k < plane; k += 16)
                    __builtin_prefetch(next + k);
                double sums[NL] = {0.0}, cross[NT] = {0.0};
                long tap[NT] = {0};
                if (mode[s] == 0 && row_count[s] > 0) {
                    const float *f = filtered + ((long)ci * n_sets + col_set[s]) * extended;
                    double total = 0.0, spare[NL];
                    for (int first_tap = row_start[s]; first_tap < row_start[s] + row_count[s];
                         first_tap += NT) {
                        int taps = row_start[s] + row_count[s] - first_tap;
                        taps = taps < NT ? taps : NT;
                        for (int t = 0; t < NT; ++t)
                            tap[t] = t < taps ? (long)shortest(row_off[first_tap + t], H) * W : 0;
                        /* more than NT taps: further passes, their lag sums unused */
                        plane_sums(x, &g, f, margin, tap, tail, first, last,
                                   first_tap == row_start[s] ? sums : spare, cross);
                        for (int t = 0; t < taps; ++t)
                            total += row_w[first_tap + t] * cross[t];
                        memset(cross, 0, sizeof(cross));
                    }
                    out_cross[slot] += total;
                } else {
                    plane_sums(x, &g, x, 0, tap, tail, first, last, sums, unused);
                }
                for (int l = 0; l < n_lags; ++l)
                    out_lags[slot * n_lags + l] += sums[l];
                if (mode[s] == 1) { /* exact: d = x - roll(a, (qh, qw)) */
                    int qh = roll[2 * s], qw = roll[2 * s + 1];
                    int shift = wrap(-qw, W), split = W - shift; /* d[j] = x[j] - a[(j + shift) % W] */
                    for (int i = 0; i < H; ++i) {
                        const float *arow = a + (long)wrap(i - qh, H) * W, *xrow = x + (long)i * W;
                        float *drow = diff + (long)i * W;
#pragma omp simd
                        for (int j = 0; j < split; ++j)
                            drow[j] = xrow[j] - arow[j + shift];
#pragma omp simd
                        for (int j = split; j < W; ++j)
                            drow[j] = xrow[j] - arow[j + shift - W];
                    }
                    double dsums[NL] = {0.0};
                    plane_sums(diff, &g, diff, 0, tap, tail, first, last, dsums, unused);
                    for (int l = 0; l < n_lags; ++l)
                        out_diff[slot * n_lags + l] += dsums[l];
                }
            }
        }
        bc += count;
    }
    free(filtered);
    free(col_off);
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
