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

/* Sums over `window` consecutive elements with reflect padding, along the rows of a rows x cols
 * array: running sums, four rows at a time (four independent chains of additions); `line` is
 * scratch of 4 (cols + window) doubles. */
static void box_rows(const double *in, double *out, long rows, long cols, int window, double *line)
{
    long half = window / 2, padded = cols + 2 * half;
    for (long r0 = 0; r0 < rows; r0 += 4) {
        int n = rows - r0 < 4 ? (int)(rows - r0) : 4;
        double sum[4] = {0.0, 0.0, 0.0, 0.0};
        for (int j = 0; j < n; j++) {
            const double *row = in + (r0 + j) * cols;
            double *l = line + j * padded;
            for (long k = 0; k < padded; k++)
                l[k] = row[mirror(k - half, cols)];
            for (long k = 0; k < window; k++)
                sum[j] += l[k];
            out[(r0 + j) * cols] = sum[j];
        }
        if (n == 4) {
            const double *l0 = line, *l1 = line + padded, *l2 = line + 2 * padded, *l3 = line + 3 * padded;
            double *o0 = out + r0 * cols, *o1 = o0 + cols, *o2 = o1 + cols, *o3 = o2 + cols;
            double s0 = sum[0], s1 = sum[1], s2 = sum[2], s3 = sum[3];
            for (long c = 1; c < cols; c++) {
                s0 += l0[c + window - 1] - l0[c - 1];
                s1 += l1[c + window - 1] - l1[c - 1];
                s2 += l2[c + window - 1] - l2[c - 1];
                s3 += l3[c + window - 1] - l3[c - 1];
                o0[c] = s0;
                o1[c] = s1;
                o2[c] = s2;
                o3[c] = s3;
            }
        } else {
            for (int j = 0; j < n; j++) {
                const double *l = line + j * padded;
                double *o = out + (r0 + j) * cols, sj = sum[j];
                for (long c = 1; c < cols; c++) {
                    sj += l[c + window - 1] - l[c - 1];
                    o[c] = sj;
                }
            }
        }
    }
}

/* The same along columns, all columns of a row at once (vectorisable). */
static void box_cols(const double *in, double *out, long rows, long cols, int window)
{
    long half = window / 2;
    memset(out, 0, sizeof(double) * cols);
    for (long k = -half; k <= half; k++) {
        const double *src = in + mirror(k, rows) * cols;
        for (long c = 0; c < cols; c++)
            out[c] += src[c];
    }
    for (long r = 1; r < rows; r++) {
        const double *add = in + mirror(r + half, rows) * cols;
        const double *sub = in + mirror(r - half - 1, rows) * cols;
        const double *prev = out + (r - 1) * cols;
        double *o = out + r * cols;
        for (long c = 0; c < cols; c++)
            o[c] = prev[c] + add[c] - sub[c];
    }
}

/* image: height x width float32 with rows `row_stride` floats apart; out: (height / block) x
 * (width / block) float32. Returns 0, or -1 if memory ran out. */
int block_lcn_max(const float *image, long height, long width, long row_stride, int block, int window,
                  double min_std, double std_floor, float *out)
{
    long gh = height / block, gw = width / block, cells = gh * gw;
    double *first = malloc(sizeof(double) * (6 * cells + 4 * (gw + 2 * window)));
    if (!first)
        return -1;
    double *second = first + cells, *peak = second + cells, *tmp = peak + cells;
    double *local_mean = tmp + cells, *local_square = local_mean + cells, *line = local_square + cells;

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
    float *f = (float *)tmp, *s = f + gw, *p = s + gw; /* one row of blocks; tmp is free until the windows */
    for (long by = 0; by < gh; by++) {
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
        for (long bx = 0; bx < gw; bx++) {
            first[by * gw + bx] = f[bx];
            second[by * gw + bx] = s[bx];
            peak[by * gw + bx] = p[bx];
            row_squares += s[bx];
        }
        sum_squares += row_squares;
    }
    double std = sqrt(sum_squares / ((double)height * width));
    if (!(std > 0.0))
        std = 1.0;
    if (std < min_std)
        std = min_std;
    const double n = (double)block * block, scale_first = 1.0 / (n * std), scale_second = 1.0 / (n * std * std);
    for (long i = 0; i < cells; i++) {
        first[i] *= scale_first;
        second[i] *= scale_second;
    }
    const double inverse_area = 1.0 / ((double)window * window), inverse_std = 1.0 / std;
    box_rows(first, tmp, gh, gw, window, line);
    box_cols(tmp, local_mean, gh, gw, window);
    box_rows(second, tmp, gh, gw, window, line);
    box_cols(tmp, local_square, gh, gw, window);
    for (long i = 0; i < cells; i++) {
        double m = local_mean[i] * inverse_area;
        double var = local_square[i] * inverse_area - m * m;
        double sd = sqrt(var > 0.0 ? var : 0.0);
        sd = sd < std_floor ? std_floor : sd;
        out[i] = (float)((peak[i] * inverse_std - m) / sd);
    }
    free(first);
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
