"""The CUDA kernels behind :class:`xpnn.ops.cupy_ops.CupyOps`.

Each is a ``cupy.ElementwiseKernel`` or ``cupy.ReductionKernel``: defined here
at import, compiled on first use and cached on disk by CuPy. The window kernels
work on two spatial axes, with the batch and channel axes flattened into one
leading index; every other kernel is elementwise over broadcast operands of
one dtype ``T``.
"""
import cupy

WINDOW_PARAMS = ("int32 height, int32 width, int32 kernel_h, int32 kernel_w, int32 out_h, "
                  "int32 out_w, int32 stride_y, int32 stride_x, int32 pad_y, int32 pad_x")

# windows[lead, k, oh, ow] = padded x[lead, oh*sy + k // kw, ow*sx + k % kw]
EXTRACT_WINDOWS = cupy.ElementwiseKernel(
    "raw T x, " + WINDOW_PARAMS, "T windows",
    """
    const int ow = i % out_w;
    const int oh = (i / out_w) % out_h;
    const int k = (i / ((ptrdiff_t)out_w * out_h)) % (kernel_h * kernel_w);
    const ptrdiff_t lead = i / ((ptrdiff_t)out_w * out_h * kernel_h * kernel_w);
    const int row = oh * stride_y + k / kernel_w - pad_y;
    const int col = ow * stride_x + k % kernel_w - pad_x;
    windows = (row >= 0 && row < height && col >= 0 && col < width)
        ? x[(lead * height + row) * width + col] : (T)0;
    """, "xpnn_extract_windows_2d")

# The adjoint as a gather: each input pixel adds the window entries it was
# copied to, kernel offsets in row-major order, which is the order in which
# the generic ``+=`` loop adds them (so the sums are bit for bit the same).
ACCUMULATE_WINDOWS = cupy.ElementwiseKernel(
    "raw T windows, " + WINDOW_PARAMS, "T image",
    """
    const int col = i % width;
    const int row = (i / width) % height;
    const ptrdiff_t lead = i / ((ptrdiff_t)width * height);
    const ptrdiff_t window_size = (ptrdiff_t)kernel_h * kernel_w;
    T total = 0;
    for (int ky = 0; ky < kernel_h; ++ky) {
        const int y = row + pad_y - ky;
        if (y < 0 || y % stride_y != 0 || y / stride_y >= out_h) continue;
        for (int kx = 0; kx < kernel_w; ++kx) {
            const int x = col + pad_x - kx;
            if (x < 0 || x % stride_x != 0 || x / stride_x >= out_w) continue;
            total += windows[((lead * window_size + ky * kernel_w + kx) * out_h + y / stride_y)
                             * out_w + x / stride_x];
        }
    }
    image = total;
    """, "xpnn_accumulate_windows_2d")

# Maximum of each window and the offset of its first maximum (a NaN wins, and
# the first NaN is kept, as max and argmax do).
MAX_POOL = cupy.ElementwiseKernel(
    "raw T x, " + WINDOW_PARAMS, "T output, int64 first_max",
    """
    const int ow = i % out_w;
    const int oh = (i / out_w) % out_h;
    const ptrdiff_t lead = i / ((ptrdiff_t)out_w * out_h);
    const ptrdiff_t corner = (lead * height + oh * stride_y) * width + ow * stride_x;
    T best = x[corner];
    long long best_offset = 0;
    for (int ky = 0; ky < kernel_h; ++ky) {
        for (int kx = 0; kx < kernel_w; ++kx) {
            const T value = x[corner + (ptrdiff_t)ky * width + kx];
            if (!isnan(best) && (value > best || isnan(value))) {
                best = value;
                best_offset = ky * kernel_w + kx;
            }
        }
    }
    output = best;
    first_max = best_offset;
    """, "xpnn_max_pool_2d")

MAX_POOL_BACKWARD = cupy.ElementwiseKernel(
    "raw T error, raw int64 first_max, " + WINDOW_PARAMS, "T gradient",
    """
    const int col = i % width;
    const int row = (i / width) % height;
    const ptrdiff_t lead = i / ((ptrdiff_t)width * height);
    T total = 0;
    for (int ky = 0; ky < kernel_h; ++ky) {
        const int y = row - ky;
        if (y < 0 || y % stride_y != 0 || y / stride_y >= out_h) continue;
        for (int kx = 0; kx < kernel_w; ++kx) {
            const int x = col - kx;
            if (x < 0 || x % stride_x != 0 || x / stride_x >= out_w) continue;
            const ptrdiff_t window = (lead * out_h + y / stride_y) * out_w + x / stride_x;
            if (first_max[window] == ky * kernel_w + kx) total += error[window];
        }
    }
    gradient = total;
    """, "xpnn_max_pool_backward_2d")

RELU = cupy.ElementwiseKernel(
    "T x", "T output, bool mask",
    "mask = x > (T)0; output = mask ? x : (T)0;", "xpnn_relu")

CENTERED_SQUARES = cupy.ReductionKernel(
    "T x, T mean", "T total", "(x - mean) * (x - mean)", "a + b", "total = a", "0",
    "xpnn_centered_squares")

PRODUCT_SUM = cupy.ReductionKernel(
    "T a_in, T b_in", "T total", "a_in * b_in", "a + b", "total = a", "0", "xpnn_product_sum")

VARIANCE = cupy.ElementwiseKernel(
    "T squares, T count, T eps", "T variance, T inverse_std",
    "variance = squares / count; inverse_std = (T)1 / sqrt(variance + eps);", "xpnn_variance")

INVERSE_STD = cupy.ElementwiseKernel(
    "T variance, T eps", "T inverse_std", "inverse_std = (T)1 / sqrt(variance + eps);",
    "xpnn_inverse_std")

NORMALIZE = cupy.ElementwiseKernel(
    "T x, T mean, T inverse_std, T gamma, T beta", "T normalized, T output",
    "normalized = (x - mean) * inverse_std; output = gamma * normalized + beta;",
    "xpnn_batch_norm_normalize")

# dx = (γe - mean(γe) - x̂ mean(γe x̂)) / sqrt(var + eps), the means from the sums.
BATCH_NORM_INPUT_GRADIENT = cupy.ElementwiseKernel(
    "T error, T normalized, T gamma, T inverse_std, T error_sum, T projection_sum, T count",
    "T gradient",
    """
    gradient = (gamma * error - gamma * error_sum / count
                - normalized * (gamma * projection_sum / count)) * inverse_std;
    """, "xpnn_batch_norm_input_gradient")

RUNNING_STATISTICS = cupy.ElementwiseKernel(
    "T running_mean, T running_variance, T mean, T variance, T keep, T take",
    "T new_mean, T new_variance",
    "new_mean = keep * running_mean + take * mean;"
    "new_variance = keep * running_variance + take * variance;",
    "xpnn_batch_norm_running_statistics")

DROPOUT = cupy.ElementwiseKernel(
    "T x, T draws, T probability", "T mask, T scale, T output",
    "mask = draws < probability ? (T)1 : (T)0; scale = mask / probability; output = x * scale;",
    "xpnn_dropout")

ADAM = cupy.ElementwiseKernel(
    "T weights, T gradient, T mu, T one_minus_mu, T rho, T one_minus_rho, "
    "T inverse_root_correction, T epsilon, T step_size, T learning_rate, T decay",
    "T first_moment, T second_moment, T updated",
    """
    first_moment = first_moment * mu + gradient * one_minus_mu;
    second_moment = second_moment * rho + gradient * gradient * one_minus_rho;
    updated = weights - first_moment / (sqrt(second_moment) * inverse_root_correction + epsilon)
                        * step_size;
    updated = updated - learning_rate * (decay * weights);
    """, "xpnn_adam")
