// Flash attention (FlashAttention-2's schedule) for causal grouped-query attention in bf16 on
// tensor cores, forward and backward; head dim 64 or 128 (the backend falls back to the simple
// kernel of attention.cu for other head dims and for fp32 storage).
//
// Computes what attention.cu computes (see there), with scale = 1 / sqrt(D):
//   out_i = sum_{j <= i} softmax_j(scale q_i . k_j) v_j,  lse_i = log sum_{j <= i} exp(scale q_i . k_j)
// and backward, from dO, the saved lse and delta_i = dO_i . out_i (flash_backward_dot):
//   P = exp(scale Q K^T - lse), dV = P^T dO, dS = P (dO V^T - delta), dK = scale dS^T Q, dQ = scale dS K.
// The T x T matrices exist only tile by tile, in registers and shared memory.
// Layouts: qkv [B T, (H + 2 Hkv) D] bf16 (q heads, k heads, v heads); out, dout [B T, H D];
// lse, delta fp32 [B, H, T]; dqkv [B T, (H + 2 Hkv) D] bf16, written; dq_acc fp32 [B T, H D],
// zeroed by the caller, which flash_backward_dq turns into dqkv's q columns.
// Products are mma.sync.m16n8k16 (bf16 in, fp32 accumulate), one warp per 16 rows; a
// product's result stays in the accumulator layout, which is also the A-operand layout of the
// next product (P V, P^T dO, dS^T Q), so P is never written to shared memory.
// Forward: grid (ceil(T / 64), H, B), 128 threads (4 warps x 16 query rows). Q lives in
// registers; 64-key tiles of K and V are staged in shared memory; the softmax is online (a
// running max and sum per row, in base 2), and key tiles past the block's last query are
// skipped (causal). Shared memory: 2 x 64 x (D + 8) bf16.
// Backward: grid (ceil(T / 64), Hkv, B), 128 threads (4 warps x 16 keys); a block owns a
// 64-key tile of one kv head, so dK and dV accumulate in registers without atomics over the
// query heads of the group and the query tiles at or after the key tile (32 queries at a
// time); dQ, which every key tile touches, goes to dq_acc with fp32 atomics. Shared memory:
// K and V tiles, Q and dO tiles (32 x (D + 8) bf16 each), dS^T (64 x 40 bf16), lse and delta.
// FLOPs: 2 T^2 D per head forward (4 T^2 D / 2 causal), 2.5x that backward; bytes: Q, K, V,
// O once per block row, K and V re-read per query tile. Todo: ldmatrix (and .trans for V and
// dO), cp.async double buffering, wgmma on sm_90a.
#include "common.cuh"

#define FA_BM 64       // query rows per forward block
#define FA_BN 64       // keys per tile
#define FA_BQ 32       // query rows per backward step
#define FA_PAD SMEM_PAD
#define FA_WARPS 4

template <int D>
__device__ void flash_forward(const bf16* qkv, bf16* out, float* lse, int seq, int n_heads, int n_kv_heads) {
    extern __shared__ bf16 fa_smem[];
    bf16* Ks = fa_smem;
    bf16* Vs = fa_smem + FA_BN * (D + FA_PAD);
    const int qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int kvh = h / (n_heads / n_kv_heads);
    const long long W = (long long)(n_heads + 2 * n_kv_heads) * D;
    const bf16* base = qkv + (long long)b * seq * W;
    const bf16* Qg = base + (long long)h * D;
    const bf16* Kg = base + (long long)(n_heads + kvh) * D;
    const bf16* Vg = base + (long long)(n_heads + n_kv_heads + kvh) * D;
    const int r0 = qt * FA_BM + warp * 16;  // this warp's first query row
    const int rows[2] = {r0 + g, r0 + g + 8};

    unsigned qf[D / 16][4];
    load_a_fragments<D>(qf, Qg, W, r0, seq);
    float o[D / 8][4];
    zero_acc(o);
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    const float scale_log2 = rsqrtf((float)D) * 1.4426950408889634f;

    const int kv_end = min(seq, (qt + 1) * FA_BM);
    for (int j0 = 0; j0 < kv_end; j0 += FA_BN) {
        __syncthreads();  // the previous tiles have been read
        stage_rows<D>(Ks, Kg, W, j0, seq, FA_BN);
        stage_rows<D>(Vs, Vg, W, j0, seq, FA_BN);
        __syncthreads();
        float s[FA_BN / 8][4];
        zero_acc(s);
        mma_abt<D, FA_BN / 8>(s, qf, Ks, D + FA_PAD);
        // Scale into base 2 and mask; then the online softmax, per row (i >> 1) of the thread.
        float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nt = 0; nt < FA_BN / 8; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int col = j0 + nt * 8 + 2 * t + (i & 1), row = rows[i >> 1];
                const float x = col <= row && col < seq ? s[nt][i] * scale_log2 : NEG_INF;
                s[nt][i] = x;
                tile_max[i >> 1] = fmaxf(tile_max[i >> 1], x);
            }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            // The four threads of a quad hold one row between them.
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
            const float m_new = fmaxf(m[r], tile_max[r]);
            corr[r] = m[r] == NEG_INF ? 0.0f : exp2f(m[r] - m_new);
            m[r] = m_new;
            l[r] *= corr[r];
        }
#pragma unroll
        for (int nt = 0; nt < FA_BN / 8; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int r = i >> 1;
                const float p = m[r] == NEG_INF ? 0.0f : exp2f(s[nt][i] - m[r]);
                s[nt][i] = p;
                l[r] += p;
            }
#pragma unroll
        for (int n = 0; n < D / 8; n++)
#pragma unroll
            for (int i = 0; i < 4; i++) o[n][i] *= corr[i >> 1];
        // O += P V: P's accumulators are A fragments over 16 keys at a time.
        mma_acc_b<FA_BN, D / 8>(o, s, Vs, D + FA_PAD);
    }
    // Normalise and write; the quad's partial row sums add up first.
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] = quad_sum(l[r]);
        const int row = rows[r];
        if (row >= seq) continue;
        const float inv = 1.0f / l[r];
        bf16* dst = out + ((long long)b * seq + row) * n_heads * D + (long long)h * D;
#pragma unroll
        for (int n = 0; n < D / 8; n++)
            *(unsigned*)(dst + n * 8 + 2 * t) = pack_bf16(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        if (t == 0) lse[((long long)b * n_heads + h) * seq + row] = (m[r] + log2f(l[r])) * 0.6931471805599453f;
    }
}

// delta[b, h, t] = dO . out over the head's D values: one warp per (row, head).
extern "C" __global__ void flash_backward_dot(const bf16* dout, const bf16* out, float* delta, int seq, int n_heads,
                                              int D, long long rows) {
    const long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= rows * n_heads) return;
    const long long r = warp / n_heads;
    const int h = (int)(warp % n_heads);
    const bf16* a = dout + r * n_heads * D + (long long)h * D;
    const bf16* o = out + r * n_heads * D + (long long)h * D;
    float acc = 0.0f;
    for (int c = lane; c < D; c += 32) acc += to_float(a[c]) * to_float(o[c]);
    acc = warp_sum(acc);
    const long long b = r / seq, t = r % seq;
    if (lane == 0) delta[(b * n_heads + h) * seq + t] = acc;
}

template <int D>
__device__ void flash_backward(const bf16* dout, const bf16* qkv, const float* lse, const float* delta, float* dq_acc,
                               bf16* dqkv, int seq, int n_heads, int n_kv_heads) {
    extern __shared__ bf16 fa_smem[];
    constexpr int S = D + FA_PAD;
    bf16* Ks = fa_smem;                      // [FA_BN][S]
    bf16* Vs = Ks + FA_BN * S;               // [FA_BN][S]
    bf16* Qs = Vs + FA_BN * S;               // [FA_BQ][S]
    bf16* dOs = Qs + FA_BQ * S;              // [FA_BQ][S]
    bf16* dSt = dOs + FA_BQ * S;             // [FA_BN][FA_BQ + FA_PAD]: dS^T of the step
    float* lse_s = (float*)(dSt + FA_BN * (FA_BQ + FA_PAD));  // [FA_BQ], base 2
    float* delta_s = lse_s + FA_BQ;                           // [FA_BQ]
    const int kt = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int group = n_heads / n_kv_heads;
    const long long W = (long long)(n_heads + 2 * n_kv_heads) * D;
    const bf16* base = qkv + (long long)b * seq * W;
    const int j0 = kt * FA_BN, k0 = j0 + warp * 16;  // the block's and this warp's first key
    const int keys[2] = {k0 + g, k0 + g + 8};
    const float scale = rsqrtf((float)D), scale_log2 = scale * 1.4426950408889634f;

    stage_rows<D>(Ks, base + (long long)(n_heads + kvh) * D, W, j0, seq, FA_BN);
    stage_rows<D>(Vs, base + (long long)(n_heads + n_kv_heads + kvh) * D, W, j0, seq, FA_BN);
    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++)
#pragma unroll
        for (int i = 0; i < 4; i++) dk[n][i] = dv[n][i] = 0.0f;

    for (int hh = 0; hh < group; hh++) {
        const int h = kvh * group + hh;
        const float* lse_h = lse + ((long long)b * n_heads + h) * seq;
        const float* delta_h = delta + ((long long)b * n_heads + h) * seq;
        for (int q0 = j0 / FA_BQ * FA_BQ; q0 < seq; q0 += FA_BQ) {
            __syncthreads();  // the previous step's tiles have been read (and K, V written)
            stage_rows<D>(Qs, base + (long long)h * D, W, q0, seq, FA_BQ);
            stage_rows<D>(dOs, dout + (long long)b * seq * n_heads * D + (long long)h * D, (long long)n_heads * D,
                            q0, seq, FA_BQ);
            for (int e = threadIdx.x; e < FA_BQ; e += blockDim.x) {
                const bool valid = q0 + e < seq;
                lse_s[e] = valid ? lse_h[q0 + e] * 1.4426950408889634f : 0.0f;
                delta_s[e] = valid ? delta_h[q0 + e] : 0.0f;
            }
            __syncthreads();
            // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x FA_BQ queries.
            float st[FA_BQ / 8][4], dpt[FA_BQ / 8][4];
#pragma unroll
            for (int nt = 0; nt < FA_BQ / 8; nt++) {
#pragma unroll
                for (int i = 0; i < 4; i++) st[nt][i] = dpt[nt][i] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) {
                    unsigned ka[4], va[4];
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        const int row = warp * 16 + g + 8 * (i & 1), col = kk * 16 + 2 * t + 8 * (i >> 1);
                        ka[i] = load_pair(Ks + row * S + col);
                        va[i] = load_pair(Vs + row * S + col);
                    }
                    const bf16* q = Qs + (nt * 8 + g) * S + kk * 16 + 2 * t;
                    const bf16* o = dOs + (nt * 8 + g) * S + kk * 16 + 2 * t;
                    const unsigned qb[2] = {load_pair(q), load_pair(q + 8)}, ob[2] = {load_pair(o), load_pair(o + 8)};
                    mma_16816(st[nt], ka, qb);
                    mma_16816(dpt[nt], va, ob);
                }
            }
            // P^T and dS^T = P^T (dP^T - delta), masked: query >= key, both inside the sequence.
#pragma unroll
            for (int nt = 0; nt < FA_BQ / 8; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int qc = nt * 8 + 2 * t + (i & 1), query = q0 + qc, key = keys[i >> 1];
                    const bool valid = key <= query && query < seq && key < seq;
                    const float p = valid ? exp2f(st[nt][i] * scale_log2 - lse_s[qc]) : 0.0f;
                    st[nt][i] = p;
                    dpt[nt][i] = p * (dpt[nt][i] - delta_s[qc]);
                }
            // dV += P^T dO and dK += dS^T Q: accumulators as A fragments over FA_BQ queries.
#pragma unroll
            for (int kk = 0; kk < FA_BQ / 16; kk++) {
                const unsigned pa[4] = {pack_bf16(st[2 * kk][0], st[2 * kk][1]), pack_bf16(st[2 * kk][2], st[2 * kk][3]),
                                        pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                        pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3])};
                const unsigned da[4] = {
                    pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]), pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]),
                    pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]), pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
                for (int n = 0; n < D / 8; n++) {
                    const bf16* o = dOs + (kk * 16 + 2 * t) * S + n * 8 + g;
                    const bf16* q = Qs + (kk * 16 + 2 * t) * S + n * 8 + g;
                    const unsigned ob[2] = {load_strided(o, S), load_strided(o + 8 * S, S)};
                    const unsigned qb[2] = {load_strided(q, S), load_strided(q + 8 * S, S)};
                    mma_16816(dv[n], pa, ob);
                    mma_16816(dk[n], da, qb);
                }
            }
            // dS^T to shared memory, for dQ = dS K over the block's 64 keys.
#pragma unroll
            for (int nt = 0; nt < FA_BQ / 8; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                    dSt[(warp * 16 + g + 8 * (i >> 1)) * (FA_BQ + FA_PAD) + nt * 8 + 2 * t + (i & 1)] =
                        from_float<bf16>(dpt[nt][i]);
            __syncthreads();
            // dQ (FA_BQ x D) += dS K: 2 row tiles x D/8 column tiles shared among the warps.
            for (int tile = warp; tile < (FA_BQ / 16) * (D / 8); tile += FA_WARPS) {
                const int mt = tile / (D / 8), n = tile % (D / 8);
                float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int kk = 0; kk < FA_BN / 16; kk++) {
                    unsigned a[4];
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        const int q = mt * 16 + g + 8 * (i & 1), key = kk * 16 + 2 * t + 8 * (i >> 1);
                        a[i] = load_strided(dSt + key * (FA_BQ + FA_PAD) + q, FA_BQ + FA_PAD);
                    }
                    const bf16* k = Ks + (kk * 16 + 2 * t) * S + n * 8 + g;
                    const unsigned kb[2] = {load_strided(k, S), load_strided(k + 8 * S, S)};
                    mma_16816(acc, a, kb);
                }
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int query = q0 + mt * 16 + g + 8 * (i >> 1), col = n * 8 + 2 * t + (i & 1);
                    if (query < seq)
                        atomicAdd(&dq_acc[((long long)b * seq + query) * n_heads * D + (long long)h * D + col],
                                  acc[i] * scale);
                }
            }
        }
    }
    // This key tile's dK (scaled) and dV, into their columns of dqkv.
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int key = keys[r];
        if (key >= seq) continue;
        bf16* row = dqkv + ((long long)b * seq + key) * W;
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            const int col = n * 8 + 2 * t;
            *(unsigned*)(row + (long long)(n_heads + kvh) * D + col) =
                pack_bf16(dk[n][2 * r] * scale, dk[n][2 * r + 1] * scale);
            *(unsigned*)(row + (long long)(n_heads + n_kv_heads + kvh) * D + col) =
                pack_bf16(dv[n][2 * r], dv[n][2 * r + 1]);
        }
    }
}

// dqkv's q columns = dq_acc, as bf16.
extern "C" __global__ void flash_backward_dq(const float* dq_acc, bf16* dqkv, int n_heads, int n_kv_heads, int D,
                                             long long rows) {
    const long long q_width = (long long)n_heads * D, W = (long long)(n_heads + 2 * n_kv_heads) * D;
    GRID_STRIDE(e, rows * q_width) dqkv[e / q_width * W + e % q_width] = from_float<bf16>(dq_acc[e]);
}

#define FLASH_KERNELS(D)                                                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                                             \
        flash_forward_d##D(const bf16* qkv, bf16* out, float* lse, int seq, int n_heads, int n_kv_heads) {        \
        flash_forward<D>(qkv, out, lse, seq, n_heads, n_kv_heads);                                                 \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                                             \
        flash_backward_d##D(const bf16* dout, const bf16* qkv, const float* lse, const float* delta,              \
                            float* dq_acc, bf16* dqkv, int seq, int n_heads, int n_kv_heads) {                    \
        flash_backward<D>(dout, qkv, lse, delta, dq_acc, dqkv, seq, n_heads, n_kv_heads);                         \
    }

FLASH_KERNELS(64)
FLASH_KERNELS(128)

