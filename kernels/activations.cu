// Pointwise activations, forward and backward: gated linear units (SwiGLU, GeGLU), GELU (tanh
// approximation), squared ReLU and SiLU.
//
// Computes (T = float or bf16 storage, fp32 arithmetic), with n the elements of `out`:
//   glu:     out[r, j] = act(g) * u, with g = gate_up[r, j] and u = gate_up[r, F + j]
//            (gate and up are the two halves of one [rows, 2F] buffer: one GEMM makes both;
//            act SiLU for SwiGLU, GELU for GeGLU)
//   gelu:    out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
//   relu2:   out = max(x, 0)^2
//   silu:    out = x sigmoid(x)
// Backward needs the saved input (gate_up, or x) and writes (not accumulates) its gradient:
//   glu:     dg = dy u act'(g), du = dy act(g); silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)
// Launch: a grid-stride loop over elements, any grid. Memory-bound: a GLU's forward reads
// 2n and writes n values, backward reads 3n and writes 2n; ~10-20 FLOPs per element.
#include "common.cuh"

// tanh through exp, as the CPU reference computes it: under --use_fast_math, NVRTC makes
// tanhf the GPU's tanh.approx.f32 (about 5e-4 relative error), too coarse for f32 training
// and for its check against the CPU; __expf and this division are within a few ulp.
__device__ __forceinline__ float tanh_through_exp(float u) {
    const float e = __expf(-2.0f * fabsf(u));
    return copysignf(__fdividef(1.0f - e, 1.0f + e), u);
}

__device__ __forceinline__ float gelu_tanh(float x, float* derivative) {
    const float c = 0.7978845608f, k = 0.044715f;
    const float t = tanh_through_exp(c * (x + k * x * x * x));
    *derivative = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * c * (1.0f + 3.0f * k * x * x);
    return 0.5f * x * (1.0f + t);
}

// kind: 0 = GELU (tanh), 1 = squared ReLU, 2 = SiLU, as ondol_core::Activation orders them.
__device__ __forceinline__ float activate(int kind, float x, float* derivative) {
    if (kind == 0) return gelu_tanh(x, derivative);
    if (kind == 2) {
        const float s = sigmoidf(x);
        *derivative = s * (1.0f + x * (1.0f - s));
        return x * s;
    }
    const float p = fmaxf(x, 0.0f);
    *derivative = 2.0f * p;
    return p * p;
}

template <typename T>
__device__ void glu_forward(int kind, const T* gate_up, T* out, long long n, int width) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / width, j = i % width;
        const float g = to_float(gate_up[r * 2 * width + j]), u = to_float(gate_up[r * 2 * width + width + j]);
        float unused;
        out[i] = from_float<T>(activate(kind, g, &unused) * u);
    }
}

template <typename T>
__device__ void glu_backward(int kind, const T* dout, const T* gate_up, T* dgate_up, long long n, int width) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / width, j = i % width;
        const long long gi = r * 2 * width + j, ui = gi + width;
        const float g = to_float(gate_up[gi]), u = to_float(gate_up[ui]), dy = to_float(dout[i]);
        float derivative;
        const float a = activate(kind, g, &derivative);
        dgate_up[gi] = from_float<T>(dy * u * derivative);
        dgate_up[ui] = from_float<T>(dy * a);
    }
}

template <typename T>
__device__ void activation_forward(int kind, const T* x, T* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float unused;
        out[i] = from_float<T>(activate(kind, to_float(x[i]), &unused));
    }
}

template <typename T>
__device__ void activation_backward(int kind, const T* dout, const T* x, T* dx, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float derivative;
        activate(kind, to_float(x[i]), &derivative);
        dx[i] = from_float<T>(to_float(dout[i]) * derivative);
    }
}

#define ACTIVATION_KERNELS(T, S)                                                                                   \
    extern "C" __global__ void glu_forward_##S(int kind, const T* gate_up, T* out, long long n, int width) {       \
        glu_forward<T>(kind, gate_up, out, n, width);                                                              \
    }                                                                                                              \
    extern "C" __global__ void glu_backward_##S(int kind, const T* dout, const T* gate_up, T* dgate_up,            \
                                                long long n, int width) {                                          \
        glu_backward<T>(kind, dout, gate_up, dgate_up, n, width);                                                  \
    }                                                                                                              \
    extern "C" __global__ void activation_forward_##S(int kind, const T* x, T* out, long long n) {                 \
        activation_forward<T>(kind, x, out, n);                                                                    \
    }                                                                                                              \
    extern "C" __global__ void activation_backward_##S(int kind, const T* dout, const T* x, T* dx, long long n) {  \
        activation_backward<T>(kind, dout, x, dx, n);                                                              \
    }

FOR_EACH_STORAGE(ACTIVATION_KERNELS)
