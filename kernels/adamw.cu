// AdamW over flat fp32 buffers (decoupled weight decay, bias-corrected moments).
//
// Computes, per element (all fp32; the caller folds the bias corrections into step_size =
// lr / (1 - beta1^t) and inv_bc2_sqrt = 1 / sqrt(1 - beta2^t), as the CPU reference does):
//   g = grad * grad_scale;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p = p * decay - step_size * m / (sqrt(v) * inv_bc2_sqrt + eps),  decay = 1 - lr * wd
// and, if `copy` is not null, copy = bf16(p): the compute copy of the master weights, written
// in the same pass. Nothing is saved. Launch: a grid-stride loop, any grid. Memory-bound: 16
// bytes read and 12 written per element (+2 with the copy), ~15 FLOPs.
#include "common.cuh"

extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, bf16* copy, long long n, float beta1,
                                 float beta2, float eps, float step_size, float inv_bc2_sqrt, float decay,
                                 float grad_scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float gi = g[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        const float pi = p[i] * decay - step_size * mi / (sqrtf(vi) * inv_bc2_sqrt + eps);
        m[i] = mi;
        v[i] = vi;
        p[i] = pi;
        if (copy) copy[i] = from_float<bf16>(pi);
    }
}
