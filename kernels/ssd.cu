// Mamba-2's SSD scan (state-space duality, chunked), forward and backward.
//
// Computes, per sequence b and head h (head_dim P channels sharing one scalar decay; B and
// C from group g = h / (heads / groups), N = state values; T = float or bf16 storage, fp32
// arithmetic), in chunks of Q tokens with steps s_t = softplus(dt[t, h] + dt_bias[h]),
// A = -exp(a_log[h]) and L_i = sum_{k <= i} s_k A inside the chunk:
//   y_i = D x_i + exp(L_i) H0 C_i + sum_{j <= i} exp(L_i - L_j) s_j (C_i . B_j) x_j
//   H_end = exp(L_last) H0 + sum_j exp(L_last - L_j) s_j x_j B_j^T        (H: [P, N])
// Layouts: xbc [rows = batch * len, heads * P + 2 * groups * N] (x heads, B groups, C groups,
// as the convolution leaves them); dt [rows, heads]; y [rows, heads * P]; the chunk-boundary
// states, fp32 [batch, chunks + 1, heads, P, N] (the zero state first), are saved for
// backward; dt_bias, a_log, D [heads].
// Forward, in three kernels:
//   ssd_chunk_state   per (chunk, head, batch): the chunk's own state S = H_end - exp(L_last) H0,
//                     into the states slot after the chunk, and exp(L_last) into `decay`
//   ssd_state_passing per (P N slice, head, batch), over chunks in order: H_c = exp(L_last) H_{c-1} + S_c
//   ssd_chunk_scan    per (chunk, head, batch): y, 16 query rows at a time against every key
// Backward, in three more: dL/dH leaving each chunk (D_c) runs backwards like the states:
//   ssd_chunk_dstate   per chunk, R = sum_i exp(L_i) dy_i C_i^T (the readouts' share of dL/dH0),
//                      and exp(L_last) into `decay` as ssd_chunk_state does
//   ssd_dstate_passing over chunks in reverse: D_last = 0, D_{c-1} = exp(L_last,c) D_c + R_c
//   ssd_chunk_backward per (chunk, head, batch): every gradient of the chunk from H0, D_c and
//                     its inputs; dxbc (x, B, C) is added into an fp32 accumulator (B and C
//                     with atomics: the heads of a group share them) that the caller zeroes
//                     and converts; ddt is written; dt_bias, a_log (= dA * A) and D accumulate.
// Launch: 256 threads a block; chunk kernels grid (chunks, heads, batch) with dynamic shared
// memory as each wrapper states; the passing kernels grid (ceil(P N / 256), heads, batch).
// Cost: the quadratic form is Q (N + P) multiply-adds per (token, head) forward and about 3x
// that backward; the state passing reads and writes the states once. The kernels here
// multiply on CUDA cores in fp32; in bf16, for the common (P, N), the chunk states, the
// forward's quadratic form and the backward's have tensor-core forms (the *_tc kernels below;
// the backward's per-token state terms and the decays' suffix sums stay in
// ssd_chunk_backward).
// Inference runs the recurrence token by token instead (ssd_recurrent): H_t = exp(s_t A)
// H_{t-1} + s_t x_t B_t^T, y_t = H_t C_t + D x_t, from and into a carried state (fp32
// [batch, heads, P, N]), one thread per (sequence, head, channel p), 4 N FLOPs a token.
#include "common.cuh"

#define SSD_THREADS 256
#define SSD_ROWS 16  // query rows per pass of the quadratic form

struct Ssd {
    int len, heads, P, groups, N, Q;
    __device__ int width() const { return heads * P + 2 * groups * N; }
    __device__ int chunks() const { return (len + Q - 1) / Q; }
    __device__ int x_col(int h) const { return h * P; }
    __device__ int b_col(int h) const { return heads * P + (h / (heads / groups)) * N; }
    __device__ int c_col(int h) const { return heads * P + groups * N + (h / (heads / groups)) * N; }
    // The states slot of chunk boundary `slot` (0: before the sequence) for (b, h).
    __device__ long long state(int b, int slot, int h) const {
        return (((long long)b * (chunks() + 1) + slot) * heads + h) * P * N;
    }
};

// The steps s_k and running decays L_k of the chunk's q tokens into shared memory (by every
// thread, then a serial prefix sum by thread 0); ends with a barrier.
template <typename T>
__device__ void ssd_steps(const T* dt, float bias, float A, long long row0, int q, const Ssd& s, int h, float* steps,
                          float* L) {
    for (int k = threadIdx.x; k < q; k += blockDim.x)
        steps[k] = softplusf(to_float(dt[(row0 + k) * s.heads + h]) + bias);
    __syncthreads();
    if (threadIdx.x == 0) {
        float acc = 0.0f;
        for (int k = 0; k < q; k++) {
            acc += steps[k] * A;
            L[k] = acc;
        }
    }
    __syncthreads();
}

// The chunk of a (chunk, head, batch) block: its tokens t0..t0 + q, their first row, and the
// steps and running decays in shared memory (`smem`: 2 Q floats; ends with a barrier).
struct SsdChunk {
    int c, h, b, t0, q;
    long long row0;
    float *steps, *L;
};

template <typename T>
__device__ SsdChunk ssd_chunk(const T* dt, const T* dt_bias, const T* a_log, const Ssd& s, float* smem,
                              int c = blockIdx.x) {
    SsdChunk k;
    k.c = c, k.h = blockIdx.y, k.b = blockIdx.z;
    k.t0 = k.c * s.Q, k.q = min(s.Q, s.len - k.t0);
    k.row0 = (long long)k.b * s.len + k.t0;
    k.steps = smem, k.L = smem + s.Q;
    ssd_steps(dt, to_float(dt_bias[k.h]), -__expf(to_float(a_log[k.h])), k.row0, k.q, s, k.h, k.steps, k.L);
    return k;
}

// Dynamic shared memory: 2 Q floats.
template <typename T>
__device__ void ssd_chunk_state(const T* xbc, const T* dt, const T* dt_bias, const T* a_log, float* states,
                                float* decay, Ssd s) {
    extern __shared__ __align__(16) float smem[];
    const SsdChunk ch = ssd_chunk(dt, dt_bias, a_log, s, smem);
    const int c = ch.c, h = ch.h, b = ch.b, q = ch.q;
    const long long row0 = ch.row0;
    const float *steps = ch.steps, *L = ch.L;
    const int w = s.width(), xc = s.x_col(h), bc = s.b_col(h);
    float* out = states + s.state(b, c + 1, h);
    for (int e = threadIdx.x; e < s.P * s.N; e += blockDim.x) {
        const int p = e / s.N, n = e % s.N;
        float acc = 0.0f;
        for (int j = 0; j < q; j++) {
            const T* row = xbc + (row0 + j) * w;
            acc += __expf(L[q - 1] - L[j]) * steps[j] * to_float(row[xc + p]) * to_float(row[bc + n]);
        }
        out[e] = acc;
    }
    if (threadIdx.x == 0) decay[((long long)b * s.heads + h) * s.chunks() + c] = __expf(L[q - 1]);
}

__device__ void ssd_state_passing(float* states, const float* decay, Ssd s) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x, h = blockIdx.y, b = blockIdx.z;
    if (e >= s.P * s.N) return;
    float H = 0.0f;
    states[s.state(b, 0, h) + e] = 0.0f;
    for (int c = 0; c < s.chunks(); c++) {
        float* slot = states + s.state(b, c + 1, h) + e;
        H = decay[((long long)b * s.heads + h) * s.chunks() + c] * H + *slot;
        *slot = H;
    }
}

// Dynamic shared memory: (2 + SSD_ROWS) Q floats.
template <typename T>
__device__ void ssd_chunk_scan(const T* xbc, const T* dt, const T* dt_bias, const T* a_log, const T* Dskip,
                               const float* states, T* y, Ssd s) {
    extern __shared__ __align__(16) float smem[];
    const SsdChunk ch = ssd_chunk(dt, dt_bias, a_log, s, smem);
    const int c = ch.c, h = ch.h, b = ch.b, q = ch.q;
    const long long row0 = ch.row0;
    const float *steps = ch.steps, *L = ch.L;
    float* W = smem + 2 * s.Q;  // [SSD_ROWS][Q]
    const int w = s.width(), xc = s.x_col(h), bc = s.b_col(h), cc = s.c_col(h), inner = s.heads * s.P;
    const float skip = to_float(Dskip[h]);
    const float* H0 = states + s.state(b, c, h);
    for (int i0 = 0; i0 < q; i0 += SSD_ROWS) {
        const int rows = min(SSD_ROWS, q - i0);
        // W[r][j] = exp(L_i - L_j) s_j (C_i . B_j) for j <= i = i0 + r.
        for (int e = threadIdx.x; e < rows * q; e += blockDim.x) {
            const int r = e / q, j = e % q, i = i0 + r;
            float acc = 0.0f;
            if (j <= i) {
                const T* ci = xbc + (row0 + i) * w + cc;
                const T* bj = xbc + (row0 + j) * w + bc;
                for (int n = 0; n < s.N; n++) acc += to_float(ci[n]) * to_float(bj[n]);
                acc *= __expf(L[i] - L[j]) * steps[j];
            }
            W[r * s.Q + j] = acc;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < rows * s.P; e += blockDim.x) {
            const int r = e / s.P, p = e % s.P, i = i0 + r;
            const T* xi = xbc + (row0 + i) * w + xc;
            const T* ci = xbc + (row0 + i) * w + cc;
            float carried = 0.0f;
            for (int n = 0; n < s.N; n++) carried += H0[p * s.N + n] * to_float(ci[n]);
            float acc = skip * to_float(xi[p]) + __expf(L[i]) * carried;
            for (int j = 0; j <= i; j++) acc += W[r * s.Q + j] * to_float(xbc[(row0 + j) * w + xc + p]);
            y[(row0 + i) * inner + xc + p] = from_float<T>(acc);
        }
        __syncthreads();
    }
}

// Dynamic shared memory: 2 Q floats.
template <typename T>
__device__ void ssd_chunk_dstate(const T* dy, const T* xbc, const T* dt, const T* dt_bias, const T* a_log,
                                 float* dstates, float* decay, Ssd s) {
    extern __shared__ __align__(16) float smem[];
    const SsdChunk ch = ssd_chunk(dt, dt_bias, a_log, s, smem);
    const int c = ch.c, h = ch.h, b = ch.b, q = ch.q;
    const long long row0 = ch.row0;
    const float* L = ch.L;
    const int w = s.width(), cc = s.c_col(h), inner = s.heads * s.P, xc = s.x_col(h);
    float* out = dstates + s.state(b, c, h);
    for (int e = threadIdx.x; e < s.P * s.N; e += blockDim.x) {
        const int p = e / s.N, n = e % s.N;
        float acc = 0.0f;
        for (int i = 0; i < q; i++)
            acc += __expf(L[i]) * to_float(dy[(row0 + i) * inner + xc + p]) * to_float(xbc[(row0 + i) * w + cc + n]);
        out[e] = acc;
    }
    if (threadIdx.x == 0) decay[((long long)b * s.heads + h) * s.chunks() + c] = __expf(L[q - 1]);
}

__device__ void ssd_dstate_passing(float* dstates, const float* decay, Ssd s) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x, h = blockIdx.y, b = blockIdx.z;
    if (e >= s.P * s.N) return;
    float D = 0.0f;  // dL/dH leaving chunk c
    for (int c = s.chunks() - 1; c >= 0; c--) {
        float* slot = dstates + s.state(b, c, h) + e;
        const float r = *slot;
        *slot = D;
        D = decay[((long long)b * s.heads + h) * s.chunks() + c] * D + r;
    }
}

// Dynamic shared memory: (4 + 3 SSD_ROWS) Q floats, or 4 Q with `qform`: the quadratic form's
// (ddecay, dsteps) per token from the tensor-core kernels below, which also added its dx, dB
// and dC into dxbc (null: this kernel computes the quadratic form itself).
template <typename T>
__device__ void ssd_chunk_backward(const T* dy, const T* xbc, const T* dt, const T* dt_bias, const T* a_log,
                                   const T* Dskip, const float* states, const float* dstates, float* dxbc,
                                   T* ddt, float* ddt_bias, float* da_log, float* dd, const float* qform, Ssd s) {
    __shared__ float scratch[32];
    extern __shared__ __align__(16) float smem[];
    const SsdChunk ch = ssd_chunk(dt, dt_bias, a_log, s, smem);
    const int c = ch.c, h = ch.h, b = ch.b, q = ch.q, last = q - 1;
    const long long row0 = ch.row0;
    const float *steps = ch.steps, *L = ch.L;
    float *ddecay = smem + 2 * s.Q, *dsteps = smem + 3 * s.Q;
    float *M = smem + 4 * s.Q, *Nn = M + SSD_ROWS * s.Q, *pair = Nn + SSD_ROWS * s.Q;  // [SSD_ROWS][Q] each
    const float A = -__expf(to_float(a_log[h]));
    for (int k = threadIdx.x; k < q; k += blockDim.x) {
        ddecay[k] = qform ? qform[((row0 + k) * s.heads + h) * 2] : 0.0f;
        dsteps[k] = qform ? qform[((row0 + k) * s.heads + h) * 2 + 1] : 0.0f;
    }
    const int w = s.width(), xc = s.x_col(h), bc = s.b_col(h), cc = s.c_col(h), inner = s.heads * s.P;
    const int P = s.P, N = s.N;
    const float skip = to_float(Dskip[h]);
    const float* H0 = states + s.state(b, c, h);
    const float* Dc = dstates + s.state(b, c, h);
    auto X = [&](int i, int p) { return to_float(xbc[(row0 + i) * w + xc + p]); };
    auto Bv = [&](int i, int n) { return to_float(xbc[(row0 + i) * w + bc + n]); };
    auto Cv = [&](int i, int n) { return to_float(xbc[(row0 + i) * w + cc + n]); };
    auto dY = [&](int i, int p) { return to_float(dy[(row0 + i) * inner + xc + p]); };
    auto dX = [&](int i, int p) -> float& { return dxbc[(row0 + i) * w + xc + p]; };
    __syncthreads();

    // The state leaving the chunk: exp(L_last) H0 feeds ddecay[last].
    float part = 0.0f;
    for (int e = threadIdx.x; e < P * N; e += blockDim.x) part += Dc[e] * H0[e];
    part = block_sum(part, scratch);
    float dskip = 0.0f;
    // Per token: the skip term, the carried state's readout (ddecay and dC; its dH0 share
    // went into dstates), and the state update's (v = D B_j, u = D^T x_j).
    for (int i = 0; i < q; i++) {
        float dec = 0.0f, xv = 0.0f;
        for (int p = threadIdx.x; p < P; p += blockDim.x) {
            const float g = dY(i, p);
            dskip += g * X(i, p);
            float hc = 0.0f, v = 0.0f;
            for (int n = 0; n < N; n++) {
                hc += H0[p * N + n] * Cv(i, n);
                v += Dc[p * N + n] * Bv(i, n);
            }
            dec += g * hc;
            xv += X(i, p) * v;
            const float wj = __expf(L[last] - L[i]) * steps[i];
            dX(i, p) += skip * g + wj * v;
        }
        for (int n = threadIdx.x; n < N; n += blockDim.x) {
            float hg = 0.0f, uu = 0.0f;
            for (int p = 0; p < P; p++) {
                hg += H0[p * N + n] * dY(i, p);
                uu += Dc[p * N + n] * X(i, p);
            }
            atomicAdd(&dxbc[(row0 + i) * w + cc + n], __expf(L[i]) * hg);
            atomicAdd(&dxbc[(row0 + i) * w + bc + n], __expf(L[last] - L[i]) * steps[i] * uu);
        }
        dec = block_sum(dec, scratch);
        xv = block_sum(xv, scratch);
        if (threadIdx.x == 0) {
            const float wj = __expf(L[last] - L[i]);
            ddecay[i] += __expf(L[i]) * dec - wj * steps[i] * xv;
            ddecay[last] += wj * steps[i] * xv;
            dsteps[i] += wj * xv;
        }
    }
    if (threadIdx.x == 0) ddecay[last] += __expf(L[last]) * part;
    __syncthreads();

    // The quadratic form, SSD_ROWS query rows at a time: M = exp(L_i - L_j) s_j (C_i . B_j),
    // Nn = exp(L_i - L_j) s_j (dy_i . x_j), pair = M (dy_i . x_j).
    for (int i0 = 0; i0 < (qform ? 0 : q); i0 += SSD_ROWS) {
        const int rows = min(SSD_ROWS, q - i0);
        for (int e = threadIdx.x; e < rows * q; e += blockDim.x) {
            const int r = e / q, j = e % q, i = i0 + r;
            float m = 0.0f, nn = 0.0f, pr = 0.0f;
            if (j <= i) {
                float cb = 0.0f, gx = 0.0f;
                for (int n = 0; n < N; n++) cb += Cv(i, n) * Bv(j, n);
                for (int p = 0; p < P; p++) gx += dY(i, p) * X(j, p);
                const float e_ij = __expf(L[i] - L[j]);
                m = e_ij * steps[j] * cb;
                nn = e_ij * steps[j] * gx;
                pr = m * gx;
                atomicAdd(&dsteps[j], e_ij * cb * gx);
            }
            M[r * s.Q + j] = m;
            Nn[r * s.Q + j] = nn;
            pair[r * s.Q + j] = pr;
        }
        __syncthreads();
        // ddecay[i] += sum_j pair, ddecay[j] -= sum_i pair.
        for (int e = threadIdx.x; e < rows + q; e += blockDim.x) {
            float sum = 0.0f;
            if (e < rows) {
                for (int j = 0; j < q; j++) sum += pair[e * s.Q + j];
                atomicAdd(&ddecay[i0 + e], sum);
            } else {
                const int j = e - rows;
                for (int r = 0; r < rows; r++) sum += pair[r * s.Q + j];
                atomicAdd(&ddecay[j], -sum);
            }
        }
        // dx_j += sum_i M dy_i;  dB_j += sum_i Nn C_i.
        for (int e = threadIdx.x; e < q * P; e += blockDim.x) {
            const int j = e / P, p = e % P;
            float acc = 0.0f;
            for (int r = 0; r < rows; r++) acc += M[r * s.Q + j] * dY(i0 + r, p);
            dX(j, p) += acc;
        }
        for (int e = threadIdx.x; e < q * N; e += blockDim.x) {
            const int j = e / N, n = e % N;
            float acc = 0.0f;
            for (int r = 0; r < rows; r++) acc += Nn[r * s.Q + j] * Cv(i0 + r, n);
            if (acc != 0.0f) atomicAdd(&dxbc[(row0 + j) * w + bc + n], acc);
        }
        // dC_i += sum_j Nn B_j.
        for (int e = threadIdx.x; e < rows * N; e += blockDim.x) {
            const int r = e / N, n = e % N;
            float acc = 0.0f;
            for (int j = 0; j <= i0 + r; j++) acc += Nn[r * s.Q + j] * Bv(j, n);
            atomicAdd(&dxbc[(row0 + i0 + r) * w + cc + n], acc);
        }
        __syncthreads();
    }

    // L_k = sum_{m <= k} s_m A: dL/d(s_k A) is the suffix sum of ddecay; then the softplus
    // (d/dx = sigmoid(x) = 1 - exp(-s)) and the floor, which passes no gradient where it holds.
    if (threadIdx.x == 0) {
        float suffix = 0.0f, dA = 0.0f, dbias = 0.0f;
        for (int k = last; k >= 0; k--) {
            suffix += ddecay[k];
            const float dsk = dsteps[k] + A * suffix;
            dA += steps[k] * suffix;
            const float g = dsk * -expm1f(-steps[k]);  // d softplus(v) / dv = sigmoid(v) = 1 - exp(-s)
            ddt[(row0 + k) * s.heads + h] = from_float<T>(g);
            dbias += g;
        }
        atomicAdd(&ddt_bias[h], dbias);
        atomicAdd(&da_log[h], dA * A);  // dA_log = dA A
    }
    dskip = block_sum(dskip, scratch);
    if (threadIdx.x == 0) atomicAdd(&dd[h], dskip);
}

// ---- Tensor-core forms of the forward (bf16; P and N template constants, multiples of 16) ---
// Registers (ptxas, sm_90a): up to 170 forward and 240 backward at P = N = 128, no spills.
// The chunk's products as mma.sync tiles, one warp per 16 rows, fp32 accumulators:
//   ssd_chunk_state_tc  S = (w x)^T B over the chunk's tokens, w_j = exp(L_last - L_j) s_j
//                       (rows of P per warp, 64-token tiles of w x and B in shared memory);
//   ssd_chunk_scan_tc   per 64-query tile of a chunk: y = exp(L_i) C_i H0^T + W X + D x, with
//                       W = (C B^T) * exp(L_i - L_j) s_j (j <= i) as in flash attention's
//                       forward: the C B^T accumulators, scaled and masked, are the A
//                       fragments of W X; H0 is staged in shared memory as bf16.
// Rounding to bf16 where a product's operand is made (w x, W, H0) is the only difference from
// the CUDA-core kernels above.

// The (chunk, head, batch) and 64-row tile of a block of the tiled SSD kernels; false for a
// tile past the end of a short last chunk (the whole block returns).
// The tensor-core kernels' bf16 tiles start after `floats` floats of per-token values, at
// the next 16-byte boundary (cp.async and ldmatrix take 16-byte aligned rows).
__device__ __forceinline__ int ssd_tiles_at(int floats) { return (floats + 3) & ~3; }

template <typename T>
__device__ bool ssd_tile(const T* dt, const T* dt_bias, const T* a_log, const Ssd& s, float* smem, SsdChunk* ch,
                         int* tile) {
    const int tiles = (s.Q + 63) / 64;
    *tile = blockIdx.x % tiles;
    *ch = ssd_chunk(dt, dt_bias, a_log, s, smem, blockIdx.x / tiles);
    return *tile * 64 < ch->q;
}

// The tokens' weights w_j x_j of a 64-token tile into shared memory rows of P + SMEM_PAD
// (zeros past the chunk's q tokens).
template <int P>
__device__ void ssd_stage_weighted_x(bf16* dst, const bf16* x, long long stride, const float* weight, int first,
                                     int q) {
    for (int e = threadIdx.x; e < 64 * (P / 2); e += blockDim.x) {
        const int r = e / (P / 2), c = 2 * (e % (P / 2)), j = first + r;
        unsigned v = 0u;
        if (j < q) {
            const unsigned pair = load_pair(x + (long long)j * stride + c);
            v = pack_bf16(weight[j] * to_float((bf16)(pair & 0xffffu)), weight[j] * to_float((bf16)(pair >> 16)));
        }
        store_pair(dst + r * (P + SMEM_PAD) + c, v);
    }
}

// Grid (chunks, heads, batch), 128 threads. Dynamic shared memory: 3 Q floats and
// 64 (P + N + 2 SMEM_PAD) bf16.
template <int P, int N>
__device__ void ssd_chunk_state_tc(const bf16* xbc, const bf16* dt, const bf16* dt_bias, const bf16* a_log,
                                   float* states, float* decay, Ssd s) {
    extern __shared__ __align__(16) float smem[];
    const SsdChunk ch = ssd_chunk(dt, dt_bias, a_log, s, smem);
    const int c = ch.c, h = ch.h, b = ch.b, q = ch.q;
    float* weight = smem + 2 * s.Q;
    bf16* Xs = (bf16*)(smem + ssd_tiles_at(3 * s.Q));  // [64][P + SMEM_PAD]: w_j x_j
    bf16* Bs = Xs + 64 * (P + SMEM_PAD);  // [64][N + SMEM_PAD]
    for (int j = threadIdx.x; j < q; j += blockDim.x) weight[j] = __expf(ch.L[q - 1] - ch.L[j]) * ch.steps[j];
    const int w = s.width(), warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bf16* rows = xbc + ch.row0 * w;
    float* out = states + s.state(b, c + 1, h);
    // Passes of four 16-row tiles of P (every warp takes part in the staging of each pass).
    for (int pass = 0; pass < (P / 16 + 3) / 4; pass++) {
        const int mt = pass * 4 + warp;
        float acc[N / 8][4];
        zero_acc(acc);
        for (int j0 = 0; j0 < q; j0 += 64) {
            __syncthreads();  // weights written; the previous tiles have been read
            stage_rows<N>(Bs, rows + s.b_col(h), w, j0, q, 64);  // lands while x is weighted
            ssd_stage_weighted_x<P>(Xs, rows + s.x_col(h), w, weight, j0, q);
            cp_async_wait<0>();
            __syncthreads();
            if (mt >= P / 16) continue;
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                // A[p][j] = (w x)_j[p]: the transpose of Xs's 16 x 16 block.
                unsigned af[4];
                load_a_tile_trans(af, Xs + kk * 16 * (P + SMEM_PAD) + mt * 16, P + SMEM_PAD);
#pragma unroll
                for (int n = 0; n < N / 8; n += 2) {
                    unsigned bf[4];
                    load_b_tile_kn(bf, Bs + kk * 16 * (N + SMEM_PAD) + n * 8, N + SMEM_PAD);
                    mma_16816(acc[n], af, bf);
                    mma_16816(acc[n + 1], af, bf + 2);
                }
            }
        }
        if (mt < P / 16) {
#pragma unroll
            for (int n = 0; n < N / 8; n++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int p = mt * 16 + g + 8 * (i >> 1), col = n * 8 + 2 * t + (i & 1);
                    out[p * N + col] = acc[n][i];
                }
        }
    }
    if (threadIdx.x == 0) decay[((long long)b * s.heads + h) * s.chunks() + c] = __expf(ch.L[q - 1]);
}

// Grid (chunks x ceil(Q / 64), heads, batch), 128 threads (4 warps x 16 query rows).
// Dynamic shared memory: 2 Q floats and (max(64, P) (N + SMEM_PAD) + 64 (P + SMEM_PAD)) bf16.
template <int P, int N>
__device__ void ssd_chunk_scan_tc(const bf16* xbc, const bf16* dt, const bf16* dt_bias, const bf16* a_log,
                                  const bf16* Dskip, const float* states, bf16* y, Ssd s) {
    extern __shared__ __align__(16) float smem[];
    constexpr int HB = P > 64 ? P : 64;  // rows of the H0 / B area
    SsdChunk ch;
    int tile;
    if (!ssd_tile(dt, dt_bias, a_log, s, smem, &ch, &tile)) return;
    const int c = ch.c, h = ch.h, b = ch.b, q = ch.q;
    const float *steps = ch.steps, *L = ch.L;
    bf16* HBs = (bf16*)(smem + ssd_tiles_at(2 * s.Q));  // H0 as [P][N + SMEM_PAD], then B tiles [64][N + SMEM_PAD]
    bf16* Xs = HBs + HB * (N + SMEM_PAD);  // [64][P + SMEM_PAD]
    const int w = s.width(), inner = s.heads * s.P, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const bf16* rows_base = xbc + ch.row0 * w;
    const int r0 = tile * 64 + warp * 16, rows[2] = {r0 + g, r0 + g + 8};

    unsigned cf[N / 16][4];  // C_i as A fragments over N
    load_a_fragments<N>(cf, rows_base + s.c_col(h), w, r0, q);
    // The carried state: o = exp(L_i) C_i H0^T.
    const float* H0 = states + s.state(b, c, h);
    for (int e = threadIdx.x; e < P * (N / 2); e += blockDim.x) {
        const int p = e / (N / 2), n = 2 * (e % (N / 2));
        store_pair(HBs + p * (N + SMEM_PAD) + n, pack_bf16(H0[p * N + n], H0[p * N + n + 1]));
    }
    __syncthreads();
    float o[P / 8][4];
    zero_acc(o);
    mma_abt<N, P / 8>(o, cf, HBs, N + SMEM_PAD);
    float carried[2];
#pragma unroll
    for (int r = 0; r < 2; r++) carried[r] = rows[r] < q ? __expf(L[rows[r]]) : 0.0f;
#pragma unroll
    for (int n = 0; n < P / 8; n++)
#pragma unroll
        for (int i = 0; i < 4; i++) o[n][i] *= carried[i >> 1];

    // The quadratic form over 64-key tiles up to the block's last query, staggered as flash
    // attention's forward is: X's tile lands while C B^T is computed, the next B tile while
    // the decay mask and the product with X run.
    const int key_end = min(q, (tile + 1) * 64);
    __syncthreads();  // H0 has been read
    stage_rows<N>(HBs, rows_base + s.b_col(h), w, 0, q, 64);
    for (int j0 = 0; j0 < key_end; j0 += 64) {
        cp_async_wait<0>();
        __syncthreads();  // B's tile has landed, and every warp is done with the previous X
        stage_rows<P>(Xs, rows_base + s.x_col(h), w, j0, q, 64);
        float sc[8][4];
        zero_acc(sc);
        mma_abt<N, 8>(sc, cf, HBs, N + SMEM_PAD);
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int j = j0 + nt * 8 + 2 * t + (i & 1), row = rows[i >> 1];
                sc[nt][i] = j <= row && row < q ? sc[nt][i] * __expf(L[row] - L[j]) * steps[j] : 0.0f;
            }
        cp_async_wait<0>();
        __syncthreads();  // X's tile has landed, and every warp is done with B's
        if (j0 + 64 < key_end) stage_rows<N>(HBs, rows_base + s.b_col(h), w, j0 + 64, q, 64);
        mma_acc_b<64, P / 8>(o, sc, Xs, P + SMEM_PAD);
    }
    // y = o + D x.
    const float skip = to_float(Dskip[h]);
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = rows[r];
        if (row >= q) continue;
        const bf16* xi = rows_base + (long long)row * w + s.x_col(h);
        bf16* dst = y + (ch.row0 + row) * inner + s.x_col(h);
#pragma unroll
        for (int n = 0; n < P / 8; n++) {
            const int p = n * 8 + 2 * t;
            const unsigned xv = load_pair(xi + p);
            store_pair(dst + p, pack_bf16(o[n][2 * r] + skip * to_float((bf16)(xv & 0xffffu)),
                                          o[n][2 * r + 1] + skip * to_float((bf16)(xv >> 16))));
        }
    }
}

// ---- Tensor-core forms of the backward's quadratic form (bf16, as above) -------------------
// With S = C B^T, G = dY X^T and e_ij = exp(L_i - L_j) for j <= i (else 0):
//   dX_j += sum_i e_ij s_j S_ij dy_i     dB_j += sum_i e_ij s_j G_ij C_i     dC_i += sum_j e_ij s_j G_ij B_j
//   dsteps_j += sum_i e_ij S_ij G_ij     ddecay_i += sum_j pair_ij,  ddecay_j -= sum_i pair_ij,
// pair = e s S G. Three kernels, each owning its output rows so that a block sums over all its
// partners without atomics between blocks (but for B and C, which the heads of a group share):
//   ssd_bwd_dx_tc  per 64-key tile (S^T and G^T per 16 keys a warp): dX, dsteps, the column sums
//   ssd_bwd_db_tc  per 64-key tile (G^T): dB         (both ssd_bwd_keys_tc)
//   ssd_bwd_dc_tc  per 64-query tile (S and G): dC, the row sums
// They add dX, dB, dC into the fp32 dxbc accumulator and (ddecay, dsteps) per token into
// `qform` [rows, heads, 2] (zeroed by the caller), which ssd_chunk_backward then starts from,
// skipping its own quadratic form. Grid (chunks x ceil(Q / 64), heads, batch), 128 threads;
// dynamic shared memory 2 Q floats and 64 (P + N + 2 SMEM_PAD) bf16.

__device__ __forceinline__ float* ssd_qform(float* qform, const Ssd& s, const SsdChunk& ch, int k, int which) {
    return qform + ((ch.row0 + k) * s.heads + ch.h) * 2 + which;
}

// Per 64-key tile, every query tile from its own to the chunk's end: dX, dsteps and the
// column sums (DB false, from S^T and G^T), or dB (DB true, from G^T alone; a kernel of its
// own keeps each one's registers within bounds).
template <int P, int N, bool DB>
__device__ void ssd_bwd_keys_tc(const bf16* dy, const bf16* xbc, const bf16* dt, const bf16* dt_bias,
                                const bf16* a_log, float* dxbc, float* qform, Ssd s) {
    extern __shared__ __align__(16) float smem[];
    SsdChunk ch;
    int tile;
    if (!ssd_tile(dt, dt_bias, a_log, s, smem, &ch, &tile)) return;
    const int q = ch.q, h = ch.h, w = s.width(), inner = s.heads * s.P;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    bf16* Cs = (bf16*)(smem + ssd_tiles_at(2 * s.Q));    // [64][N + SMEM_PAD]
    bf16* dYs = Cs + 64 * (N + SMEM_PAD);  // [64][P + SMEM_PAD]
    const bf16* rows = xbc + ch.row0 * w;
    const bf16* dys = dy + ch.row0 * inner + s.x_col(h);
    const int k0 = tile * 64 + (threadIdx.x >> 5) * 16, keys[2] = {k0 + g, k0 + g + 8};
    unsigned xfr[P / 16][4], bfr[DB ? 1 : N / 16][4];  // x_j (and B_j) of the warp's keys
    load_a_fragments<P>(xfr, rows + s.x_col(h), w, k0, q);
    if constexpr (!DB) load_a_fragments<N>(bfr, rows + s.b_col(h), w, k0, q);
    float acc[DB ? N / 8 : P / 8][4];  // dB_j or dx_j
    zero_acc(acc);
    float dsteps[2] = {0.0f, 0.0f}, colsum[2] = {0.0f, 0.0f};
    for (int i0 = tile * 64; i0 < q; i0 += 64) {
        __syncthreads();  // the previous tiles have been read
        stage_rows<N>(Cs, rows + s.c_col(h), w, i0, q, 64);
        stage_rows<P>(dYs, dys, inner, i0, q, 64);
        cp_async_wait<0>();
        __syncthreads();
        float gt[8][4], st[8][4];  // G^T and S^T: rows are keys, columns queries
        zero_acc(gt);
        mma_abt<P, 8>(gt, xfr, dYs, P + SMEM_PAD);
        if constexpr (!DB) {
            zero_acc(st);
            mma_abt<N, 8>(st, bfr, Cs, N + SMEM_PAD);
        }
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int r = i >> 1, j = keys[r], qi = i0 + nt * 8 + 2 * t + (i & 1);
                const bool valid = j <= qi && qi < q;
                const float e = valid ? __expf(ch.L[qi] - ch.L[j]) : 0.0f;
                if constexpr (DB) {
                    gt[nt][i] *= e * (valid ? ch.steps[j] : 0.0f);
                } else {
                    const float m = valid ? e * ch.steps[j] * st[nt][i] : 0.0f;
                    dsteps[r] += e * st[nt][i] * gt[nt][i];
                    colsum[r] += m * gt[nt][i];
                    st[nt][i] = m;
                }
            }
        if constexpr (DB) {
            mma_acc_b<64, N / 8>(acc, gt, Cs, N + SMEM_PAD);
        } else {
            mma_acc_b<64, P / 8>(acc, st, dYs, P + SMEM_PAD);
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if constexpr (!DB) {
            dsteps[r] = quad_sum(dsteps[r]);
            colsum[r] = quad_sum(colsum[r]);
        }
        if (keys[r] >= q) continue;
        float* dst = dxbc + (ch.row0 + keys[r]) * w + (DB ? s.b_col(h) : s.x_col(h));
#pragma unroll
        for (int n = 0; n < (DB ? N : P) / 8; n++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                // dB is shared by the group's heads; dx is this block's alone.
                if constexpr (DB) {
                    atomicAdd(dst + n * 8 + 2 * t + c, acc[n][2 * r + c]);
                } else {
                    dst[n * 8 + 2 * t + c] += acc[n][2 * r + c];
                }
            }
        if constexpr (!DB) {
            if (t == 0) {
                atomicAdd(ssd_qform(qform, s, ch, keys[r], 0), -colsum[r]);
                atomicAdd(ssd_qform(qform, s, ch, keys[r], 1), dsteps[r]);
            }
        }
    }
}

template <int P, int N>
__device__ void ssd_bwd_dc_tc(const bf16* dy, const bf16* xbc, const bf16* dt, const bf16* dt_bias,
                              const bf16* a_log, float* dxbc, float* qform, Ssd s) {
    extern __shared__ __align__(16) float smem[];
    SsdChunk ch;
    int tile;
    if (!ssd_tile(dt, dt_bias, a_log, s, smem, &ch, &tile)) return;
    const int q = ch.q, h = ch.h, w = s.width(), inner = s.heads * s.P;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    bf16* Bs = (bf16*)(smem + ssd_tiles_at(2 * s.Q));   // [64][N + SMEM_PAD]
    bf16* Xs = Bs + 64 * (N + SMEM_PAD);  // [64][P + SMEM_PAD]
    const bf16* rows = xbc + ch.row0 * w;
    const int r0 = tile * 64 + (threadIdx.x >> 5) * 16, queries[2] = {r0 + g, r0 + g + 8};
    unsigned cfr[N / 16][4], dyfr[P / 16][4];  // C_i and dy_i of the warp's queries
    load_a_fragments<N>(cfr, rows + s.c_col(h), w, r0, q);
    load_a_fragments<P>(dyfr, dy + ch.row0 * inner + s.x_col(h), inner, r0, q);
    float dc[N / 8][4];
    zero_acc(dc);
    float rowsum[2] = {0.0f, 0.0f};
    const int key_end = min(q, (tile + 1) * 64);
    for (int j0 = 0; j0 < key_end; j0 += 64) {
        __syncthreads();
        stage_rows<N>(Bs, rows + s.b_col(h), w, j0, q, 64);
        stage_rows<P>(Xs, rows + s.x_col(h), w, j0, q, 64);
        cp_async_wait<0>();
        __syncthreads();
        float sc[8][4], gx[8][4];
        zero_acc(sc);
        zero_acc(gx);
        mma_abt<N, 8>(sc, cfr, Bs, N + SMEM_PAD);
        mma_abt<P, 8>(gx, dyfr, Xs, P + SMEM_PAD);
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int r = i >> 1, qi = queries[r], j = j0 + nt * 8 + 2 * t + (i & 1);
                float nn = 0.0f;
                if (j <= qi && qi < q) {
                    nn = __expf(ch.L[qi] - ch.L[j]) * ch.steps[j] * gx[nt][i];
                    rowsum[r] += nn * sc[nt][i];
                }
                gx[nt][i] = nn;
            }
        mma_acc_b<64, N / 8>(dc, gx, Bs, N + SMEM_PAD);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        rowsum[r] = quad_sum(rowsum[r]);
        if (queries[r] >= q) continue;
        if (t == 0) atomicAdd(ssd_qform(qform, s, ch, queries[r], 0), rowsum[r]);
        float* dst = dxbc + (ch.row0 + queries[r]) * w + s.c_col(h);
#pragma unroll
        for (int n = 0; n < N / 8; n++) {
            atomicAdd(dst + n * 8 + 2 * t, dc[n][2 * r]);
            atomicAdd(dst + n * 8 + 2 * t + 1, dc[n][2 * r + 1]);
        }
    }
}

// The recurrence from `carry` row (b, h, p) over the sequence's tokens, for inference. The
// row's N state values stay in global memory (one token's worth while decoding: cached).
template <typename T>
__device__ void ssd_recurrent(const T* xbc, const T* dt, const T* dt_bias, const T* a_log, const T* Dskip,
                              float* carry, T* y, long long batch, Ssd s) {
    GRID_STRIDE(e, batch * s.heads * s.P) {
        const int p = (int)(e % s.P), h = (int)(e / s.P % s.heads);
        const long long b = e / ((long long)s.P * s.heads);
        const float a = -__expf(to_float(a_log[h])), bias = to_float(dt_bias[h]), skip = to_float(Dskip[h]);
        float* state = carry + e * s.N;
        for (int t = 0; t < s.len; t++) {
            const long long row = b * s.len + t;
            const T* r = xbc + row * s.width();
            const float step = softplusf(to_float(dt[row * s.heads + h]) + bias);
            const float decay = __expf(step * a), xv = to_float(r[s.x_col(h) + p]);
            float acc = 0.0f;
            for (int i = 0; i < s.N; i++) {
                const float v = decay * state[i] + step * xv * to_float(r[s.b_col(h) + i]);
                state[i] = v;
                acc += v * to_float(r[s.c_col(h) + i]);
            }
            y[row * s.heads * s.P + s.x_col(h) + p] = from_float<T>(acc + skip * xv);
        }
    }
}

#define SSD_ARGS int len, int heads, int P, int groups, int N, int Q
#define SSD_DIMS Ssd{len, heads, P, groups, N, Q}

#define SSD_KERNELS(T, S)                                                                                          \
    extern "C" __global__ void ssd_chunk_state_##S(const T* xbc, const T* dt, const T* dt_bias, const T* a_log,    \
                                                   float* states, float* decay, SSD_ARGS) {                        \
        ssd_chunk_state<T>(xbc, dt, dt_bias, a_log, states, decay, SSD_DIMS);                                      \
    }                                                                                                              \
    extern "C" __global__ void ssd_chunk_scan_##S(const T* xbc, const T* dt, const T* dt_bias, const T* a_log,     \
                                                  const T* Dskip, const float* states, T* y, SSD_ARGS) {           \
        ssd_chunk_scan<T>(xbc, dt, dt_bias, a_log, Dskip, states, y, SSD_DIMS);                                    \
    }                                                                                                              \
    extern "C" __global__ void ssd_chunk_dstate_##S(const T* dy, const T* xbc, const T* dt, const T* dt_bias,      \
                                                    const T* a_log, float* dstates, float* decay, SSD_ARGS) {      \
        ssd_chunk_dstate<T>(dy, xbc, dt, dt_bias, a_log, dstates, decay, SSD_DIMS);                                \
    }                                                                                                              \
    extern "C" __global__ void ssd_chunk_backward_##S(                                                             \
        const T* dy, const T* xbc, const T* dt, const T* dt_bias, const T* a_log, const T* Dskip,                  \
        const float* states, const float* dstates, float* dxbc, T* ddt, float* ddt_bias, float* da_log, float* dd, \
        const float* qform, SSD_ARGS) {                                                                             \
        ssd_chunk_backward<T>(dy, xbc, dt, dt_bias, a_log, Dskip, states, dstates, dxbc, ddt, ddt_bias, da_log,    \
                              dd, qform, SSD_DIMS);                                                                 \
    }                                                                                                              \
    extern "C" __global__ void ssd_recurrent_##S(const T* xbc, const T* dt, const T* dt_bias, const T* a_log,      \
                                                 const T* Dskip, float* carry, T* y, long long batch, SSD_ARGS) {  \
        ssd_recurrent<T>(xbc, dt, dt_bias, a_log, Dskip, carry, y, batch, SSD_DIMS);                               \
    }

FOR_EACH_STORAGE(SSD_KERNELS)

extern "C" __global__ void ssd_state_passing(float* states, const float* decay, SSD_ARGS) {
    ssd_state_passing(states, decay, SSD_DIMS);
}
extern "C" __global__ void ssd_dstate_passing(float* dstates, const float* decay, SSD_ARGS) {
    ssd_dstate_passing(dstates, decay, SSD_DIMS);
}

#define SSD_TC_KERNELS(P, N)                                                                                       \
    extern "C" __global__ void ssd_chunk_state_tc_p##P##_n##N(const bf16* xbc, const bf16* dt, const bf16* dt_bias, \
                                                              const bf16* a_log, float* states, float* decay,       \
                                                              SSD_ARGS) {                                           \
        ssd_chunk_state_tc<P, N>(xbc, dt, dt_bias, a_log, states, decay, SSD_DIMS);                                \
    }                                                                                                              \
    extern "C" __global__ void ssd_chunk_scan_tc_p##P##_n##N(const bf16* xbc, const bf16* dt, const bf16* dt_bias,  \
                                                             const bf16* a_log, const bf16* Dskip,                 \
                                                             const float* states, bf16* y, SSD_ARGS) {             \
        ssd_chunk_scan_tc<P, N>(xbc, dt, dt_bias, a_log, Dskip, states, y, SSD_DIMS);                              \
    }                                                                                                              \
    extern "C" __global__ void ssd_bwd_dx_tc_p##P##_n##N(const bf16* dy, const bf16* xbc, const bf16* dt,          \
                                                         const bf16* dt_bias, const bf16* a_log, float* dxbc,      \
                                                         float* qform, SSD_ARGS) {                                  \
        ssd_bwd_keys_tc<P, N, false>(dy, xbc, dt, dt_bias, a_log, dxbc, qform, SSD_DIMS);                          \
    }                                                                                                              \
    extern "C" __global__ void ssd_bwd_db_tc_p##P##_n##N(const bf16* dy, const bf16* xbc, const bf16* dt,          \
                                                         const bf16* dt_bias, const bf16* a_log, float* dxbc,      \
                                                         SSD_ARGS) {                                               \
        ssd_bwd_keys_tc<P, N, true>(dy, xbc, dt, dt_bias, a_log, dxbc, nullptr, SSD_DIMS);                         \
    }                                                                                                              \
    extern "C" __global__ void ssd_bwd_dc_tc_p##P##_n##N(const bf16* dy, const bf16* xbc, const bf16* dt,          \
                                                         const bf16* dt_bias, const bf16* a_log, float* dxbc,      \
                                                         float* qform, SSD_ARGS) {                                  \
        ssd_bwd_dc_tc<P, N>(dy, xbc, dt, dt_bias, a_log, dxbc, qform, SSD_DIMS);                                    \
    }

// The (head dim, state size) pairs with tensor-core forms (SSD_TC_SHAPES in src/backend.rs).
SSD_TC_KERNELS(32, 32)
SSD_TC_KERNELS(64, 64)
SSD_TC_KERNELS(64, 128)
SSD_TC_KERNELS(128, 128)
