// Token embeddings (a vocabulary shard of them) and learned positions, forward and backward.
//
// Computes, for row r of `rows` tokens (T = float or bf16 storage):
//   forward:   out[r] = table[ids[r] - first_id] (zero if this shard does not hold the id)
//                       + pos[r % seq] (if pos is given)
//   backward:  dtable[ids[r] - first_id] += dout[r];  dpos[r % seq] += dout[r]
// Layouts: ids u32 [rows]; table [vocab_rows, dim]; pos [>= seq, dim]; out, dout [rows, dim];
// dtable and dpos are fp32 gradients and accumulate. Nothing is saved for backward but ids.
// Launch: forward a grid-stride loop over rows x dim; backward one atomicAdd per element
// (rows that share a token add into one table row; the order, and last bits, vary by run).
// Memory-bound: forward reads and writes rows x dim values; backward reads them and adds
// into as many.
#include "common.cuh"

template <typename T>
__device__ void embedding_forward(const unsigned* ids, const T* table, int vocab_rows, int first_id, const T* pos,
                                  int seq, T* out, long long rows, int dim) {
    const long long n = rows * dim;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / dim;
        const int c = (int)(i % dim);
        const long long row = (long long)ids[r] - first_id;
        float v = (row >= 0 && row < vocab_rows) ? to_float(table[row * dim + c]) : 0.0f;
        if (pos) v += to_float(pos[(r % seq) * dim + c]);
        out[i] = from_float<T>(v);
    }
}

template <typename T>
__device__ void embedding_backward(const unsigned* ids, const T* dout, float* dtable, int vocab_rows, int first_id,
                                   long long rows, int dim) {
    const long long n = rows * dim;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / dim;
        const long long row = (long long)ids[r] - first_id;
        if (row >= 0 && row < vocab_rows) atomicAdd(&dtable[row * dim + i % dim], to_float(dout[i]));
    }
}

template <typename T>
__device__ void position_embedding_backward(const T* dout, float* dpos, int seq, long long rows, int dim) {
    const long long n = rows * dim;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / dim;
        atomicAdd(&dpos[(r % seq) * dim + i % dim], to_float(dout[i]));
    }
}

#define EMBEDDING_KERNELS(T, S)                                                                                    \
    extern "C" __global__ void embedding_forward_##S(const unsigned* ids, const T* table, int vocab_rows,          \
                                                     int first_id, const T* pos, int seq, T* out, long long rows,  \
                                                     int dim) {                                                    \
        embedding_forward<T>(ids, table, vocab_rows, first_id, pos, seq, out, rows, dim);                         \
    }                                                                                                              \
    extern "C" __global__ void embedding_backward_##S(const unsigned* ids, const T* dout, float* dtable,           \
                                                      int vocab_rows, int first_id, long long rows, int dim) {     \
        embedding_backward<T>(ids, dout, dtable, vocab_rows, first_id, rows, dim);                                 \
    }                                                                                                              \
    extern "C" __global__ void position_embedding_backward_##S(const T* dout, float* dpos, int seq, long long rows, \
                                                               int dim) {                                          \
        position_embedding_backward<T>(dout, dpos, seq, rows, dim);                                                \
    }

FOR_EACH_STORAGE(EMBEDDING_KERNELS)
