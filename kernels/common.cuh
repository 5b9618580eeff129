// Shared by every kernel file: storage types and their conversions, and warp/block sums.
//
// Kernels are compiled at run time by NVRTC with no include path, so nothing here includes
// a CUDA header: bf16 is its raw 16 bits, converted by hand (the same bits as
// __float2bfloat16_rn for every non-NaN value). Every kernel computes in fp32 whatever its
// storage type; each op family is instantiated for float (checked against the CPU reference
// to fp32 round-off) and bf16 (mixed-precision training).
#pragma once

typedef unsigned short bf16;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __uint_as_float(((unsigned)x) << 16); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
// Round to nearest, ties to even; NaN stays a (quiet) NaN.
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

#define NEG_INF (-__int_as_float(0x7f800000))

// A grid-stride loop: `i` takes every index below `n` once across the whole grid.
#define GRID_STRIDE(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + __expf(-x)); }
__device__ __forceinline__ float siluf(float x) { return x * sigmoidf(x); }
// d silu(x) / dx = s (1 + x (1 - s)) with s = sigmoid(x).
__device__ __forceinline__ float silu_grad(float x) {
    const float s = sigmoidf(x);
    return s * (1.0f + x * (1.0f - s));
}
// log(1 + e^x), linear above 20 as PyTorch's softplus is; its derivative is sigmoid(x).
__device__ __forceinline__ float softplusf(float x) { return x > 20.0f ? x : log1pf(__expf(x)); }

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// The sum of `x` over the block, returned to every thread. `scratch` holds 32 floats;
// blockDim.x is a multiple of 32. Ends with a barrier, so scratch can be reused at once.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    x = warp_sum(x);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : 0.0f;
    x = warp_sum(x);
    __syncthreads();
    return x;
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    x = warp_max(x);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : NEG_INF;
    x = warp_max(x);
    __syncthreads();
    return x;
}

// ---- Tensor cores (mma.sync.m16n8k16, bf16 in, fp32 accumulate), for one warp ---------------
// Fragments follow the PTX ISA: with g = lane / 4 and t = lane % 4, A (16 x 16, row-major)
// holds rows g and g + 8 at columns 2t, 2t + 1 (and + 8); B (16 x 8, column-major) holds rows
// 2t, 2t + 1 (and + 8) of column g; the accumulator (16 x 8) rows g and g + 8 at columns 2t,
// 2t + 1. An accumulator over 16 columns is thus the A fragment of the next product.
// d += a b for one warp: a 16 x 16 (row-major fragments), b 16 x 8 (column fragments).
__device__ __forceinline__ void mma_16816(float* d, const unsigned* a, const unsigned* b) {
#ifdef ONDOL_EMU
    ondol_emu_mma_bf16_m16n8k16(d, a, b, d);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)from_float<bf16>(lo) | ((unsigned)from_float<bf16>(hi) << 16);
}

// Two consecutive bf16 as one 32-bit word (the lower index in the low half), and back. `p`
// must be 4-byte aligned (an even element of an aligned buffer): the GPU faults where it is
// not, the CPU does not, so the emulator checks.
__device__ __forceinline__ unsigned load_pair(const bf16* p) {
#ifdef ONDOL_EMU
    ondol_emu_check_aligned(p, 4, "a bf16 pair's load");
#endif
    return *(const unsigned*)p;
}
__device__ __forceinline__ void store_pair(bf16* p, unsigned v) {
#ifdef ONDOL_EMU
    ondol_emu_check_aligned(p, 4, "a bf16 pair's store");
#endif
    *(unsigned*)p = v;
}

// ---- Shared-memory fragments (ldmatrix) and asynchronous copies (cp.async), sm_80 and up ----

// The shared-memory address (state space .shared) of a generic pointer into shared memory;
// the compiler's own conversion, so address arithmetic folds into the instructions' offsets.
#ifndef ONDOL_EMU
__device__ __forceinline__ unsigned shared_address(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
#endif

// ldmatrix.x4 for one warp: lane l gives the address of row l % 8 of 8 x 8 bf16 matrix l / 8
// (16 bytes, 16-byte aligned, in shared memory); lane 4g + t receives in r[i] row g,
// columns 2t and 2t + 1 of matrix i, or with TRANS column g, rows 2t and 2t + 1: exactly the
// fragments above.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const bf16* row) {
#ifdef ONDOL_EMU
    ondol_emu_ldmatrix(r, 4, TRANS, row);
#else
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(shared_address(row)));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(shared_address(row)));
#endif
}

// One warp's A fragments of the 16 x 16 block at `m` of a row-major bf16 matrix in shared
// memory (rows `ld` apart, 16-byte aligned).
__device__ __forceinline__ void load_a_tile(unsigned (&a)[4], const bf16* m, int ld) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4<false>(a, m + (lane & 15) * ld + (lane >> 4) * 8);
}

// The same for A = M^T: A[i][k] = M[k][i], the 16 x 16 block of M at `m` stored row-major.
__device__ __forceinline__ void load_a_tile_trans(unsigned (&a)[4], const bf16* m, int ld) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4<true>(a, m + ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8);
}

// B fragments from a matrix stored as [n][k] rows (B = M^T, as K is in Q K^T): the 16 x 16
// block at `m` (16 rows n, 16 columns k), b[0..1] for n = 0 to 7 and b[2..3] for 8 to 15.
__device__ __forceinline__ void load_b_tile_nk(unsigned (&b)[4], const bf16* m, int ld) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4<false>(b, m + ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8);
}

// B fragments from a matrix stored as [k][n] rows (as V is in P V): the 16 x 16 block at `m`,
// b[0..1] for columns 0 to 7 and b[2..3] for 8 to 15.
__device__ __forceinline__ void load_b_tile_kn(unsigned (&b)[4], const bf16* m, int ld) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4<true>(b, m + (lane & 15) * ld + (lane >> 4) * 8);
}

// Starts copying 16 bytes from global `src` to shared `dst` (both 16-byte aligned), or 16
// zeros where `valid` is false (`src` is then not read). The copy has landed once the thread
// has committed it and waited for its group (cp_async_wait), and others may read it after a
// barrier that follows the wait.
__device__ __forceinline__ void cp_async_16(bf16* dst, const bf16* src, bool valid) {
#ifdef ONDOL_EMU
    ondol_emu_cp_async(dst, src, valid ? 16 : 0);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
#endif
}

// Closes the thread's copies since the last commit into a group.
__device__ __forceinline__ void cp_async_commit() {
#ifdef ONDOL_EMU
    ondol_emu_cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most the newest `PENDING` committed groups of the thread are in flight.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
#ifdef ONDOL_EMU
    ondol_emu_cp_async_wait(PENDING);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
#endif
}

#define SMEM_PAD 8  // bf16 elements of padding per shared-memory row (bank conflicts)

// Starts copying `rows` rows of COLS bf16 (`src_stride` apart in global memory, from row
// `first` of `limit` valid ones) into shared memory rows of COLS + SMEM_PAD, and commits
// them as one group; rows past `limit` become zeros. COLS is a multiple of 8, `dst`, `src`
// and the global rows 16-byte aligned. Padded rows are 16-byte multiples whose 8-row spans
// cover all 32 banks, so ldmatrix reads them without conflicts.
template <int COLS>
__device__ void stage_rows(bf16* dst, const bf16* src, long long src_stride, int first, int limit, int rows) {
    constexpr int chunks = COLS / 8;
    for (int e = threadIdx.x; e < rows * chunks; e += blockDim.x) {
        const int r = e / chunks, c = 8 * (e % chunks);
        const bool valid = first + r < limit;
        cp_async_16(dst + r * (COLS + SMEM_PAD) + c, src + (valid ? (long long)(first + r) * src_stride : 0) + c,
                    valid);
    }
    cp_async_commit();
}

// One warp's A fragments of a 16 x K tile of row-major bf16 in global memory: rows r0 + g
// and r0 + g + 8 of `base` (`stride` apart), zeros at or past row `limit`.
template <int K>
__device__ __forceinline__ void load_a_fragments(unsigned (&f)[K / 16][4], const bf16* base, long long stride,
                                                 int r0, int limit) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int row = r0 + g + 8 * (i & 1), col = kk * 16 + 2 * t + 8 * (i >> 1);
            f[kk][i] = row < limit ? load_pair(base + row * stride + col) : 0u;
        }
}

// acc (16 x 8 NT) += A B^T for one warp: A as fragments over K, B as NT x 8 rows of K bf16 in
// shared memory, `ld` apart and 16-byte aligned (the product Q K^T).
template <int K, int NT>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const unsigned (&a)[K / 16][4], const bf16* b, int ld) {
    static_assert(NT % 2 == 0, "B fragments are loaded 16 columns at a time");
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++)
#pragma unroll
        for (int nt = 0; nt < NT; nt += 2) {
            unsigned bf[4];
            load_b_tile_nk(bf, b + nt * 8 * ld + kk * 16, ld);
            mma_16816(acc[nt], a[kk], bf);
            mma_16816(acc[nt + 1], a[kk], bf + 2);
        }
}

// The A fragments over 16 columns of an accumulator (columns 16 kk to 16 kk + 15), rounded
// to bf16: the accumulator layout is the A layout.
template <int N>
__device__ __forceinline__ void acc_as_a(unsigned (&af)[4], const float (&acc)[N][4], int kk) {
    af[0] = pack_bf16(acc[2 * kk][0], acc[2 * kk][1]);
    af[1] = pack_bf16(acc[2 * kk][2], acc[2 * kk][3]);
    af[2] = pack_bf16(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    af[3] = pack_bf16(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// acc (16 x 8 NT) += A B for one warp: A a 16 x K accumulator (rounded to bf16 as it becomes
// the A fragments), B as K rows of 8 NT bf16 in shared memory, `ld` apart and 16-byte
// aligned (the product P V).
template <int K, int NT>
__device__ __forceinline__ void mma_acc_b(float (&acc)[NT][4], const float (&a)[K / 8][4], const bf16* b, int ld) {
    static_assert(NT % 2 == 0, "B fragments are loaded 16 columns at a time");
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++) {
        unsigned af[4];
        acc_as_a(af, a, kk);
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
            unsigned bf[4];
            load_b_tile_kn(bf, b + kk * 16 * ld + n * 8, ld);
            mma_16816(acc[n], af, bf);
            mma_16816(acc[n + 1], af, bf + 2);
        }
    }
}

// The sum over the four threads of a quad (which hold one accumulator row between them).
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Zeroes an accumulator.
template <int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[NT][4]) {
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[n][i] = 0.0f;
}

// `FOR_EACH_STORAGE(M)` expands `M(float, f32) M(bf16, bf16)`: each file's macro M defines
// the extern "C" kernels `name_f32` and `name_bf16` around its templated body.
#define FOR_EACH_STORAGE(M) M(float, f32) M(bf16, bf16)
