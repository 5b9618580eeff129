// Mamba-1's selective scan with its step, decay, skip and gate fused, forward and backward.
//
// Computes, per sequence b and channel d, a state h of n <= SCAN_MAX_STATE values
// (T = float or bf16 storage, fp32 arithmetic and state):
//   dt = softplus(delta[t, d] + delta_bias[d]),  A[d, i] = -exp(a_log[d, i])
//   h_t = exp(dt A) h_{t-1} + dt B_t u_t,        y_t = (C_t . h_t + D[d] u_t) silu(z_t)
// Layouts: u, delta, z, y, du, ddelta, dz are [rows = batch * len, channels]; B, C (and their
// fp32 gradient accumulators) [rows, n]; a_log [channels, n]; delta_bias, D [channels].
// Forward saves the state after every `chunk` tokens (and the zero state before the
// sequence): states [batch, len / chunk + 1, channels, n], fp32. For inference it runs with no
// states and a `carry` instead ([batch, channels, n], fp32): h starts from it and ends in it.
// Backward walks each chunk in reverse from its saved state: a first pass stores the state
// every SCAN_SUB tokens (in `sub`, fp32 [batch, chunk / SCAN_SUB, SCAN_MAX_STATE, channels]),
// then each SCAN_SUB-token piece is recomputed into registers and the adjoint recurrence
// (dL/dh_{t-1} = exp(dt A) dL/dh_t, plus the readout's C_t g) runs back through it. So
// memory is O(len / chunk) states and the recompute costs two forward passes. du, ddelta, dz
// are written; dB and dC (sums over channels) are added into fp32 accumulators that the
// caller zeroes and converts; ddelta_bias, da_log (= dA * A) and dD accumulate (fp32).
// Launch: one thread per (channel, sequence): grid (ceil(channels / blockDim.x), batch),
// blockDim.x a multiple of 32; every thread of a block runs the same loops (inactive channels
// compute zeros) because the dB/dC reduction over channels synchronises the block each step.
// Forward stages B and C of SCAN_TILE tokens in shared memory (each is read by every channel).
// Cost per (token, channel): forward ~6n FLOPs and n exps, reads u, delta, z and writes y;
// backward ~3x that, plus a 31-shuffle reduce-scatter of the 2n dB/dC values per warp.
#include "common.cuh"

#define SCAN_MAX_STATE 16
#define SCAN_TILE 32
#define SCAN_SUB 8

// One step of the recurrence for this thread's channel: h = exp(dt A) h + dt B u.
__device__ __forceinline__ void scan_advance(float* h, const float* a, const float* bt, float dt, float ut, int n) {
#pragma unroll
    for (int i = 0; i < SCAN_MAX_STATE; i++)
        if (i < n) h[i] = __expf(dt * a[i]) * h[i] + dt * bt[i] * ut;
}

template <typename T>
__device__ void selective_scan_forward(const T* u, const T* delta, const T* delta_bias, const T* a_log, const T* B,
                                       const T* C, const T* Dskip, const T* z, T* y, float* states, float* carry,
                                       int len, int channels, int n, int chunk) {
    __shared__ float bs[SCAN_TILE][SCAN_MAX_STATE], cs[SCAN_TILE][SCAN_MAX_STATE];
    const int d = blockIdx.x * blockDim.x + threadIdx.x, b = blockIdx.y;
    const bool active = d < channels;
    const int saved = (len + chunk - 1) / chunk + 1;
    float h[SCAN_MAX_STATE], a[SCAN_MAX_STATE];
    float bias = 0.0f, skip = 0.0f;
#pragma unroll
    for (int i = 0; i < SCAN_MAX_STATE; i++) {
        h[i] = carry && active && i < n ? carry[((long long)b * channels + d) * n + i] : 0.0f;
        a[i] = active && i < n ? -__expf(to_float(a_log[d * n + i])) : 0.0f;
    }
    if (active) {
        bias = to_float(delta_bias[d]);
        skip = to_float(Dskip[d]);
        if (states)
            for (int i = 0; i < n; i++) states[((long long)b * saved * channels + d) * n + i] = 0.0f;
    }
    for (int t0 = 0; t0 < len; t0 += SCAN_TILE) {
        __syncthreads();  // the previous tile has been read
        for (int e = threadIdx.x; e < SCAN_TILE * n; e += blockDim.x) {
            const int tt = e / n, i = e % n, t = t0 + tt;
            const long long row = (long long)b * len + t;
            bs[tt][i] = t < len ? to_float(B[row * n + i]) : 0.0f;
            cs[tt][i] = t < len ? to_float(C[row * n + i]) : 0.0f;
        }
        __syncthreads();
        if (!active) continue;
        for (int tt = 0; tt < SCAN_TILE && t0 + tt < len; tt++) {
            const int t = t0 + tt;
            const long long at = ((long long)b * len + t) * channels + d;
            const float dt = softplusf(to_float(delta[at]) + bias), ut = to_float(u[at]);
            scan_advance(h, a, bs[tt], dt, ut, n);
            float acc = 0.0f;
#pragma unroll
            for (int i = 0; i < SCAN_MAX_STATE; i++)
                if (i < n) acc += cs[tt][i] * h[i];
            y[at] = from_float<T>((acc + skip * ut) * siluf(to_float(z[at])));
            if (states && ((t + 1) % chunk == 0 || t + 1 == len)) {
                const int slot = (t + 1 + chunk - 1) / chunk;
                float* out = states + (((long long)b * saved + slot) * channels + d) * n;
                for (int i = 0; i < n; i++) out[i] = h[i];
            }
        }
    }
    if (carry && active)
        for (int i = 0; i < n; i++) carry[((long long)b * channels + d) * n + i] = h[i];
}

// The sum over the warp of each of the 32 values v[0..32) of every lane, left in lane j for
// value j: recursive halving, 31 shuffles instead of 32 x 5.
__device__ __forceinline__ float warp_reduce_scatter32(float* v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int w = 16; w > 0; w >>= 1) {
        const bool upper = lane & w;
#pragma unroll
        for (int j = 0; j < w; j++) {
            const float keep = upper ? v[j + w] : v[j], give = upper ? v[j] : v[j + w];
            v[j] = keep + __shfl_xor_sync(0xffffffffu, give, w);
        }
    }
    return v[0];
}

template <typename T>
__device__ void selective_scan_backward(const T* dy, const T* u, const T* delta, const T* delta_bias, const T* a_log,
                                        const T* B, const T* C, const T* Dskip, const T* z, const float* states,
                                        T* du, T* ddelta, float* ddelta_bias, float* da_log, float* db_acc,
                                        float* dc_acc, float* dd, T* dz, float* sub, int len, int channels, int n,
                                        int chunk) {
    __shared__ float red[2][32][2 * SCAN_MAX_STATE];  // per warp, dB | dC of one token; double-buffered
    const int d = blockIdx.x * blockDim.x + threadIdx.x, b = blockIdx.y;
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    const bool active = d < channels;
    const int saved = (len + chunk - 1) / chunk + 1, nsub = (chunk + SCAN_SUB - 1) / SCAN_SUB;
    float a[SCAN_MAX_STATE], dh[SCAN_MAX_STATE], pa[SCAN_MAX_STATE];
#pragma unroll
    for (int i = 0; i < SCAN_MAX_STATE; i++) {
        a[i] = active && i < n ? -__expf(to_float(a_log[d * n + i])) : 0.0f;
        dh[i] = pa[i] = 0.0f;
    }
    const float bias = active ? to_float(delta_bias[d]) : 0.0f, skip = active ? to_float(Dskip[d]) : 0.0f;
    float pd = 0.0f, pbias = 0.0f;
    int parity = 0;
    // Loads of token `t`'s per-channel and per-state values (zeros for inactive channels).
    auto channel_at = [&](const T* p, int t) { return active ? to_float(p[((long long)b * len + t) * channels + d]) : 0.0f; };
    auto states_at = [&](const T* p, int t, float* out) {
        const long long row = (long long)b * len + t;
#pragma unroll
        for (int i = 0; i < SCAN_MAX_STATE; i++) out[i] = i < n ? to_float(p[row * n + i]) : 0.0f;
    };
    for (int c = (len + chunk - 1) / chunk - 1; c >= 0; c--) {
        const int t0 = c * chunk, t1 = min(len, t0 + chunk);
        // Pass 1: the state every SCAN_SUB tokens of the chunk.
        float h[SCAN_MAX_STATE], bt[SCAN_MAX_STATE];
        const float* h0 = states + (((long long)b * saved + c) * channels + (active ? d : 0)) * n;
#pragma unroll
        for (int i = 0; i < SCAN_MAX_STATE; i++) h[i] = active && i < n ? h0[i] : 0.0f;
        for (int t = t0; t < t1; t++) {
            if ((t - t0) % SCAN_SUB == 0 && active) {
                float* s = sub + ((long long)b * nsub + (t - t0) / SCAN_SUB) * SCAN_MAX_STATE * channels + d;
                for (int i = 0; i < SCAN_MAX_STATE; i++) s[i * channels] = h[i];
            }
            states_at(B, t, bt);
            scan_advance(h, a, bt, softplusf(channel_at(delta, t) + bias), channel_at(u, t), n);
        }
        // Pass 2: each piece recomputed into registers, then walked backwards.
        for (int s = (t1 - t0 - 1) / SCAN_SUB; s >= 0; s--) {
            const int ts = t0 + s * SCAN_SUB, te = min(t1, ts + SCAN_SUB);
            float hist[SCAN_SUB + 1][SCAN_MAX_STATE];  // hist[k]: the state before token ts + k
            const float* from = sub + ((long long)b * nsub + s) * SCAN_MAX_STATE * channels + (active ? d : 0);
#pragma unroll
            for (int i = 0; i < SCAN_MAX_STATE; i++) hist[0][i] = active ? from[i * channels] : 0.0f;
            for (int k = 0; k < te - ts; k++) {
#pragma unroll
                for (int i = 0; i < SCAN_MAX_STATE; i++) hist[k + 1][i] = hist[k][i];
                states_at(B, ts + k, bt);
                scan_advance(hist[k + 1], a, bt, softplusf(channel_at(delta, ts + k) + bias), channel_at(u, ts + k), n);
            }
            for (int t = te - 1; t >= ts; t--) {
                const float* h_prev = hist[t - ts];
                const float* h_t = hist[t - ts + 1];
                float ct[SCAN_MAX_STATE], v[2 * SCAN_MAX_STATE];
                states_at(B, t, bt);
                states_at(C, t, ct);
                const float dt = softplusf(channel_at(delta, t) + bias), ut = channel_at(u, t);
                const float zt = channel_at(z, t), out = channel_at(dy, t);
                float readout = skip * ut;
#pragma unroll
                for (int i = 0; i < SCAN_MAX_STATE; i++) readout += ct[i] * h_t[i];
                const float g = out * siluf(zt);  // dL/d(C.h + D u)
                pd += g * ut;
                float du_acc = g * skip, ddt_acc = 0.0f;
#pragma unroll
                for (int i = 0; i < SCAN_MAX_STATE; i++) {
                    const float adj = dh[i] + g * ct[i];  // dL/dh_t
                    const float decay = __expf(dt * a[i]);
                    pa[i] += adj * dt * decay * h_prev[i];
                    ddt_acc += adj * (a[i] * decay * h_prev[i] + bt[i] * ut);
                    v[i] = adj * dt * ut;                // this channel's dB_t[i]
                    v[SCAN_MAX_STATE + i] = g * h_t[i];  // and dC_t[i]
                    du_acc += adj * dt * bt[i];
                    dh[i] = adj * decay;  // dL/dh_{t-1} through h_t
                }
                // d softplus(x) / dx = sigmoid(x) = 1 - exp(-softplus(x)).
                const float ddt = ddt_acc * -expm1f(-dt);
                pbias += ddt;
                if (active) {
                    const long long at = ((long long)b * len + t) * channels + d;
                    du[at] = from_float<T>(du_acc);
                    ddelta[at] = from_float<T>(ddt);
                    dz[at] = from_float<T>(out * readout * silu_grad(zt));
                }
                // dB_t and dC_t: sums over the channels of the block, then over the blocks.
                red[parity][warp][lane] = warp_reduce_scatter32(v);
                __syncthreads();
                if (threadIdx.x < 2 * SCAN_MAX_STATE) {
                    float sum = 0.0f;
                    for (int w = 0; w < warps; w++) sum += red[parity][w][threadIdx.x];
                    const int i = threadIdx.x % SCAN_MAX_STATE;
                    const long long row = (long long)b * len + t;
                    if (i < n) atomicAdd(&(threadIdx.x < SCAN_MAX_STATE ? db_acc : dc_acc)[row * n + i], sum);
                }
                parity ^= 1;
            }
        }
    }
    if (!active) return;
    for (int i = 0; i < n; i++) atomicAdd(&da_log[d * n + i], pa[i] * a[i]);  // dA_log = dA A
    atomicAdd(&dd[d], pd);
    atomicAdd(&ddelta_bias[d], pbias);
}

#define SCAN_KERNELS(T, S)                                                                                         \
    extern "C" __global__ void selective_scan_forward_##S(                                                         \
        const T* u, const T* delta, const T* delta_bias, const T* a_log, const T* B, const T* C, const T* Dskip,   \
        const T* z, T* y, float* states, float* carry, int len, int channels, int n, int chunk) {                  \
        selective_scan_forward<T>(u, delta, delta_bias, a_log, B, C, Dskip, z, y, states, carry, len, channels, n,  \
                                  chunk);                                                                          \
    }                                                                                                              \
    extern "C" __global__ void selective_scan_backward_##S(                                                        \
        const T* dy, const T* u, const T* delta, const T* delta_bias, const T* a_log, const T* B, const T* C,      \
        const T* Dskip, const T* z, const float* states, T* du, T* ddelta, float* ddelta_bias, float* da_log,     \
        float* db_acc, float* dc_acc, float* dd, T* dz, float* sub, int len, int channels, int n, int chunk) {     \
        selective_scan_backward<T>(dy, u, delta, delta_bias, a_log, B, C, Dskip, z, states, du, ddelta,           \
                                   ddelta_bias, da_log, db_acc, dc_acc, dd, dz, sub, len, channels, n, chunk);     \
    }

FOR_EACH_STORAGE(SCAN_KERNELS)
