// RMSNorm and LayerNorm over rows of `dim` values, Mamba-2's gated RMSNorm over groups of a
// row, and Qwen3's RMSNorm of each q and k head of a fused qkv row, forward and backward.
//
// Computes, per row r (T = float or bf16 storage, fp32 arithmetic):
//   rmsnorm:   out = x * rstd * w,               rstd[r] = 1 / sqrt(mean(x^2) + eps)
//   layernorm: out = (x - mean) * rstd * w + b,  rstd[r] = 1 / sqrt(var(x) + eps)
//   gated:     g = x silu(z); per group k of `group` values, out = g * rstd * w,
//              rstd[r, k] = 1 / sqrt(mean_k(g^2) + eps); backward is rmsnorm's at g, then
//              dx = dg silu(z), dz = dg x silu'(z) (both written; x and z are the mixer's
//              output and gate, not the residual stream); w is [width], rstd [rows, width / group].
//   qk_norm:   per q or k head of D values in a qkv row [(H + 2 Hkv) D], out = x * rstd * w with
//              w = w[0, D) for q's heads and w[D, 2D) for k's; v's heads are copied;
//              rstd [rows, H + Hkv]. Backward is rmsnorm's per head, in place on dqkv (dx is
//              written: the input is the qkv projection's output, not the residual stream).
// Layouts: x, out, dout, dx are row-major [rows, dim]; w, b are [dim]; mean and rstd are fp32
// [rows]. Backward needs x, w and the saved mean/rstd (never recomputes a reduction):
//   rmsnorm:   dx += rstd * w * dy - rstd^3 / dim * x * sum(w dy x);  dw += dy * x * rstd
//   layernorm: dx += rstd * (g - mean(g) - xhat * mean(g xhat)), g = w dy;  dw += dy xhat;  db += dy
// dx accumulates (the norm's input is the residual stream, whose gradient already holds the
// skip path); dw and db are fp32 and accumulate.
// Launch: forward one block per row (gated: per (row, group), grid (rows, width / group));
// backward a grid-stride loop over rows (gated: over rows for the group blockIdx.y) with the block's
// dw (and db) partials in dynamic shared memory, 4 * dim (8 * dim) bytes, added to the
// global gradients with one atomicAdd per column per block (so the summation order of dw
// across blocks, and its last bits, vary from run to run). blockDim: a multiple of 32.
// qk_norm runs one warp per head (for D of 64 to 256 a block per head would idle); its backward
// keeps each warp's dw partial in dynamic shared memory, 8 * D bytes per warp, summed over the
// block's warps before the atomicAdd.
// Cost: forward reads x and writes out, 2 * dim * sizeof(T) per row, ~4 FLOPs per value;
// backward reads dy, x and dx and writes dx, 4 * dim * sizeof(T), ~8 FLOPs per value
// (qk_norm: reads dy and x and writes dx, 3 * sizeof(T) per value).
#include "common.cuh"

template <typename T>
__device__ void rmsnorm_forward(const T* x, const T* w, T* out, float* rstd, int rows, int dim, float eps) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + (size_t)r * dim;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float v = to_float(xr[c]);
        ss += v * v;
    }
    const float s = rsqrtf(block_sum(ss, scratch) / dim + eps);
    if (threadIdx.x == 0) rstd[r] = s;
    T* o = out + (size_t)r * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) o[c] = from_float<T>(to_float(xr[c]) * s * to_float(w[c]));
}

template <typename T>
__device__ void rmsnorm_backward(const T* dout, const T* x, const T* w, const float* rstd, T* dx, float* dw, int rows,
                                 int dim) {
    __shared__ float scratch[32];
    extern __shared__ float dw_part[];
    for (int c = threadIdx.x; c < dim; c += blockDim.x) dw_part[c] = 0.0f;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* dy = dout + (size_t)r * dim;
        const T* xr = x + (size_t)r * dim;
        const float s = rstd[r];
        float dot = 0.0f;
        for (int c = threadIdx.x; c < dim; c += blockDim.x) dot += to_float(dy[c]) * to_float(w[c]) * to_float(xr[c]);
        const float k = s * s * s * block_sum(dot, scratch) / dim;
        T* d = dx + (size_t)r * dim;
        for (int c = threadIdx.x; c < dim; c += blockDim.x) {
            const float g = to_float(dy[c]), xv = to_float(xr[c]);
            d[c] = from_float<T>(to_float(d[c]) + s * to_float(w[c]) * g - k * xv);
            dw_part[c] += g * xv * s;
        }
    }
    for (int c = threadIdx.x; c < dim; c += blockDim.x) atomicAdd(&dw[c], dw_part[c]);
}

template <typename T>
__device__ void layernorm_forward(const T* x, const T* w, const T* b, T* out, float* mean, float* rstd, int rows,
                                  int dim, float eps) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + (size_t)r * dim;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) sum += to_float(xr[c]);
    const float mu = block_sum(sum, scratch) / dim;
    // Two passes over the row (it is in L1/L2): the variance of x - mu, not E[x^2] - mu^2.
    float var = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float v = to_float(xr[c]) - mu;
        var += v * v;
    }
    const float s = rsqrtf(block_sum(var, scratch) / dim + eps);
    if (threadIdx.x == 0) {
        mean[r] = mu;
        rstd[r] = s;
    }
    T* o = out + (size_t)r * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x)
        o[c] = from_float<T>((to_float(xr[c]) - mu) * s * to_float(w[c]) + to_float(b[c]));
}

template <typename T>
__device__ void layernorm_backward(const T* dout, const T* x, const T* w, const float* mean, const float* rstd, T* dx,
                                   float* dw, float* db, int rows, int dim) {
    __shared__ float scratch[32];
    extern __shared__ float part[];  // [dw | db]
    for (int c = threadIdx.x; c < 2 * dim; c += blockDim.x) part[c] = 0.0f;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* dy = dout + (size_t)r * dim;
        const T* xr = x + (size_t)r * dim;
        const float mu = mean[r], s = rstd[r];
        float g_sum = 0.0f, gx_sum = 0.0f;
        for (int c = threadIdx.x; c < dim; c += blockDim.x) {
            const float g = to_float(dy[c]) * to_float(w[c]);
            g_sum += g;
            gx_sum += g * (to_float(xr[c]) - mu) * s;
        }
        const float g_mean = block_sum(g_sum, scratch) / dim;
        const float gx_mean = block_sum(gx_sum, scratch) / dim;
        T* d = dx + (size_t)r * dim;
        for (int c = threadIdx.x; c < dim; c += blockDim.x) {
            const float g = to_float(dy[c]), xhat = (to_float(xr[c]) - mu) * s;
            d[c] = from_float<T>(to_float(d[c]) + s * (g * to_float(w[c]) - g_mean - xhat * gx_mean));
            part[c] += g * xhat;
            part[dim + c] += g;
        }
    }
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        atomicAdd(&dw[c], part[c]);
        atomicAdd(&db[c], part[dim + c]);
    }
}

template <typename T>
__device__ void gated_rmsnorm_forward(const T* x, const T* z, const T* w, T* out, float* rstd, int rows, int width,
                                      int group, float eps) {
    __shared__ float scratch[32];
    const int r = blockIdx.x, k = blockIdx.y;  // rows on x: y is capped at 65535 blocks
    if (r >= rows) return;
    const long long base = (long long)r * width + (long long)k * group;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < group; c += blockDim.x) {
        const float g = to_float(x[base + c]) * siluf(to_float(z[base + c]));
        ss += g * g;
    }
    const float s = rsqrtf(block_sum(ss, scratch) / group + eps);
    if (threadIdx.x == 0) rstd[(long long)r * (width / group) + k] = s;
    for (int c = threadIdx.x; c < group; c += blockDim.x) {
        const float g = to_float(x[base + c]) * siluf(to_float(z[base + c]));
        out[base + c] = from_float<T>(g * s * to_float(w[k * group + c]));
    }
}

template <typename T>
__device__ void gated_rmsnorm_backward(const T* dout, const T* x, const T* z, const T* w, const float* rstd, T* dx,
                                       T* dz, float* dw, int rows, int width, int group) {
    __shared__ float scratch[32];
    extern __shared__ float dw_part[];  // [group]
    const int k = blockIdx.y;
    for (int c = threadIdx.x; c < group; c += blockDim.x) dw_part[c] = 0.0f;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long base = (long long)r * width + (long long)k * group;
        const float s = rstd[(long long)r * (width / group) + k];
        float dot = 0.0f;
        for (int c = threadIdx.x; c < group; c += blockDim.x) {
            const float g = to_float(x[base + c]) * siluf(to_float(z[base + c]));
            dot += to_float(dout[base + c]) * to_float(w[k * group + c]) * g;
        }
        const float coef = s * s * s * block_sum(dot, scratch) / group;
        for (int c = threadIdx.x; c < group; c += blockDim.x) {
            const float xv = to_float(x[base + c]), zv = to_float(z[base + c]), dy = to_float(dout[base + c]);
            const float g = xv * siluf(zv);
            const float dg = s * to_float(w[k * group + c]) * dy - coef * g;
            dx[base + c] = from_float<T>(dg * siluf(zv));
            dz[base + c] = from_float<T>(dg * xv * silu_grad(zv));
            dw_part[c] += dy * g * s;
        }
    }
    for (int c = threadIdx.x; c < group; c += blockDim.x) atomicAdd(&dw[k * group + c], dw_part[c]);
}

// The warps of the grid in turn over `units`: warp `u` of a grid-stride loop.
#define WARP_STRIDE(u, units)                                                                 \
    for (long long u = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5); u < (units); \
         u += (long long)gridDim.x * (blockDim.x >> 5))

template <typename T>
__device__ void qk_norm_forward(const T* qkv, const T* w, T* out, float* rstd, long long rows, int n_heads,
                                int n_kv_heads, int head_dim, float eps) {
    const int heads = n_heads + 2 * n_kv_heads, normed = n_heads + n_kv_heads, lane = threadIdx.x & 31;
    WARP_STRIDE(u, rows * heads) {
        const int h = (int)(u % heads);
        const T* x = qkv + u * head_dim;
        T* o = out + u * head_dim;
        if (h >= normed) {  // a v head (the whole warp takes the same branch)
            for (int c = lane; c < head_dim; c += 32) o[c] = x[c];
            continue;
        }
        const T* wh = w + (h < n_heads ? 0 : head_dim);
        float ss = 0.0f;
        for (int c = lane; c < head_dim; c += 32) {
            const float v = to_float(x[c]);
            ss += v * v;
        }
        const float s = rsqrtf(warp_sum(ss) / head_dim + eps);
        if (lane == 0) rstd[u / heads * normed + h] = s;
        for (int c = lane; c < head_dim; c += 32) o[c] = from_float<T>(to_float(x[c]) * s * to_float(wh[c]));
    }
}

template <typename T>
__device__ void qk_norm_backward(T* dqkv, const T* qkv, const T* w, const float* rstd, float* dw, long long rows,
                                 int n_heads, int n_kv_heads, int head_dim) {
    extern __shared__ float dw_part[];  // per warp [2 D]: q's then k's
    const int heads = n_heads + 2 * n_kv_heads, normed = n_heads + n_kv_heads;
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    float* mine = dw_part + (threadIdx.x >> 5) * 2 * head_dim;
    for (int c = lane; c < 2 * head_dim; c += 32) mine[c] = 0.0f;
    __syncwarp();  // a lane adds to columns other lanes zeroed, where 32 does not divide D
    WARP_STRIDE(u, rows * normed) {
        const int h = (int)(u % normed), half = h < n_heads ? 0 : head_dim;
        const long long at = (u / normed * heads + h) * head_dim;
        T* d = dqkv + at;
        const T* x = qkv + at;
        const T* wh = w + half;
        const float s = rstd[u];
        float dot = 0.0f;
        for (int c = lane; c < head_dim; c += 32) dot += to_float(d[c]) * to_float(wh[c]) * to_float(x[c]);
        const float k = s * s * s * warp_sum(dot) / head_dim;
        for (int c = lane; c < head_dim; c += 32) {
            const float g = to_float(d[c]), xv = to_float(x[c]);
            d[c] = from_float<T>(s * to_float(wh[c]) * g - k * xv);
            mine[half + c] += g * xv * s;
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < 2 * head_dim; c += blockDim.x) {
        float sum = 0.0f;
        for (int k = 0; k < warps; ++k) sum += dw_part[k * 2 * head_dim + c];
        atomicAdd(&dw[c], sum);
    }
}

#define NORM_KERNELS(T, S)                                                                                         \
    extern "C" __global__ void rmsnorm_forward_##S(const T* x, const T* w, T* out, float* rstd, int rows, int dim,  \
                                                   float eps) {                                                    \
        rmsnorm_forward<T>(x, w, out, rstd, rows, dim, eps);                                                       \
    }                                                                                                              \
    extern "C" __global__ void rmsnorm_backward_##S(const T* dout, const T* x, const T* w, const float* rstd, T* dx, \
                                                    float* dw, int rows, int dim) {                                \
        rmsnorm_backward<T>(dout, x, w, rstd, dx, dw, rows, dim);                                                  \
    }                                                                                                              \
    extern "C" __global__ void layernorm_forward_##S(const T* x, const T* w, const T* b, T* out, float* mean,       \
                                                     float* rstd, int rows, int dim, float eps) {                  \
        layernorm_forward<T>(x, w, b, out, mean, rstd, rows, dim, eps);                                            \
    }                                                                                                              \
    extern "C" __global__ void layernorm_backward_##S(const T* dout, const T* x, const T* w, const float* mean,     \
                                                      const float* rstd, T* dx, float* dw, float* db, int rows,    \
                                                      int dim) {                                                   \
        layernorm_backward<T>(dout, x, w, mean, rstd, dx, dw, db, rows, dim);                                      \
    }                                                                                                              \
    extern "C" __global__ void gated_rmsnorm_forward_##S(const T* x, const T* z, const T* w, T* out, float* rstd,   \
                                                         int rows, int width, int group, float eps) {              \
        gated_rmsnorm_forward<T>(x, z, w, out, rstd, rows, width, group, eps);                                     \
    }                                                                                                              \
    extern "C" __global__ void gated_rmsnorm_backward_##S(const T* dout, const T* x, const T* z, const T* w,        \
                                                          const float* rstd, T* dx, T* dz, float* dw, int rows,    \
                                                          int width, int group) {                                  \
        gated_rmsnorm_backward<T>(dout, x, z, w, rstd, dx, dz, dw, rows, width, group);                            \
    }                                                                                                              \
    extern "C" __global__ void qk_norm_forward_##S(const T* qkv, const T* w, T* out, float* rstd, long long rows,   \
                                                   int n_heads, int n_kv_heads, int head_dim, float eps) {        \
        qk_norm_forward<T>(qkv, w, out, rstd, rows, n_heads, n_kv_heads, head_dim, eps);                           \
    }                                                                                                              \
    extern "C" __global__ void qk_norm_backward_##S(T* dqkv, const T* qkv, const T* w, const float* rstd,          \
                                                    float* dw, long long rows, int n_heads, int n_kv_heads,        \
                                                    int head_dim) {                                                \
        qk_norm_backward<T>(dqkv, qkv, w, rstd, dw, rows, n_heads, n_kv_heads, head_dim);                          \
    }

FOR_EACH_STORAGE(NORM_KERNELS)
