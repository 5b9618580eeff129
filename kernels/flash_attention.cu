// Flash attention (FlashAttention-2's schedule) for causal grouped-query attention in bf16 on
// tensor cores, forward and backward; head dims 32, 64, 80, 96 and 128 (the code takes
// multiples of 16 up to 128: these are the instances, for the models that use them; the
// backend falls back to the simple kernel of attention.cu for other head dims and for fp32).
//
// Computes what attention.cu computes (see there), with scale = 1 / sqrt(D) and f_i the first
// key of query i (first_keys[b T + i], non-decreasing along the sequence; 0 where null):
//   out_i = sum_{f_i <= j <= i} softmax_j(scale q_i . k_j) v_j,  lse_i = log sum_{f_i <= j <= i} exp(scale q_i . k_j)
// and backward, from dO, the saved lse and delta_i = dO_i . out_i (flash_backward_dot):
//   P = exp(scale Q K^T - lse), dV = P^T dO, dS = P (dO V^T - delta), dK = scale dS^T Q, dQ = scale dS K.
// The T x T matrices exist only tile by tile, in registers and shared memory.
// Layouts: first_keys u32 [B T]; qkv [B T, (H + 2 Hkv) D] bf16 (q heads, k heads, v heads); out, dout [B T, H D];
// lse, delta fp32 [B, H, T]; dqkv [B T, (H + 2 Hkv) D] bf16, written; dq_acc fp32 [B T, H D],
// zeroed by the caller, which flash_backward_dq turns into dqkv's q columns. qkv and dout are
// 16-byte aligned (rows go to shared memory by cp.async in 16-byte pieces).
// Products are mma.sync.m16n8k16 (bf16 in, fp32 accumulate), one warp per 16 rows, their
// shared-memory operands read by ldmatrix (.trans where the operand is stored the other way
// round: V and dO in P V and P^T dO, Q in dS^T Q, dS^T and K in dS K). A product's result
// stays in the accumulator layout, which is also the A-operand layout of the next product
// (P V, P^T dO, dS^T Q), so P is never written to shared memory.
// Forward: grid (ceil(T / 128), H, B), 256 threads (8 warps x 16 query rows). Q lives in
// registers; 64-key tiles of K and V go to shared memory by cp.async, staggered as
// FlashAttention-2 does: V's tile lands while S = Q K^T is computed, the next K tile while
// the softmax and P V run. The softmax is online (a running max and sum per row, in base 2);
// key tiles before the block's first query's first key or past its last query are skipped,
// and only tiles that reach a warp's diagonal or its rows' first keys are masked. Shared memory: 2 x 64 x (D + 8) bf16.
// Backward: grid (ceil(T / 128), Hkv, B), 256 threads (8 warps x 16 keys); a block owns a
// 128-key tile of one kv head, so dK and dV accumulate in registers without atomics over the
// query heads of the group and the query tiles at or after the key tile (32 queries a step,
// the next step's Q and dO tiles landing by cp.async while this one computes; queries whose
// first key is past the tile are skipped); dQ, which
// every key tile touches, goes to dq_acc with fp32 atomics. Shared memory: K and V tiles,
// STAGES (2, or 1 where 2 exceed the GPU's) Q and dO tiles (32 x (D + 8) bf16 each), dS^T
// (128 x 40 bf16), STAGES of lse and delta: 115,200 bytes at D = 128 with 2, 97,536 with 1.
// FLOPs: 2 T^2 D per head forward (4 T^2 D / 2 causal), 2.5x that backward; bytes: Q, K, V,
// O once per block row, K and V re-read per 128-query tile (Q and dO per 128-key tile
// backward). Not here: wgmma and TMA on sm_90a.
#include "common.cuh"

#define FA_PAD SMEM_PAD
#define FA_WARPS 8               // forward: warps per block, 16 query rows each
#define FA_BM (16 * FA_WARPS)    // query rows per forward block
#define FA_BN 64                 // keys per forward tile
#define FA_BK 128                // keys per backward block
#define FA_BWD_WARPS (FA_BK / 16)  // backward: warps per block, 16 keys each
#define FA_BQ 32                 // query rows per backward step

template <int D>
__device__ void flash_forward(const bf16* qkv, bf16* out, float* lse, const unsigned* first_keys, int seq, int n_heads,
                              int n_kv_heads) {
    extern __shared__ __align__(16) bf16 fa_smem[];
    constexpr int S = D + FA_PAD;
    bf16* Ks = fa_smem;
    bf16* Vs = fa_smem + FA_BN * S;
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
    // Each row's first key (0 past the sequence, where nothing is written), and the block's.
    const unsigned* fk = first_keys ? first_keys + (long long)b * seq : nullptr;
    const int first[2] = {fk && rows[0] < seq ? (int)fk[rows[0]] : 0, fk && rows[1] < seq ? (int)fk[rows[1]] : 0};
    const int kv_begin = fk ? (int)fk[qt * FA_BM] / FA_BN * FA_BN : 0, first_hi = max(first[0], first[1]);

    const int kv_end = min(seq, (qt + 1) * FA_BM);
    stage_rows<D>(Ks, Kg, W, kv_begin, seq, FA_BN);
    unsigned qf[D / 16][4];
    load_a_fragments<D>(qf, Qg, W, r0, seq);
    float o[D / 8][4];
    zero_acc(o);
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    const float scale_log2 = rsqrtf((float)D) * 1.4426950408889634f;

    for (int j0 = kv_begin; j0 < kv_end; j0 += FA_BN) {
        cp_async_wait<0>();
        __syncthreads();  // K's tile has landed, and every warp is done with the previous V
        stage_rows<D>(Vs, Vg, W, j0, seq, FA_BN);
        float s[FA_BN / 8][4];
        zero_acc(s);
        mma_abt<D, FA_BN / 8>(s, qf, Ks, S);
        // Scale into base 2 and mask where the tile reaches past the warp's first row (keys
        // past the sequence are past every row) or before this thread's rows' first keys; then
        // the online softmax, per row (i >> 1).
        const bool masked = j0 + FA_BN - 1 > r0 || j0 < first_hi;
        float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nt = 0; nt < FA_BN / 8; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int col = j0 + nt * 8 + 2 * t + (i & 1), row = rows[i >> 1];
                const float x = !masked || (col <= row && col >= first[i >> 1]) ? s[nt][i] * scale_log2 : NEG_INF;
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
        cp_async_wait<0>();
        __syncthreads();  // V's tile has landed, and every warp is done with K's
        if (j0 + FA_BN < kv_end) stage_rows<D>(Ks, Kg, W, j0 + FA_BN, seq, FA_BN);
        // O += P V: P's accumulators are A fragments over 16 keys at a time.
        mma_acc_b<FA_BN, D / 8>(o, s, Vs, S);
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
            store_pair(dst + n * 8 + 2 * t, pack_bf16(o[n][2 * r] * inv, o[n][2 * r + 1] * inv));
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

// The last query of sequence b whose first key is at most `key` (seq - 1 without first keys,
// or for a key past the sequence): the first keys do not decrease along the sequence, and
// the query at `key` sees it, so a binary search from there.
__device__ int last_query_seeing(const unsigned* first_keys, int b, int seq, int key) {
    if (!first_keys || key >= seq) return seq - 1;
    const unsigned* fk = first_keys + (long long)b * seq;
    int lo = key + 1, hi = seq;  // the first query after key whose first key is past it
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if ((int)fk[mid] > key) hi = mid;
        else lo = mid + 1;
    }
    return lo - 1;
}

// STAGES buffers of the Q, dO, lse and delta tiles: 2 loads the next step's during this
// one's products, 1 (for GPUs with 99 KiB of shared memory a block, where 2 do not fit at
// D = 128) during this one's dQ, once its products are done with them.
template <int D, int STAGES>
__device__ void flash_backward(const bf16* dout, const bf16* qkv, const float* lse, const float* delta, float* dq_acc,
                               bf16* dqkv, const unsigned* first_keys, int seq, int n_heads, int n_kv_heads) {
    static_assert(STAGES == 1 || STAGES == 2, "one or two buffers of the query tiles");
    extern __shared__ __align__(16) bf16 fa_smem[];
    constexpr int S = D + FA_PAD, SD = FA_BQ + FA_PAD;
    bf16* Ks = fa_smem;                 // [FA_BK][S]
    bf16* Vs = Ks + FA_BK * S;          // [FA_BK][S]
    bf16* Qs = Vs + FA_BK * S;               // [STAGES][FA_BQ][S]: this step's (and the next one's)
    bf16* dOs = Qs + STAGES * FA_BQ * S;     // [STAGES][FA_BQ][S]
    bf16* dSt = dOs + STAGES * FA_BQ * S;    // [FA_BK][SD]: dS^T of the step
    float* lse_s = (float*)(dSt + FA_BK * SD);  // [STAGES][FA_BQ], base 2
    float* delta_s = lse_s + STAGES * FA_BQ;    // [STAGES][FA_BQ]
    const int kt = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int group = n_heads / n_kv_heads;
    const long long W = (long long)(n_heads + 2 * n_kv_heads) * D, O = (long long)n_heads * D;
    const bf16* base = qkv + (long long)b * seq * W;
    const int j0 = kt * FA_BK, k0 = j0 + warp * 16;  // the block's and this warp's first key
    const int keys[2] = {k0 + g, k0 + g + 8};
    // The last query that sees each of this thread's keys: the first keys bound the queries
    // from above as the diagonal does from below (and keep them inside the sequence).
    const int last_query[2] = {last_query_seeing(first_keys, b, seq, keys[0]),
                               last_query_seeing(first_keys, b, seq, keys[1])};
    const float scale = rsqrtf((float)D), scale_log2 = scale * 1.4426950408889634f;
    // The steps: each query head of the group, over the query tiles from the one holding
    // key j0 (queries before it see none of the block's keys) to the one holding the last
    // query that sees the block's last key.
    const int q_first = j0 / FA_BQ * FA_BQ, q_end = last_query_seeing(first_keys, b, seq, j0 + FA_BK - 1) + 1;
    const int per_head = (q_end - q_first + FA_BQ - 1) / FA_BQ;
    // Starts the copies of step i's Q and dO tiles (and writes its lse and delta) into buffer i % STAGES.
    auto prefetch = [&](int i) {
        const int h = kvh * group + i / per_head, q0 = q_first + i % per_head * FA_BQ, buf = i % STAGES;
        stage_rows<D>(Qs + buf * FA_BQ * S, base + (long long)h * D, W, q0, seq, FA_BQ);
        stage_rows<D>(dOs + buf * FA_BQ * S, dout + (long long)b * seq * O + (long long)h * D, O, q0, seq, FA_BQ);
        const long long at = ((long long)b * n_heads + h) * seq;
        for (int e = threadIdx.x; e < FA_BQ; e += blockDim.x) {
            const bool valid = q0 + e < seq;
            lse_s[buf * FA_BQ + e] = valid ? lse[at + q0 + e] * 1.4426950408889634f : 0.0f;
            delta_s[buf * FA_BQ + e] = valid ? delta[at + q0 + e] : 0.0f;
        }
    };

    stage_rows<D>(Ks, base + (long long)(n_heads + kvh) * D, W, j0, seq, FA_BK);
    stage_rows<D>(Vs, base + (long long)(n_heads + n_kv_heads + kvh) * D, W, j0, seq, FA_BK);
    prefetch(0);
    float dk[D / 8][4], dv[D / 8][4];
    zero_acc(dk);
    zero_acc(dv);

    for (int i = 0; i < group * per_head; i++) {
        const int h = kvh * group + i / per_head, q0 = q_first + i % per_head * FA_BQ, buf = i % STAGES;
        const bf16 *Qt = Qs + buf * FA_BQ * S, *dOt = dOs + buf * FA_BQ * S;
        const float *lse_t = lse_s + buf * FA_BQ, *delta_t = delta_s + buf * FA_BQ;
        cp_async_wait<0>();
        __syncthreads();  // step i's tiles have landed; every warp is done with step i - 1's and dS^T
        if (STAGES == 2 && i + 1 < group * per_head) prefetch(i + 1);
        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x FA_BQ queries, 16 of D at a time.
        float st[FA_BQ / 8][4], dpt[FA_BQ / 8][4];
        zero_acc(st);
        zero_acc(dpt);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            unsigned ka[4], va[4];
            load_a_tile(ka, Ks + warp * 16 * S + kk * 16, S);
            load_a_tile(va, Vs + warp * 16 * S + kk * 16, S);
#pragma unroll
            for (int nt = 0; nt < FA_BQ / 8; nt += 2) {
                unsigned qb[4], ob[4];
                load_b_tile_nk(qb, Qt + nt * 8 * S + kk * 16, S);
                load_b_tile_nk(ob, dOt + nt * 8 * S + kk * 16, S);
                mma_16816(st[nt], ka, qb);
                mma_16816(st[nt + 1], ka, qb + 2);
                mma_16816(dpt[nt], va, ob);
                mma_16816(dpt[nt + 1], va, ob + 2);
            }
        }
        // P^T and dS^T = P^T (dP^T - delta), masked: key <= query <= the key's last query (so
        // the query's first key <= key, and the query is inside the sequence), the key too.
#pragma unroll
        for (int nt = 0; nt < FA_BQ / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int qc = nt * 8 + 2 * t + (e & 1), query = q0 + qc, key = keys[e >> 1];
                const bool valid = key <= query && query <= last_query[e >> 1] && key < seq;
                const float p = valid ? exp2f(st[nt][e] * scale_log2 - lse_t[qc]) : 0.0f;
                st[nt][e] = p;
                dpt[nt][e] = p * (dpt[nt][e] - delta_t[qc]);
            }
        // dV += P^T dO and dK += dS^T Q: the accumulators as A fragments over FA_BQ queries.
        mma_acc_b<FA_BQ, D / 8>(dv, st, dOt, S);
        mma_acc_b<FA_BQ, D / 8>(dk, dpt, Qt, S);
        // dS^T to shared memory, for dQ = dS K over the block's FA_BK keys.
#pragma unroll
        for (int nt = 0; nt < FA_BQ / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                dSt[(warp * 16 + g + 8 * (e >> 1)) * SD + nt * 8 + 2 * t + (e & 1)] = from_float<bf16>(dpt[nt][e]);
        __syncthreads();  // dS^T is written, and every warp is done with the step's Q, dO, lse and delta
        if (STAGES == 1 && i + 1 < group * per_head) prefetch(i + 1);
        // dQ (FA_BQ x D) += dS K: 16-row x 16-column tiles shared among the warps.
        for (int tile = warp; tile < (FA_BQ / 16) * (D / 16); tile += FA_BWD_WARPS) {
            const int mt = tile / (D / 16), n = 2 * (tile % (D / 16));
            float acc[2][4];
            zero_acc(acc);
#pragma unroll
            for (int kk = 0; kk < FA_BK / 16; kk++) {
                unsigned a[4], kb[4];
                load_a_tile_trans(a, dSt + kk * 16 * SD + mt * 16, SD);
                load_b_tile_kn(kb, Ks + kk * 16 * S + n * 8, S);
                mma_16816(acc[0], a, kb);
                mma_16816(acc[1], a, kb + 2);
            }
#pragma unroll
            for (int u = 0; u < 2; u++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int query = q0 + mt * 16 + g + 8 * (e >> 1), col = (n + u) * 8 + 2 * t + (e & 1);
                    if (query < seq)
                        atomicAdd(&dq_acc[((long long)b * seq + query) * O + (long long)h * D + col], acc[u][e] * scale);
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
            store_pair(row + (long long)(n_heads + kvh) * D + col,
                       pack_bf16(dk[n][2 * r] * scale, dk[n][2 * r + 1] * scale));
            store_pair(row + (long long)(n_heads + n_kv_heads + kvh) * D + col,
                       pack_bf16(dv[n][2 * r], dv[n][2 * r + 1]));
        }
    }
}

// dqkv's q columns = dq_acc, as bf16.
extern "C" __global__ void flash_backward_dq(const float* dq_acc, bf16* dqkv, int n_heads, int n_kv_heads, int D,
                                             long long rows) {
    const long long q_width = (long long)n_heads * D, W = (long long)(n_heads + 2 * n_kv_heads) * D;
    GRID_STRIDE(e, rows * q_width) dqkv[e / q_width * W + e % q_width] = from_float<bf16>(dq_acc[e]);
}

#define FLASH_BACKWARD(D, STAGES)                                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * FA_BWD_WARPS)                                               \
        flash_backward_d##D##_s##STAGES(const bf16* dout, const bf16* qkv, const float* lse, const float* delta,  \
                                        float* dq_acc, bf16* dqkv, const unsigned* first_keys, int seq,           \
                                        int n_heads, int n_kv_heads) {                                            \
        flash_backward<D, STAGES>(dout, qkv, lse, delta, dq_acc, dqkv, first_keys, seq, n_heads, n_kv_heads);     \
    }
#define FLASH_KERNELS(D)                                                                                           \
    extern "C" __global__ void __launch_bounds__(32 * FA_WARPS)                                                   \
        flash_forward_d##D(const bf16* qkv, bf16* out, float* lse, const unsigned* first_keys, int seq,          \
                           int n_heads, int n_kv_heads) {                                                          \
        flash_forward<D>(qkv, out, lse, first_keys, seq, n_heads, n_kv_heads);                                     \
    }                                                                                                              \
    FLASH_BACKWARD(D, 2)

FLASH_KERNELS(32)
FLASH_KERNELS(64)
FLASH_KERNELS(80)
FLASH_KERNELS(96)
FLASH_KERNELS(128)
// The one head dim whose two stages exceed 99 KiB (sm_86, sm_89, sm_120), the least any GPU
// that runs these kernels has.
FLASH_BACKWARD(128, 1)

