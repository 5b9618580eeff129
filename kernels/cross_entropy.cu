// Softmax cross-entropy over a [rows, vocab] logit matrix, fused with its gradient, and the
// two halves of the vocab-parallel version. Rows are `stride >= vocab` values apart: a head
// padded to aligned rows leaves `stride - vocab` columns that are no token's. They are never
// read, and the gradient kernels write them 0 (the head's backward GEMMs read whole rows).
//
// Computes, per row r with target t (T = float or bf16 storage, fp32 arithmetic):
//   cross_entropy:      losses[r] = logsumexp(logits[r]) - logits[r, t]; with write_grad != 0
//                       the logits are overwritten by grad_scale * (softmax(logits[r]) - onehot(t))
//                       (the matrix exists once; nothing else is saved for backward)
//   cross_entropy_stats (a vocabulary shard holding ids first_id..first_id + vocab):
//                       stats[r] = (max, sum exp(x - max), logits[r, t - first_id] or 0)
//   cross_entropy_grad: logits[r] = scale * exp(logits[r] - lse[r]), minus scale at the target
//                       column if this shard holds it
// A row whose target is IGNORED_TARGET (0xFFFFFFFF: a token that is not learned) is not read:
// loss 0, stats (0, 0, 0), gradient 0.
// Launch: one block per row; blockDim a multiple of 32. Each thread keeps an online (max,
// sum) over its columns, merged across the block, so the statistics take one read of the
// row; the gradient a second read and one write. Per row: ~2-3 reads and 1 write of vocab
// values, one exp per value per pass.
#include "common.cuh"

#define IGNORED_TARGET 0xFFFFFFFFu

// An ignored target's row: gradient 0 in every column, padding included.
template <typename T>
__device__ void zero_row(T* row, int stride) {
    for (int c = threadIdx.x; c < stride; c += blockDim.x) row[c] = from_float<T>(0.0f);
}

// This thread's (max, sum exp(x - max)) over its columns, merged over the block.
template <typename T>
__device__ void row_max_sum(const T* row, int vocab, float* scratch, float* max_out, float* sum_out) {
    float m = NEG_INF, s = 0.0f;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float v = to_float(row[c]);
        if (v > m) {
            s = s * __expf(m - v) + 1.0f;
            m = v;
        } else {
            s += __expf(v - m);
        }
    }
    const float row_max = block_max(m, scratch);
    // A thread that saw no column has m = -inf and s = 0: it adds nothing.
    const float scaled = s > 0.0f ? s * __expf(m - row_max) : 0.0f;
    *sum_out = block_sum(scaled, scratch);
    *max_out = row_max;
}

template <typename T>
__device__ void cross_entropy(T* logits, const unsigned* targets, float* losses, int rows, int vocab, int stride,
                              int write_grad, float grad_scale) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    T* row = logits + (size_t)r * stride;
    const unsigned t = targets[r];
    if (t == IGNORED_TARGET) {
        if (threadIdx.x == 0) losses[r] = 0.0f;
        if (write_grad) zero_row(row, stride);
        return;
    }
    float m, s;
    row_max_sum(row, vocab, scratch, &m, &s);
    if (threadIdx.x == 0) losses[r] = m + __logf(s) - to_float(row[t]);
    if (!write_grad) return;
    // Thread 0 reads row[t] for the loss after the block sums' last barrier: no thread may
    // overwrite the row before it has.
    __syncthreads();
    const float k = grad_scale / s;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        float g = k * __expf(to_float(row[c]) - m);
        if (c == (int)t) g -= grad_scale;
        row[c] = from_float<T>(g);
    }
    for (int c = vocab + threadIdx.x; c < stride; c += blockDim.x) row[c] = from_float<T>(0.0f);
}

template <typename T>
__device__ void cross_entropy_stats(const T* logits, const unsigned* targets, float* stats, int rows, int first_id,
                                    int vocab, int stride) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const T* row = logits + (size_t)r * stride;
    if (targets[r] == IGNORED_TARGET) {
        if (threadIdx.x == 0) stats[3 * r] = stats[3 * r + 1] = stats[3 * r + 2] = 0.0f;
        return;
    }
    float m, s;
    row_max_sum(row, vocab, scratch, &m, &s);
    if (threadIdx.x == 0) {
        const long long col = (long long)targets[r] - first_id;
        stats[3 * r] = m;
        stats[3 * r + 1] = s;
        stats[3 * r + 2] = (col >= 0 && col < vocab) ? to_float(row[col]) : 0.0f;
    }
}

template <typename T>
__device__ void cross_entropy_grad(T* logits, const unsigned* targets, const float* lse, int rows, int first_id,
                                   int vocab, int stride, float scale) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    T* row = logits + (size_t)r * stride;
    if (targets[r] == IGNORED_TARGET) {
        zero_row(row, stride);
        return;
    }
    const float l = lse[r];
    const long long target_col = (long long)targets[r] - first_id;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        float g = scale * __expf(to_float(row[c]) - l);
        if (c == target_col) g -= scale;
        row[c] = from_float<T>(g);
    }
    for (int c = vocab + threadIdx.x; c < stride; c += blockDim.x) row[c] = from_float<T>(0.0f);
}

#define CROSS_ENTROPY_KERNELS(T, S)                                                                                   \
    extern "C" __global__ void cross_entropy_##S(T* logits, const unsigned* targets, float* losses, int rows,         \
                                                 int vocab, int stride, int write_grad, float grad_scale) {           \
        cross_entropy<T>(logits, targets, losses, rows, vocab, stride, write_grad, grad_scale);                       \
    }                                                                                                                 \
    extern "C" __global__ void cross_entropy_stats_##S(const T* logits, const unsigned* targets, float* stats,        \
                                                       int rows, int first_id, int vocab, int stride) {               \
        cross_entropy_stats<T>(logits, targets, stats, rows, first_id, vocab, stride);                                \
    }                                                                                                                 \
    extern "C" __global__ void cross_entropy_grad_##S(T* logits, const unsigned* targets, const float* lse,           \
                                                      int rows, int first_id, int vocab, int stride,                  \
                                                      float scale) {                                                  \
        cross_entropy_grad<T>(logits, targets, lse, rows, first_id, vocab, stride, scale);                            \
    }

FOR_EACH_STORAGE(CROSS_ENTROPY_KERNELS)
