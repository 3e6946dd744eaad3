/* The two per-pixel passes of classification in compiled code (loaded with ctypes by
 * dials_cnn.projection and dials_cnn.lcn; built by tools/ensure_env.sh). Each is the arithmetic of
 * the numpy / torch code it replaces, which stays as the fallback and the tests' comparison.
 *
 * clean_cut_i32: a cut of a single-panel image as dials_cnn.projection flattens it: float32 values,
 * valid where above the lower trusted value and in the static mask, clipped to [0, upper], 0 where
 * not valid; one pass instead of six.
 *
 * block_lcn_max: dials_cnn.lcn.block_lcn_torch in one pass over the native pixels:
 *   deviation d = x - mean(x); per b x b block: sum d, sum d^2, max d; std = max(sqrt(mean d^2), min_std);
 *   z-scored block means m = sum d / (b^2 std), q = sum d^2 / (b^2 std^2);
 *   local mean / square = mean of m / q over window x window blocks (reflect padding by blocks);
 *   out = (max d / std - local mean) / max(sqrt(local square - local mean^2), std_floor).
 * The block pass is in single precision like the torch code; the windows in double precision.
 * Blocks of one row are independent accumulators, so the compiler vectorises across them without
 * reordering any sum. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* dials_cnn.native uses this library only if it implements the interface it expects */
const int dials_cnn_native_version = 2;

static long mirror(long i, long n)
{
    if (i < 0)
        return -i;
    if (i >= n)
        return 2 * (n - 1) - i;
    return i;
}

/* Sums over `window` consecutive elements of one row of `cols` values (times `scale`) with reflect
 * padding, as running sums, for the same row of two arrays at once (two independent chains of
 * additions); `line` is scratch of 2 (cols + window) doubles. */
static void box_row_pair(const float *in_a, const float *in_b, double scale_a, double scale_b, long cols,
                         int window, double *line, double *out_a, double *out_b)
{
    long half = window / 2, padded = cols + 2 * half;
    double *la = line, *lb = line + padded;
    for (long k = 0; k < padded; k++) {
        long i = mirror(k - half, cols);
        la[k] = in_a[i] * scale_a;
        lb[k] = in_b[i] * scale_b;
    }
    double sa = 0.0, sb = 0.0;
    for (long k = 0; k < window; k++) {
        sa += la[k];
        sb += lb[k];
    }
    out_a[0] = sa;
    out_b[0] = sb;
    for (long c = 1; c < cols; c++) {
        sa += la[c + window - 1] - la[c - 1];
        sb += lb[c + window - 1] - lb[c - 1];
        out_a[c] = sa;
        out_b[c] = sb;
    }
}

/* The row sums of the blocks' rows (of the block means and of the block squares), each row computed
 * once, kept in a ring of `slots` rows: the column window reads each row twice, always among the last
 * `slots` rows it asked for. */
typedef struct {
    const float *means, *squares;
    double scale_means, scale_squares, *rows, *line;
    long cols, slots, *held;
    int window;
} RowSums;

/* The row sums of row `row`: means at out[0], squares at out[1]. */
static void row_sums(RowSums *sums, long row, const double *out[2])
{
    long slot = row % sums->slots;
    double *a = sums->rows + 2 * slot * sums->cols, *b = a + sums->cols;
    if (sums->held[slot] != row) {
        box_row_pair(sums->means + row * sums->cols, sums->squares + row * sums->cols, sums->scale_means,
                     sums->scale_squares, sums->cols, sums->window, sums->line, a, b);
        sums->held[slot] = row;
    }
    out[0] = a;
    out[1] = b;
}

/* image: height x width float32 with rows `row_stride` floats apart; out: (height / block) x
 * (width / block) float32. Returns 0, or -1 if memory ran out.
 * The window sums are running sums along rows, then down columns (row r: the sum of rows r - 1,
 * plus row r + half, minus row r - half - 1), one row of blocks at a time: what they read stays in
 * cache. */
int block_lcn_max(const float *image, long height, long width, long row_stride, int block, int window,
                  double min_std, double std_floor, float *out)
{
    long gh = height / block, gw = width / block, cells = gh * gw, half = window / 2;
    long slots = 2 * (long)window + 2; /* rows r - half - 1 .. r + half, and their mirrors, fit */
    float *first = malloc(sizeof(float) * 3 * cells);
    double *scratch = malloc(sizeof(double) * (2 * slots * gw + 2 * gw + 2 * (gw + 2 * window)));
    long *held = malloc(sizeof(long) * slots);
    if (!first || !scratch || !held) {
        free(first);
        free(scratch);
        free(held);
        return -1;
    }
    float *second = first + cells, *peak = second + cells;

    /* eight partial sums: independent additions instead of one chain through every pixel */
    double partial[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0}, total = 0.0;
    for (long y = 0; y < height; y++) {
        const float *row = image + y * row_stride;
        long x = 0;
        for (; x + 8 <= width; x += 8)
            for (int k = 0; k < 8; k++)
                partial[k] += row[x + k];
        for (; x < width; x++)
            partial[0] += row[x];
    }
    for (int k = 0; k < 8; k++)
        total += partial[k];
    const double mean = total / ((double)height * width);

    /* the block pass in single precision, as the torch code (sums of block^2 deviations) */
    const float mean_f = (float)mean;
    double sum_squares = 0.0;
    for (long by = 0; by < gh; by++) {
        float *f = first + by * gw, *s = second + by * gw, *p = peak + by * gw;
        for (long bx = 0; bx < gw; bx++) {
            f[bx] = 0.0f;
            s[bx] = 0.0f;
            p[bx] = -INFINITY;
        }
        for (int dy = 0; dy < block; dy++) {
            const float *row = image + (by * block + dy) * row_stride;
            if (block == 2) {
                for (long bx = 0; bx < gw; bx++) {
                    float a = row[2 * bx] - mean_f, b = row[2 * bx + 1] - mean_f;
                    f[bx] += a + b;
                    s[bx] += a * a + b * b;
                    float m = a > b ? a : b;
                    p[bx] = p[bx] > m ? p[bx] : m;
                }
            } else {
                for (long bx = 0; bx < gw; bx++) {
                    for (int dx = 0; dx < block; dx++) {
                        float a = row[bx * block + dx] - mean_f;
                        f[bx] += a;
                        s[bx] += a * a;
                        p[bx] = p[bx] > a ? p[bx] : a;
                    }
                }
            }
        }
        double row_squares = 0.0;
        for (long bx = 0; bx < gw; bx++)
            row_squares += s[bx];
        sum_squares += row_squares;
    }
    double std = sqrt(sum_squares / ((double)height * width));
    if (!(std > 0.0))
        std = 1.0;
    if (std < min_std)
        std = min_std;
    const double n = (double)block * block;
    double *local_mean = scratch + 2 * slots * gw, *local_square = local_mean + gw, *line = local_square + gw;
    RowSums sums = {first, second, 1.0 / (n * std), 1.0 / (n * std * std), scratch, line, gw, slots, held, window};
    for (long k = 0; k < slots; k++)
        held[k] = -1;

    const double inverse_area = 1.0 / ((double)window * window), inverse_std = 1.0 / std;
    for (long r = 0; r < gh; r++) {
        if (r == 0) {
            for (long c = 0; c < gw; c++)
                local_mean[c] = local_square[c] = 0.0;
            for (long k = -half; k <= half; k++) {
                const double *row[2];
                row_sums(&sums, mirror(k, gh), row);
                for (long c = 0; c < gw; c++) {
                    local_mean[c] += row[0][c];
                    local_square[c] += row[1][c];
                }
            }
        } else {
            const double *add[2], *sub[2];
            row_sums(&sums, mirror(r + half, gh), add);
            row_sums(&sums, mirror(r - half - 1, gh), sub);
            for (long c = 0; c < gw; c++) {
                local_mean[c] = local_mean[c] + add[0][c] - sub[0][c];
                local_square[c] = local_square[c] + add[1][c] - sub[1][c];
            }
        }
        const float *p = peak + r * gw;
        float *o = out + r * gw;
        for (long c = 0; c < gw; c++) {
            double m = local_mean[c] * inverse_area;
            double var = local_square[c] * inverse_area - m * m;
            double sd = sqrt(var > 0.0 ? var : 0.0);
            sd = sd < std_floor ? std_floor : sd;
            o[c] = (float)((p[c] * inverse_std - m) / sd);
        }
    }
    free(first);
    free(scratch);
    free(held);
    return 0;
}

/* values: rows x cols int32, rows `row_stride` elements apart; mask: uint8 (0 = masked) with rows
 * `mask_stride` apart, or NULL; data: float32 and ok: uint8, both rows x cols contiguous. */
void clean_cut_i32(const int32_t *values, long rows, long cols, long row_stride, const uint8_t *mask,
                   long mask_stride, float low, float high, float *data, uint8_t *ok)
{
    for (long r = 0; r < rows; r++) {
        const int32_t *restrict v = values + r * row_stride;
        float *restrict d = data + r * cols;
        uint8_t *restrict o = ok + r * cols;
        /* branch-free, so that the compiler vectorises it */
        for (long c = 0; c < cols; c++) {
            float x = (float)v[c];
            float y = x > 0.0f ? x : 0.0f;
            y = y < high ? y : high;
            int valid = x > low;
            d[c] = valid ? y : 0.0f;
            o[c] = (uint8_t)valid;
        }
        if (mask) {
            const uint8_t *restrict m = mask + r * mask_stride;
            for (long c = 0; c < cols; c++) {
                uint8_t keep = o[c] & m[c];
                o[c] = keep;
                d[c] = keep ? d[c] : 0.0f;
            }
        }
    }
}
