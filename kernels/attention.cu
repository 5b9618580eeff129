// Causal grouped-query softmax attention, forward and backward, and its inference form over
// a key/value cache: the simple, correct version (the flash-attention kernel replaces it on
// the hot path).
//
// Computes, for batch b, query head h (kv head g = h / (H / Hkv)) and query i, with
// scale = 1 / sqrt(D) and keys f_i <= j <= i, where f_i is first_keys[b T + i] (non-decreasing
// along the sequence: documents packed into one sequence attend within their own) or 0 where
// first_keys is null:
//   s_j = scale q_i . k_j;  lse = log sum_j exp(s_j);  p_j = exp(s_j - lse);  out_i = sum_j p_j v_j
// Backward, from dO_i and the saved lse (P is recomputed, never stored):
//   dP_j = dO_i . v_j;  delta = dO_i . out_i;  dS_j = p_j (dP_j - delta)
//   dq_i = scale sum_j dS_j k_j;  dk_j += scale dS_j q_i;  dv_j += p_j dO_i
// Layouts: first_keys u32 [B T]; qkv [B T, (H + 2 Hkv) D] (q heads, k heads, v heads; rows
// b T + t); out and dout [B T, H D]; lse fp32 [B, H, T]; dqkv fp32 [B T, (H + 2 Hkv) D],
// which backward accumulates into with atomics: the caller zeroes it first.
// Launch: one block per (query i, head h, batch b) = grid (T, H, B); dynamic shared memory
// (blockDim.x + 2 D) floats, whatever T; blockDim a multiple of 32. Keys come in tiles of
// blockDim.x, a key per thread for the scores, and threads take head dimensions for the
// outputs; the forward's softmax is online over the tiles. FLOPs: 4 T^2 D / 2 per head
// forward, 2.5x that backward; only a tile of scores exists at a time, but K and V are read
// once per query (T^2 D reads per head), which is what flash attention's tiling removes.
// Cached inference: kv_append copies the k and v heads of `new_seq` new rows per sequence
// (positions pos..pos + new_seq) into k_cache and v_cache [B, max_seq, Hkv D] (a grid-stride
// loop); attention_cached is the forward for those queries over cache positions 0..=their
// own (the last `window` of them where window > 0: a sliding-window layer), grid
// (new_seq, H, B), the same shared memory however long the cache. Decoding (too few
// queries to fill the GPU) splits each query's keys instead (flash decoding):
// attention_cached_part, grid (new_seq, H, B x parts), writes each part's unnormalised output
// with its max and sum, and attention_combine merges the parts.
#include "common.cuh"

struct Heads {
    int seq, n_heads, n_kv_heads, head_dim;
    __device__ long long width() const { return (long long)(n_heads + 2 * n_kv_heads) * head_dim; }
    __device__ int kv_of(int h) const { return h / (n_heads / n_kv_heads); }
};

// One query's softmax attention over keys j_begin..j_end-1 (rows of k and v `stride` values
// apart), by one block, unnormalised: leaves sum_j exp(s_j - m) v_j in `smem`'s last d floats
// (each thread's own columns) and the running max m and sum of exp(s_j - m) in *m, *sum
// (-inf and 0 for no keys). Keys come a tile of blockDim.x at a time (a key per thread) with
// the online softmax, the partial output rescaled whenever the max grows, so shared memory
// does not grow with the number of keys. `smem` holds blockDim.x + 2 d floats.
template <typename T>
__device__ void attend_keys(const T* qi, const T* k, const T* v, long long stride, int j_begin, int j_end, int d,
                            float* smem, float* scratch, float* m_out, float* sum_out) {
    float* p = smem;            // this tile's exp(s_j - m)
    float* q = p + blockDim.x;  // q_i
    float* acc = q + d;         // sum_j exp(s_j - m) v_j; each thread owns its columns
    const float scale = rsqrtf((float)d);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        q[c] = to_float(qi[c]);
        acc[c] = 0.0f;
    }
    __syncthreads();
    float m = NEG_INF, sum = 0.0f;
    for (int j0 = j_begin; j0 < j_end; j0 += blockDim.x) {
        const int j = j0 + threadIdx.x, keys = min((int)blockDim.x, j_end - j0);
        float s = NEG_INF;
        if (j < j_end) {
            float dot = 0.0f;
            for (int c = 0; c < d; c++) dot += q[c] * to_float(k[j * stride + c]);
            s = dot * scale;
        }
        // Every tile has a key, so the new max is finite and the first rescale is exp(-inf) = 0.
        const float m_new = fmaxf(m, block_max(s, scratch));
        const float e = j < j_end ? __expf(s - m_new) : 0.0f;
        p[threadIdx.x] = e;
        const float rescale = __expf(m - m_new);
        sum = sum * rescale + block_sum(e, scratch);  // also the barrier before p is read
        m = m_new;
        // The next tile rewrites p only after its block_max, whose barrier follows these reads.
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float a = acc[c] * rescale;
            for (int jj = 0; jj < keys; jj++) a += p[jj] * to_float(v[(j0 + jj) * stride + c]);
            acc[c] = a;
        }
    }
    *m_out = m;
    *sum_out = sum;
}

// One query's softmax attention over keys j_begin..j_end-1, as attend_keys: writes out[0..d)
// and returns the log-sum-exp of the scaled scores.
template <typename T>
__device__ float attend(const T* qi, const T* k, const T* v, long long stride, int j_begin, int j_end, int d, T* o,
                        float* smem, float* scratch) {
    float m, sum;
    attend_keys(qi, k, v, stride, j_begin, j_end, d, smem, scratch, &m, &sum);
    const float* acc = smem + blockDim.x + d;
    const float inv = 1.0f / sum;
    for (int c = threadIdx.x; c < d; c += blockDim.x) o[c] = from_float<T>(acc[c] * inv);
    return m + __logf(sum);
}

// The first key query i of sequence b attends (see the top).
__device__ int first_key(const unsigned* first_keys, int seq, int b, int i) {
    return first_keys ? (int)first_keys[(long long)b * seq + i] : 0;
}

template <typename T>
__device__ void attention_forward(const T* qkv, T* out, float* lse, const unsigned* first_keys, Heads s) {
    __shared__ float scratch[32];
    extern __shared__ float smem[];  // attend's blockDim.x + 2 head_dim floats
    const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, d = s.head_dim, g = s.kv_of(h);
    const long long w = s.width(), base = (long long)b * s.seq * w;
    const T* qi = qkv + base + i * w + (long long)h * d;
    const T* k = qkv + base + (long long)(s.n_heads + g) * d;
    const T* v = qkv + base + (long long)(s.n_heads + s.n_kv_heads + g) * d;
    T* o = out + ((long long)b * s.seq + i) * s.n_heads * d + (long long)h * d;
    const float l = attend(qi, k, v, w, first_key(first_keys, s.seq, b, i), i + 1, d, o, smem, scratch);
    if (threadIdx.x == 0) lse[((long long)b * s.n_heads + h) * s.seq + i] = l;
}

template <typename T>
__device__ void kv_append(const T* qkv, T* k_cache, T* v_cache, Heads s, int pos, int max_seq, long long rows) {
    const long long kv = (long long)s.n_kv_heads * s.head_dim, n = rows * kv;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long r = e / kv, c = e % kv;
        const long long b = r / s.seq, t = r % s.seq;
        const long long at = (b * max_seq + pos + t) * kv + c;
        k_cache[at] = qkv[r * s.width() + (long long)s.n_heads * s.head_dim + c];
        v_cache[at] = qkv[r * s.width() + (long long)(s.n_heads + s.n_kv_heads) * s.head_dim + c];
    }
}

// `s.seq` is the number of new rows per sequence; query i sits at position pos + i.
// The first cache position query i (at position pos + i) attends: 0, or its window's first.
__device__ int first_cached_key(int pos, int i, int window) {
    return window > 0 ? max(0, pos + i + 1 - window) : 0;
}

template <typename T>
__device__ void attention_cached(const T* qkv, const T* k_cache, const T* v_cache, T* out, Heads s, int pos,
                                 int max_seq, int window) {
    __shared__ float scratch[32];
    extern __shared__ float smem[];  // attend's blockDim.x + 2 head_dim floats
    const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, d = s.head_dim, g = s.kv_of(h);
    const long long kv = (long long)s.n_kv_heads * d;
    const T* qi = qkv + ((long long)b * s.seq + i) * s.width() + (long long)h * d;
    const T* k = k_cache + (long long)b * max_seq * kv + (long long)g * d;
    const T* v = v_cache + (long long)b * max_seq * kv + (long long)g * d;
    T* o = out + ((long long)b * s.seq + i) * s.n_heads * d + (long long)h * d;
    attend(qi, k, v, kv, first_cached_key(pos, i, window), pos + i + 1, d, o, smem, scratch);
}

// The cached forward in `splits` parts over the keys, for few queries over a long cache
// (decoding), where a block per query and head leaves most of the GPU idle. Block
// (i, h, b splits + p) attends query i to its keys in [p span, (p + 1) span) and writes the
// part's unnormalised output, max and sum to part [B new_seq, H, splits, D + 2] (D values,
// then m and sum; -inf and 0 for a part past the query's keys); attention_combine merges.
template <typename T>
__device__ void attention_cached_part(const T* qkv, const T* k_cache, const T* v_cache, float* part, Heads s, int pos,
                                      int max_seq, int window, int splits, int span) {
    __shared__ float scratch[32];
    extern __shared__ float smem[];  // attend_keys' blockDim.x + 2 head_dim floats
    const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z / splits, piece = blockIdx.z % splits;
    const int d = s.head_dim, g = s.kv_of(h);
    const long long kv = (long long)s.n_kv_heads * d;
    const T* qi = qkv + ((long long)b * s.seq + i) * s.width() + (long long)h * d;
    const T* k = k_cache + (long long)b * max_seq * kv + (long long)g * d;
    const T* v = v_cache + (long long)b * max_seq * kv + (long long)g * d;
    const int j_begin = max(piece * span, first_cached_key(pos, i, window));
    const int j_end = min(piece * span + span, pos + i + 1);
    float m, sum;
    attend_keys(qi, k, v, kv, j_begin, j_end, d, smem, scratch, &m, &sum);
    float* out = part + ((((long long)b * s.seq + i) * s.n_heads + h) * splits + piece) * (d + 2);
    const float* acc = smem + blockDim.x + d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) out[c] = acc[c];
    if (threadIdx.x == 0) {
        out[d] = m;
        out[d + 1] = sum;
    }
}

// out [rows, H D] from attention_cached_part's parts: with M the largest part max,
// out = sum_p exp(m_p - M) acc_p / sum_p exp(m_p - M) sum_p. A grid-stride loop over out.
template <typename T>
__device__ void attention_combine(const float* part, T* out, long long rows, int n_heads, int d, int splits) {
    GRID_STRIDE(e, rows * n_heads * d) {
        const long long rh = e / d;  // row * n_heads + head
        const int c = e % d;
        const float* p = part + rh * splits * (d + 2);
        float M = NEG_INF;
        for (int q = 0; q < splits; q++) M = fmaxf(M, p[q * (d + 2) + d]);
        float num = 0.0f, den = 0.0f;
        for (int q = 0; q < splits; q++) {
            const float w = __expf(p[q * (d + 2) + d] - M);  // 0 for a part with no keys
            num += w * p[q * (d + 2) + c];
            den += w * p[q * (d + 2) + d + 1];
        }
        out[e] = from_float<T>(num / den);
    }
}

// One block per query i, over its keys a tile of blockDim.x at a time (a key per thread), as
// the forward: dS_j of the tile goes to shared memory, whose size does not grow with the keys.
template <typename T>
__device__ void attention_backward(const T* dout, const T* qkv, const T* out, const float* lse, float* dqkv,
                                   const unsigned* first_keys, Heads s) {
    __shared__ float scratch[32];
    extern __shared__ float smem[];  // dS of a tile [blockDim.x], q_i [head_dim], dO_i [head_dim]
    const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, d = s.head_dim, g = s.kv_of(h);
    float* ds = smem;
    float* q = ds + blockDim.x;
    float* dout_i = q + d;
    const long long w = s.width(), base = (long long)b * s.seq * w;
    const long long orow = ((long long)b * s.seq + i) * s.n_heads * d + (long long)h * d;
    const T* qi = qkv + base + i * w + (long long)h * d;
    const long long kc = (long long)(s.n_heads + g) * d, vc = (long long)(s.n_heads + s.n_kv_heads + g) * d;
    const float scale = rsqrtf((float)d);
    const float l = lse[((long long)b * s.n_heads + h) * s.seq + i];
    float delta = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        q[c] = to_float(qi[c]);
        dout_i[c] = to_float(dout[orow + c]);
        delta += dout_i[c] * to_float(out[orow + c]);
    }
    delta = block_sum(delta, scratch);  // also the barrier after q and dout_i are written
    float* dq = dqkv + base + i * w + (long long)h * d;
    for (int j0 = first_key(first_keys, s.seq, b, i); j0 <= i; j0 += blockDim.x) {
        const int j = j0 + threadIdx.x, keys = min((int)blockDim.x, i + 1 - j0);
        if (j <= i) {
            const T* kj = qkv + base + j * w + kc;
            const T* vj = qkv + base + j * w + vc;
            float qk = 0.0f, dp = 0.0f;
            for (int c = 0; c < d; c++) {
                qk += q[c] * to_float(kj[c]);
                dp += dout_i[c] * to_float(vj[c]);
            }
            const float pj = __expf(qk * scale - l), dsj = pj * (dp - delta);
            ds[threadIdx.x] = dsj;
            float* dk = dqkv + base + j * w + kc;
            float* dv = dqkv + base + j * w + vc;
            for (int c = 0; c < d; c++) {
                atomicAdd(&dk[c], scale * dsj * q[c]);
                atomicAdd(&dv[c], pj * dout_i[c]);
            }
        }
        __syncthreads();
        // dq_i is this block's alone: each thread adds its columns' share of the tile.
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float acc = 0.0f;
            for (int jj = 0; jj < keys; jj++) acc += ds[jj] * to_float(qkv[base + (j0 + jj) * w + kc + c]);
            dq[c] += scale * acc;
        }
        __syncthreads();  // before the next tile rewrites ds
    }
}

#define ATTENTION_KERNELS(T, S)                                                                                    \
    extern "C" __global__ void attention_forward_##S(const T* qkv, T* out, float* lse,                            \
                                                     const unsigned* first_keys, int seq, int n_heads,             \
                                                     int n_kv_heads, int head_dim) {                               \
        attention_forward<T>(qkv, out, lse, first_keys, Heads{seq, n_heads, n_kv_heads, head_dim});                \
    }                                                                                                              \
    extern "C" __global__ void attention_backward_##S(const T* dout, const T* qkv, const T* out, const float* lse, \
                                                      float* dqkv, const unsigned* first_keys, int seq,            \
                                                      int n_heads, int n_kv_heads, int head_dim) {                 \
        attention_backward<T>(dout, qkv, out, lse, dqkv, first_keys, Heads{seq, n_heads, n_kv_heads, head_dim});   \
    }                                                                                                              \
    extern "C" __global__ void kv_append_##S(const T* qkv, T* k_cache, T* v_cache, int new_seq, int n_heads,       \
                                             int n_kv_heads, int head_dim, int pos, int max_seq, long long rows) { \
        kv_append<T>(qkv, k_cache, v_cache, Heads{new_seq, n_heads, n_kv_heads, head_dim}, pos, max_seq, rows);    \
    }                                                                                                              \
    extern "C" __global__ void attention_cached_##S(const T* qkv, const T* k_cache, const T* v_cache, T* out,      \
                                                    int new_seq, int n_heads, int n_kv_heads, int head_dim,        \
                                                    int pos, int max_seq, int window) {                            \
        attention_cached<T>(qkv, k_cache, v_cache, out, Heads{new_seq, n_heads, n_kv_heads, head_dim}, pos,        \
                            max_seq, window);                                                                      \
    }                                                                                                              \
    extern "C" __global__ void attention_cached_part_##S(const T* qkv, const T* k_cache, const T* v_cache,          \
                                                         float* part, int new_seq, int n_heads, int n_kv_heads,    \
                                                         int head_dim, int pos, int max_seq, int window,           \
                                                         int splits, int span) {                                   \
        attention_cached_part<T>(qkv, k_cache, v_cache, part, Heads{new_seq, n_heads, n_kv_heads, head_dim}, pos,  \
                                 max_seq, window, splits, span);                                                   \
    }                                                                                                              \
    extern "C" __global__ void attention_combine_##S(const float* part, T* out, long long rows, int n_heads,       \
                                                     int head_dim, int splits) {                                   \
        attention_combine<T>(part, out, rows, n_heads, head_dim, splits);                                          \
    }

FOR_EACH_STORAGE(ATTENTION_KERNELS)
