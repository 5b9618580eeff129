// Mamba's causal depthwise convolution with its SiLU, forward and backward.
//
// Computes, per sequence b, token t and channel d (T = float or bf16 storage, fp32
// arithmetic), with K taps and zeros before the sequence:
//   pre[b, t, d] = bias[d] + sum_k w[d, k] x[b, t - K + 1 + k, d];   y = silu(pre)
// Layouts: x, y, dy, dx are [rows = batch * len, channels]; w is [channels, K]; bias is
// [channels]. Backward saves nothing: pre is recomputed from x (K multiply-adds), then
//   g = dy silu'(pre);  dx[b, s, d] = sum_k w[d, k] g[b, s + K - 1 - k, d]   (written)
//   dw[d, k] += sum_{b,t} g[b, t, d] x[b, t - K + 1 + k, d];  dbias[d] += sum_{b,t} g   (fp32)
// Launch: forward and dx are grid-stride loops over the rows x channels values (threads of a
// warp take consecutive channels: coalesced); dw a grid of (channel blocks, row chunks) whose
// threads each sum one channel over their chunk and add it with K + 1 atomicAdds (the order
// of the chunks' sums, and the last bits, vary by run). K <= CONV_MAX_K.
// Cost: forward reads K values and writes 1 per output, 2K FLOPs; dx recomputes K
// pre-activations of K taps each (2K^2 FLOPs per value) to save storing g.
// Inference continues sequences already begun: conv1d_recurrent reads the inputs before x's
// first token from `carry` ([batch, K - 1, channels]), and conv1d_keep then leaves the last
// K - 1 inputs of (carry ++ x) there (one thread per (sequence, channel), in place).
#include "common.cuh"

#define CONV_MAX_K 8

// pre[b, t, d] for the row `r` = b * len + t.
template <typename T>
__device__ __forceinline__ float conv_pre(const T* x, const T* w, const T* bias, long long r, int t, int d,
                                          int channels, int K) {
    float acc = to_float(bias[d]);
    for (int k = 0; k < K; k++) {
        const int src = t - K + 1 + k;
        if (src >= 0) acc += to_float(w[d * K + k]) * to_float(x[(r - t + src) * channels + d]);
    }
    return acc;
}

template <typename T>
__device__ void conv1d_forward(const T* x, const T* w, const T* bias, T* y, long long rows, int len, int channels,
                               int K) {
    GRID_STRIDE(e, rows * channels) {
        const long long r = e / channels;
        const int d = (int)(e % channels), t = (int)(r % len);
        y[e] = from_float<T>(siluf(conv_pre(x, w, bias, r, t, d, channels, K)));
    }
}

template <typename T>
__device__ void conv1d_backward_dx(const T* dy, const T* x, const T* w, const T* bias, T* dx, long long rows, int len,
                                   int channels, int K) {
    GRID_STRIDE(e, rows * channels) {
        const long long r = e / channels;
        const int d = (int)(e % channels), s = (int)(r % len);
        float acc = 0.0f;
        for (int k = 0; k < K; k++) {
            const int t = s + K - 1 - k;
            if (t >= len) continue;
            const long long rt = r - s + t;
            const float g = to_float(dy[rt * channels + d]) * silu_grad(conv_pre(x, w, bias, rt, t, d, channels, K));
            acc += to_float(w[d * K + k]) * g;
        }
        dx[e] = from_float<T>(acc);
    }
}

template <typename T>
__device__ void conv1d_backward_dw(const T* dy, const T* x, const T* w, const T* bias, float* dw, float* dbias,
                                   long long rows, int len, int channels, int K, long long rows_per_chunk) {
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= channels) return;
    const long long first = blockIdx.y * rows_per_chunk;
    const long long last = min(rows, first + rows_per_chunk);
    float gw[CONV_MAX_K] = {0.0f};
    float gb = 0.0f;
    for (long long r = first; r < last; r++) {
        const int t = (int)(r % len);
        const float g = to_float(dy[r * channels + d]) * silu_grad(conv_pre(x, w, bias, r, t, d, channels, K));
        gb += g;
#pragma unroll
        for (int k = 0; k < CONV_MAX_K; k++) {
            const int src = t - K + 1 + k;
            if (k < K && src >= 0) gw[k] += g * to_float(x[(r - t + src) * channels + d]);
        }
    }
    atomicAdd(&dbias[d], gb);
    for (int k = 0; k < K; k++) atomicAdd(&dw[d * K + k], gw[k]);
}

// The forward of sequences continued from `carry`: inputs before x's first token come from it.
template <typename T>
__device__ void conv1d_recurrent(const T* x, const T* w, const T* bias, const T* carry, T* y, long long rows, int len,
                                 int channels, int K) {
    GRID_STRIDE(e, rows * channels) {
        const long long r = e / channels, b = r / len;
        const int d = (int)(e % channels), t = (int)(r % len);
        float acc = to_float(bias[d]);
        for (int k = 0; k < K; k++) {
            const int src = t - K + 1 + k;  // before the first token: carry entry K - 1 + src
            const T v = src >= 0 ? x[(r - t + src) * channels + d] : carry[(b * (K - 1) + K - 1 + src) * channels + d];
            acc += to_float(w[d * K + k]) * to_float(v);
        }
        y[e] = from_float<T>(siluf(acc));
    }
}

// carry entry j becomes entry len + j of (carry ++ x). Walking j upwards reads entries at or
// after the one written, so one thread per (sequence, channel) may do it in place.
template <typename T>
__device__ void conv1d_keep(const T* x, T* carry, long long batch, int len, int channels, int K) {
    GRID_STRIDE(e, batch * channels) {
        const long long b = e / channels;
        const int d = (int)(e % channels);
        for (int j = 0; j < K - 1; j++) {
            const int src = len + j - (K - 1);
            const long long kept = (b * (K - 1) + j) * channels + d;
            carry[kept] = src >= 0 ? x[(b * len + src) * channels + d] : carry[kept + (long long)len * channels];
        }
    }
}

#define CONV1D_KERNELS(T, S)                                                                                       \
    extern "C" __global__ void conv1d_forward_##S(const T* x, const T* w, const T* bias, T* y, long long rows,      \
                                                  int len, int channels, int K) {                                  \
        conv1d_forward<T>(x, w, bias, y, rows, len, channels, K);                                                  \
    }                                                                                                              \
    extern "C" __global__ void conv1d_backward_dx_##S(const T* dy, const T* x, const T* w, const T* bias, T* dx,    \
                                                      long long rows, int len, int channels, int K) {              \
        conv1d_backward_dx<T>(dy, x, w, bias, dx, rows, len, channels, K);                                         \
    }                                                                                                              \
    extern "C" __global__ void conv1d_backward_dw_##S(const T* dy, const T* x, const T* w, const T* bias,           \
                                                      float* dw, float* dbias, long long rows, int len,            \
                                                      int channels, int K, long long rows_per_chunk) {             \
        conv1d_backward_dw<T>(dy, x, w, bias, dw, dbias, rows, len, channels, K, rows_per_chunk);                  \
    }                                                                                                              \
    extern "C" __global__ void conv1d_recurrent_##S(const T* x, const T* w, const T* bias, const T* carry, T* y,   \
                                                    long long rows, int len, int channels, int K) {                \
        conv1d_recurrent<T>(x, w, bias, carry, y, rows, len, channels, K);                                         \
    }                                                                                                              \
    extern "C" __global__ void conv1d_keep_##S(const T* x, T* carry, long long batch, int len, int channels,       \
                                               int K) {                                                            \
        conv1d_keep<T>(x, carry, batch, len, channels, K);                                                         \
    }

FOR_EACH_STORAGE(CONV1D_KERNELS)
