// Rotary position embedding, in place on the q and k heads of a fused qkv buffer.
//
// Computes, for row r (position t = r % seq), each of the first n_heads + n_kv_heads heads of
// head_dim D, and each pair (i, i + D/2) (Hugging Face's "rotate half"), with (c, s) =
// cos_sin[t, i]:   a' = a c - b s,  b' = b c + a s, q's heads also scaled by q_scale (muP's
// attention multiplier; 1 otherwise). With inverse != 0 the rotation is transposed (s -> -s):
// that is the backward (with the same scale), applied to the gradient in place.
// Layouts: qkv [rows, (H + 2 Hkv) D] (q heads, k heads, v heads); cos_sin fp32 [seq, D/2, 2].
// Nothing is saved. Launch: a grid-stride loop over rows x (H + Hkv) x D/2 pairs.
// Memory-bound: reads and writes 2 values per pair, reads 2 table values; 6 FLOPs.
#include "common.cuh"

template <typename T>
__device__ void rope(T* qkv, const float* cos_sin, long long rows, int seq, int n_heads, int n_kv_heads, int head_dim,
                     int inverse, float q_scale) {
    const int half = head_dim / 2, heads = n_heads + n_kv_heads;
    const long long width = (long long)(n_heads + 2 * n_kv_heads) * head_dim;
    const long long n = rows * heads * half;
    const float sign = inverse ? -1.0f : 1.0f;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(e % half);
        const long long rh = e / half;
        const int h = (int)(rh % heads);
        const long long r = rh / heads;
        const float* cs = cos_sin + ((r % seq) * half + i) * 2;
        const float k = h < n_heads ? q_scale : 1.0f;
        const float c = k * cs[0], s = k * sign * cs[1];
        T* x = qkv + r * width + (long long)h * head_dim;
        const float a = to_float(x[i]), b = to_float(x[i + half]);
        x[i] = from_float<T>(a * c - b * s);
        x[i + half] = from_float<T>(b * c + a * s);
    }
}

#define ROPE_KERNELS(T, S)                                                                                         \
    extern "C" __global__ void rope_##S(T* qkv, const float* cos_sin, long long rows, int seq, int n_heads,       \
                                        int n_kv_heads, int head_dim, int inverse, float q_scale) {                \
        rope<T>(qkv, cos_sin, rows, seq, n_heads, n_kv_heads, head_dim, inverse, q_scale);                         \
    }

FOR_EACH_STORAGE(ROPE_KERNELS)
