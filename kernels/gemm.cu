// A GEMM on CUDA cores: what runs where cuBLASLt has no algorithm for a shape (its heuristic
// has been seen to refuse degenerate ones: one row, one column, a sum of one). Correct for
// every shape, not fast.
//
// Computes, per batch z (row-major, as ondol's Gemm):
//   C_z = alpha op(A_z) op(B_z) + beta C_z,   op(A) [m, k] (A [m, k], or [k, m] transposed),
//   op(B) [k, n] (B [k, n], or [n, k] transposed),  X_z = X + z stride_x,
// with fp32 accumulation; beta = 0 writes C without reading it. Storage: gemm_f32 (f32 in
// and out), gemm_bf16 (bf16 in and out), gemm_bf16_f32 (bf16 in, f32 out: weight gradients).
// Nothing is saved for a backward (the backward of a GEMM is GEMMs).
// Launch: 256 threads (16 x 16, one output each), grid (ceil(n / 16), rows, batches), any
// rows and batches (the kernel strides over the rest); 16 x 16 tiles of op(A) and op(B) go
// through shared memory. FLOPs 2 m n k per batch; bytes: A read ceil(n / 16) times, B
// ceil(m / 16) times, C once (twice with beta).
#include "common.cuh"

#define GEMM_TILE 16

template <typename In, typename Out>
__device__ void gemm_tiles(const In* a, const In* b, Out* c, int m, int n, int k, int trans_a, int trans_b,
                           long long stride_a, long long stride_b, long long stride_c, int batch, float alpha,
                           float beta) {
    __shared__ float As[GEMM_TILE][GEMM_TILE + 1], Bs[GEMM_TILE][GEMM_TILE + 1];
    const int tx = threadIdx.x % GEMM_TILE, ty = threadIdx.x / GEMM_TILE;
    const int col = blockIdx.x * GEMM_TILE + tx, row_tiles = (m + GEMM_TILE - 1) / GEMM_TILE;
    for (int z = blockIdx.z; z < batch; z += gridDim.z) {
        const In* az = a + z * stride_a;
        const In* bz = b + z * stride_b;
        Out* cz = c + z * stride_c;
        for (int rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
            const int row = rt * GEMM_TILE + ty;
            float acc = 0.0f;
            for (int k0 = 0; k0 < k; k0 += GEMM_TILE) {
                // op(A)[row][k0 + tx] and op(B)[k0 + ty][col], zeros outside.
                const int ka = k0 + tx, kb = k0 + ty;
                As[ty][tx] = row < m && ka < k
                                 ? to_float(trans_a ? az[(long long)ka * m + row] : az[(long long)row * k + ka])
                                 : 0.0f;
                Bs[ty][tx] = kb < k && col < n
                                 ? to_float(trans_b ? bz[(long long)col * k + kb] : bz[(long long)kb * n + col])
                                 : 0.0f;
                __syncthreads();
#pragma unroll
                for (int kk = 0; kk < GEMM_TILE; kk++) acc += As[ty][kk] * Bs[kk][tx];
                __syncthreads();  // the tiles have been read
            }
            if (row < m && col < n) {
                Out* out = cz + (long long)row * n + col;
                *out = from_float<Out>(alpha * acc + (beta == 0.0f ? 0.0f : beta * to_float(*out)));
            }
        }
    }
}

#define GEMM_KERNEL(NAME, IN, OUT)                                                                                 \
    extern "C" __global__ void __launch_bounds__(GEMM_TILE * GEMM_TILE)                                           \
        NAME(const IN* a, const IN* b, OUT* c, int m, int n, int k, int trans_a, int trans_b, long long stride_a, \
             long long stride_b, long long stride_c, int batch, float alpha, float beta) {                         \
        gemm_tiles<IN, OUT>(a, b, c, m, n, k, trans_a, trans_b, stride_a, stride_b, stride_c, batch, alpha, beta); \
    }

GEMM_KERNEL(gemm_f32, float, float)
GEMM_KERNEL(gemm_bf16, bf16, bf16)
GEMM_KERNEL(gemm_bf16_f32, bf16, float)
