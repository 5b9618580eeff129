// The small memory-bound ops of the backend contract: fill, add, scale, bias forward and
// backward, sums for losses and the gradient norm, and the fp32 -> storage conversion.
//
// Computes (T = float or bf16 storage, fp32 arithmetic):
//   fill:           x[i] = value
//   add_assign:     dst[i] += src[i]
//   scale:          x[i] *= factor
//   add_bias:       y[r, c] += bias[c]                      (y [rows, cols], bias [cols])
//   bias_backward:  dbias[c] += sum_r dy[r, c]              (dbias fp32, accumulates)
//   sum:            *out += sum_i x[i], or sum_i x[i]^2 with squares != 0 (fp64 throughout)
//   from_f32:       dst[i] = T(src[i])                      (src fp32)
// Nothing is saved for a backward. Launch: grid-stride loops over elements, any grid;
// bias_backward a grid (column blocks of blockDim.x, row chunks) whose threads each sum one
// column over their chunk and add it with one atomicAdd; sum 256 threads a block, each
// accumulating in fp64, one atomicAdd (fp64) per block (so the order of the block partials,
// and the last bits, vary by run).
// Cost: one read (and for the in-place ops one write) per element; ~1 FLOP per element.
#include "common.cuh"

template <typename T>
__device__ void bias_backward(const T* dy, float* dbias, long long rows, int cols, long long rows_per_chunk) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const long long first = blockIdx.y * rows_per_chunk;
    const long long last = min(rows, first + rows_per_chunk);
    float acc = 0.0f;
    for (long long r = first; r < last; r++) acc += to_float(dy[r * cols + c]);
    atomicAdd(&dbias[c], acc);
}

// blockDim.x must be 256.
template <typename T>
__device__ void sum(const T* x, long long n, int squares, double* out) {
    __shared__ double part[256];
    double s = 0.0;
    GRID_STRIDE(i, n) {
        const double v = to_float(x[i]);
        s += squares ? v * v : v;
    }
    part[threadIdx.x] = s;
    __syncthreads();
    for (int half = 128; half > 0; half >>= 1) {
        if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(out, part[0]);
}

#define ELEMENTWISE_KERNELS(T, S)                                                                                  \
    extern "C" __global__ void fill_##S(T* x, long long n, float value) {                                          \
        const T v = from_float<T>(value);                                                                          \
        GRID_STRIDE(i, n) x[i] = v;                                                                                \
    }                                                                                                              \
    extern "C" __global__ void add_assign_##S(T* dst, const T* src, long long n) {                                 \
        GRID_STRIDE(i, n) dst[i] = from_float<T>(to_float(dst[i]) + to_float(src[i]));                             \
    }                                                                                                              \
    extern "C" __global__ void scale_##S(T* x, long long n, float factor) {                                        \
        GRID_STRIDE(i, n) x[i] = from_float<T>(to_float(x[i]) * factor);                                           \
    }                                                                                                              \
    extern "C" __global__ void add_bias_##S(T* y, const T* bias, long long n, int cols) {                          \
        GRID_STRIDE(i, n) y[i] = from_float<T>(to_float(y[i]) + to_float(bias[i % cols]));                         \
    }                                                                                                              \
    extern "C" __global__ void bias_backward_##S(const T* dy, float* dbias, long long rows, int cols,               \
                                                 long long rows_per_chunk) {                                       \
        bias_backward<T>(dy, dbias, rows, cols, rows_per_chunk);                                                   \
    }                                                                                                              \
    extern "C" __global__ void sum_##S(const T* x, long long n, int squares, double* out) {                        \
        sum<T>(x, n, squares, out);                                                                                \
    }                                                                                                              \
    extern "C" __global__ void from_f32_##S(const float* src, T* dst, long long n) {                               \
        GRID_STRIDE(i, n) dst[i] = from_float<T>(src[i]);                                                          \
    }

FOR_EACH_STORAGE(ELEMENTWISE_KERNELS)
