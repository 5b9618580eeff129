// The emulator's own test kernels (src/emu.rs): each does what a kernel of kernels/ must not,
// so a test can see that the emulator fails it, or shows it, as a GPU would. Compiled for the
// emulator only.
#include "common.cuh"

// Block 0 writes its static shared array; every block then reads it. On a GPU the other
// blocks read undefined values; on the emulator they must read its poison, not block 0's.
extern "C" __global__ void read_static_shared_of_another_block(float* out) {
    __shared__ float s[32];
    if (blockIdx.x == 0) s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x];
}

// Stores a bf16 pair at `at`, which the GPU faults on unless it is 4-byte aligned.
extern "C" __global__ void store_bf16_pair(bf16* at) { store_pair(at, 0u); }

// Bounded to 64 threads a block: the GPU refuses a launch of more.
extern "C" __global__ void __launch_bounds__(2 * 32) bounded_to_two_warps(float* out) { out[threadIdx.x] = 1.0f; }

// Multiplies pairs whose product (or whose first factor) is an f32 denormal: built with
// --use_fast_math, the GPU flushes both to zero.
extern "C" __global__ void multiply_pairs(const float* a, const float* b, float* out) {
    out[threadIdx.x] = a[threadIdx.x] * b[threadIdx.x];
}
