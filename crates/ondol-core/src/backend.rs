//! The backend contract: every op a model needs, forward and backward, over buffers the
//! backend owns.
//!
//! Conventions shared by every op (and by every backend, so the CPU reference and the GPU
//! kernels are interchangeable):
//! - Activations are row-major `[rows, cols]` with one row per token (`rows = batch * seq`).
//! - Weights are stored as Hugging Face stores them (`nn.Linear`: `[out, in]`; GPT-2's Conv1D:
//!   `[in, out]`); the GEMM's transpose flags absorb the difference, no copy is made.
//! - Forward ops write (`=`) their outputs. Backward ops *accumulate* (`+=`) into parameter
//!   gradients, so gradient accumulation over micro-batches is free, and into the gradient of
//!   an input that also flows along the residual stream (norm inputs); other input gradients are
//!   written (`=`). Each op's doc says which.
//! - Attention reads q, k and v straight out of the fused projection `[rows, (H + 2*Hkv) * D]`
//!   (q heads, then k heads, then v heads), so the three projections are one GEMM.
//! - SwiGLU reads gate and up from one `[rows, 2 * F]` buffer (gate first), likewise one GEMM.
//!
//! Precision: a backend computes in its *compute type* (f32 on the CPU; bf16 or f32 on a GPU).
//! Activations, their gradients and the parameters the ops read are in the compute type
//! ([`Backend::zeros`], [`Backend::upload`]). Parameter gradients, optimizer state, master
//! weights and per-row statistics (norm rstd and mean, attention log-sum-exp, losses,
//! cross-entropy stats, the rotary table, scan states) are always f32
//! ([`Backend::zeros_f32`], [`Backend::upload_f32`]), so gradients accumulate over
//! micro-batches without rounding and the optimizer updates fp32 master weights.
//!
//! Views are generic associated types: on the CPU they are plain `&[f32]` / `&mut [f32]`;
//! a GPU backend uses its own device views. Disjoint mutable views of one buffer (two parameter
//! gradients in the flat gradient buffer) come from [`Backend::views_mut`].

use std::ops::Range;

/// Dimensions of one attention call. q has `n_heads` heads, k and v `n_kv_heads` heads
/// (grouped-query attention: query head `h` uses kv head `h / (n_heads / n_kv_heads)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }
    /// Width of the fused qkv row.
    pub fn qkv_width(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }
}

/// The first key each query attends when documents packed into sequences of `seq` tokens
/// attend only within their own (`[rows]`, for [`Backend::attention_forward`]): a document
/// starts at its end-of-text token `eot` (which `data prepare` writes before each one) and at
/// each sequence's start. Non-decreasing along each sequence and at most the query's position,
/// as every backend's attention requires of `first_keys`.
pub fn document_starts(ids: &[u32], seq: usize, eot: u32) -> Vec<u32> {
    let mut starts = Vec::with_capacity(ids.len());
    for sequence in ids.chunks(seq) {
        let mut start = 0;
        for (t, &id) in sequence.iter().enumerate() {
            if id == eot {
                start = t as u32;
            }
            starts.push(start);
        }
    }
    starts
}

/// The first key each of `rows` tokens (sequences of `seq`) attends in a sliding window of
/// `window` keys, itself included: `t + 1 - window` at position t, or its document's first key
/// (`documents`, from [`document_starts`]) where that is later.
pub fn window_first_keys(window: usize, seq: usize, documents: Option<&[u32]>, rows: usize) -> Vec<u32> {
    (0..rows)
        .map(|r| {
            let own = (r % seq + 1).saturating_sub(window) as u32;
            documents.map_or(own, |d| own.max(d[r]))
        })
        .collect()
}

/// Whether `first_keys` can be attention's (see [`document_starts`]): one per row, each at
/// most its position and none before the previous one in its sequence.
pub fn valid_first_keys(first_keys: &[u32], s: AttnShape) -> bool {
    first_keys.len() == s.rows()
        && first_keys
            .chunks(s.seq)
            .all(|f| f.iter().enumerate().all(|(t, &k)| k as usize <= t && (t == 0 || f[t - 1] <= k)))
}

/// Dimensions of one selective scan (Mamba-1): `batch` sequences of `len` tokens, `channels`
/// (d_inner) each with a state of `state` values; a state is saved every `chunk` tokens for
/// backward, which recomputes the states in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanShape {
    pub batch: usize,
    pub len: usize,
    pub channels: usize,
    pub state: usize,
    pub chunk: usize,
}

impl ScanShape {
    /// Saved states per sequence: the initial zero state and one after every chunk.
    pub fn saved(&self) -> usize {
        self.len.div_ceil(self.chunk) + 1
    }
}

/// The inputs of a selective scan (Mamba-1), as views. Per channel d and state index n:
/// `delta = softplus(delta_raw + delta_bias[d])`, `A[d, n] = -exp(a_log[d, n])`,
/// `h_t = exp(delta A) h_{t-1} + delta B_t u_t`, `y_t = (C_t . h_t + D[d] u_t) * silu(z_t)`.
/// u, delta, z: `[batch, len, channels]`; b, c: `[batch, len, state]`; a_log: `[channels,
/// state]`; delta_bias, d: `[channels]`.
#[derive(Clone, Copy, Debug)]
pub struct ScanInputs<R> {
    pub u: R,
    pub delta: R,
    pub delta_bias: R,
    pub a_log: R,
    pub b: R,
    pub c: R,
    pub d: R,
    pub z: R,
}

/// Gradients of a selective scan: `du`, `ddelta`, `db`, `dc`, `dz` are written; the parameter
/// gradients `ddelta_bias`, `da_log`, `dd` accumulate.
#[derive(Debug)]
pub struct ScanGrads<M> {
    pub du: M,
    pub ddelta: M,
    pub ddelta_bias: M,
    pub da_log: M,
    pub db: M,
    pub dc: M,
    pub dd: M,
    pub dz: M,
}

/// Dimensions of one SSD scan (Mamba-2): `heads` heads of `head_dim` channels share a scalar
/// decay per head; B and C come in `groups` groups (head h uses group `h / (heads / groups)`)
/// of `state` values. Chunks of `chunk` tokens are computed in their quadratic (matmul) form
/// and pass a state `[head_dim, state]` per head from one chunk to the next; those boundary
/// states are saved for backward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SsdShape {
    pub batch: usize,
    pub len: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub groups: usize,
    pub state: usize,
    pub chunk: usize,
}

impl SsdShape {
    pub fn rows(&self) -> usize {
        self.batch * self.len
    }
    /// Channels of x: `heads * head_dim` (Mamba-2's d_inner).
    pub fn inner(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Width of the fused `[x | B | C]` row the scan reads.
    pub fn xbc_width(&self) -> usize {
        self.inner() + 2 * self.groups * self.state
    }
    /// Saved states per sequence: the initial zero state and one after every chunk.
    pub fn saved(&self) -> usize {
        self.len.div_ceil(self.chunk) + 1
    }
    /// Floats of the saved boundary states.
    pub fn states_len(&self) -> usize {
        self.batch * self.saved() * self.inner() * self.state
    }
}

/// The inputs of an SSD scan (Mamba-2), as views. Per head h: `dt = softplus(dt_raw +
/// dt_bias[h])`, `A = -exp(a_log[h])`, `H_t = exp(dt A) H_{t-1} + dt x_t B_t^T`,
/// `y_t = H_t C_t + D[h] x_t`. xbc: `[rows, xbc_width]` (x heads, then B groups, then C groups,
/// as Mamba-2's convolution leaves them); dt: `[rows, heads]`; dt_bias, a_log, d: `[heads]`.
#[derive(Clone, Copy, Debug)]
pub struct SsdInputs<R> {
    pub xbc: R,
    pub dt: R,
    pub dt_bias: R,
    pub a_log: R,
    pub d: R,
}

/// Gradients of an SSD scan: `dxbc` and `ddt` are written; `ddt_bias`, `da_log`, `dd`
/// accumulate.
#[derive(Debug)]
pub struct SsdGrads<M> {
    pub dxbc: M,
    pub ddt: M,
    pub ddt_bias: M,
    pub da_log: M,
    pub dd: M,
}

/// A pointwise activation of an MLP, or the gate's of a gated one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// GELU, tanh approximation (GPT-2's `gelu_new`; Gemma's `gelu_pytorch_tanh`).
    Gelu,
    /// Squared ReLU, `max(x, 0)^2` (Nemotron-H's `relu2`).
    Relu2,
    /// `x * sigmoid(x)` (Llama's gate).
    Silu,
}

/// `C = alpha * op(A) @ op(B) + beta * C`, row-major, repeated `batch` times at the given
/// element strides. `op(A)` is `[m, k]`, `op(B)` is `[k, n]`, C is `[m, n]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl Gemm {
    /// A single (unbatched) `C = op(A) op(B)` with alpha 1, beta 0.
    pub fn new(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Self {
        Self {
            m,
            n,
            k,
            trans_a,
            trans_b,
            alpha: 1.0,
            beta: 0.0,
            batch: 1,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
        }
    }
    /// Accumulate into C instead of overwriting it.
    pub fn accumulate(mut self) -> Self {
        self.beta = 1.0;
        self
    }
    pub fn flops(&self) -> u64 {
        2 * (self.m * self.n * self.k * self.batch) as u64
    }
}

/// Hyper-parameters of one AdamW update (decoupled weight decay, bias-corrected moments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for the bias corrections.
    pub step: u64,
    /// Multiplies every gradient before use (gradient clipping folds in here).
    pub grad_scale: f32,
}

/// Where a view lives in device memory, for communicators that work on it directly (NCCL):
/// its address, its length in elements, whether they are bf16 (else f32), and whether the
/// address is host memory (a device emulated on the CPU, whose "device memory" host
/// communicators can read and write).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSlice {
    pub ptr: u64,
    pub len: usize,
    pub bf16: bool,
    pub host: bool,
}

/// A compute backend: owns memory, runs ops. See the module docs for the conventions.
pub trait Backend: Send + Sync {
    /// An owned allocation of the backend's compute type.
    type Buf: Send + Sync;
    /// Token ids (or targets) resident where the ops run.
    type Ids: Send + Sync;
    type Ref<'a>: Copy
    where
        Self: 'a;
    type Mut<'a>
    where
        Self: 'a;

    fn name(&self) -> String;

    /// Bytes in use and in total on the device, where the backend can tell (a GPU's memory,
    /// including what its caching allocator holds); None on the CPU.
    fn device_memory(&self) -> Option<(u64, u64)> {
        None
    }

    /// Bytes of an element of the compute type (the type of [`Backend::zeros`]).
    fn compute_bytes(&self) -> usize {
        4
    }

    /// Whether the compute type is narrower than f32 (bf16): then the optimizer keeps fp32
    /// master weights of its own and writes the compute copy in its update.
    fn mixed_precision(&self) -> bool {
        self.compute_bytes() < 4
    }

    /// The view's place in device memory, where the backend's memory is a device's (a GPU);
    /// None on the CPU, whose communicators take host slices.
    fn device_slice(&self, _view: Self::Ref<'_>) -> Option<DeviceSlice> {
        None
    }

    // ---- memory -------------------------------------------------------------------------
    /// A zero-filled buffer of `len` elements of the compute type.
    fn zeros(&self, len: usize) -> Self::Buf;
    /// A zero-filled buffer of `len` f32 elements (see the module docs for which buffers).
    fn zeros_f32(&self, len: usize) -> Self::Buf {
        self.zeros(len)
    }
    /// `data` in a new buffer of the compute type (rounded if it is narrower).
    fn upload(&self, data: &[f32]) -> Self::Buf;
    /// `data` in a new f32 buffer.
    fn upload_f32(&self, data: &[f32]) -> Self::Buf {
        self.upload(data)
    }
    /// Overwrites `buf` (of `data`'s length) with `data`, keeping the buffer's type.
    fn write(&self, buf: &mut Self::Buf, data: &[f32]);
    /// The contents of `buf` as f32, whatever its type.
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    /// The contents of a view as f32 (a bucket of gradients, say).
    fn download_view(&self, view: Self::Ref<'_>) -> Vec<f32>;
    /// Overwrites a view with `data` (of its length), keeping the buffer's type.
    fn write_view(&self, view: Self::Mut<'_>, data: &[f32]);
    fn upload_ids(&self, ids: &[u32]) -> Self::Ids;
    /// Replace the contents of `ids` (same length) without reallocating.
    fn write_ids(&self, ids: &mut Self::Ids, data: &[u32]);
    fn len(&self, buf: &Self::Buf) -> usize;
    fn view<'a>(&self, buf: &'a Self::Buf, range: Range<usize>) -> Self::Ref<'a>;
    fn view_mut<'a>(&self, buf: &'a mut Self::Buf, range: Range<usize>) -> Self::Mut<'a>;
    /// Several disjoint mutable views of one buffer; panics if two ranges overlap (a bug).
    fn views_mut<'a, const N: usize>(&self, buf: &'a mut Self::Buf, ranges: [Range<usize>; N]) -> [Self::Mut<'a>; N];
    /// The whole buffer as a view.
    fn all<'a>(&self, buf: &'a Self::Buf) -> Self::Ref<'a> {
        self.view(buf, 0..self.len(buf))
    }
    fn all_mut<'a>(&self, buf: &'a mut Self::Buf) -> Self::Mut<'a> {
        let len = self.len(buf);
        self.view_mut(buf, 0..len)
    }
    fn fill(&self, x: Self::Mut<'_>, value: f32);
    /// `dst += src`.
    fn add_assign(&self, dst: Self::Mut<'_>, src: Self::Ref<'_>);
    /// `x *= factor`.
    fn scale(&self, x: Self::Mut<'_>, factor: f32);
    /// Sum of squares, accumulated in f64 (for the global gradient norm).
    fn sum_squares(&self, x: Self::Ref<'_>) -> f64;
    /// Sum, accumulated in f64 (for losses).
    fn sum(&self, x: Self::Ref<'_>) -> f64;

    // ---- dense ----------------------------------------------------------------------------
    fn gemm(&self, g: Gemm, a: Self::Ref<'_>, b: Self::Ref<'_>, c: Self::Mut<'_>);
    /// `c = alpha op(a) op(b) + bias`, the bias (`g.n` values) added to every row of the
    /// product, for one batch and `g.beta == 0`: a linear layer's forward. A GPU adds the bias
    /// in the GEMM's epilogue (one pass over `c`, not two).
    fn gemm_bias(&self, g: Gemm, a: Self::Ref<'_>, b: Self::Ref<'_>, bias: Self::Ref<'_>, c: Self::Mut<'_>);
    /// `pre = op(a) op(b) + bias` (the bias on every row, if given) and `out = act(pre)`, for
    /// one batch and `g.beta == 0`: a linear layer and its activation, with `pre` kept for
    /// backward. A GPU computes both in the GEMM's epilogue where it can (GELU), saving the
    /// activation's pass over `pre`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_activation(
        &self,
        g: Gemm,
        a: Self::Ref<'_>,
        b: Self::Ref<'_>,
        bias: Option<Self::Ref<'_>>,
        act: Activation,
        pre: Self::Mut<'_>,
        out: Self::Mut<'_>,
    );
    /// `dpre = act'(pre) * op(a) op(b)`, for one batch and `g.beta == 0`: an activation's
    /// backward through the GEMM that makes the gradient of its output. A GPU applies `act'`
    /// in the GEMM's epilogue where it can (GELU), so the product is never stored; otherwise
    /// the product goes to `scratch` (the size of `dpre`) first.
    #[allow(clippy::too_many_arguments)]
    fn gemm_activation_backward(
        &self,
        g: Gemm,
        a: Self::Ref<'_>,
        b: Self::Ref<'_>,
        act: Activation,
        pre: Self::Ref<'_>,
        dpre: Self::Mut<'_>,
        scratch: Self::Mut<'_>,
    );
    /// `y[r, :] += bias` for every row.
    fn add_bias(&self, y: Self::Mut<'_>, bias: Self::Ref<'_>, cols: usize);
    /// `dbias += sum over rows of dy` (accumulates).
    fn bias_backward(&self, dy: Self::Ref<'_>, dbias: Self::Mut<'_>, cols: usize);

    // ---- embeddings -------------------------------------------------------------------------
    /// `out[r, :] = table[ids[r] - first_id, :]`, or zeros where `ids[r]` is not in the table's
    /// rows `first_id..` (a vocab-parallel shard holds a range of ids; the whole table has
    /// `first_id = 0` and holds every id). If `positions` is given (learned absolute positions,
    /// GPT-2), also adds `positions[r % seq, :]`.
    fn embedding_forward(
        &self,
        ids: &Self::Ids,
        table: Self::Ref<'_>,
        first_id: usize,
        positions: Option<(Self::Ref<'_>, usize)>,
        out: Self::Mut<'_>,
        dim: usize,
    );
    /// `dtable[ids[r] - first_id, :] += dout[r, :]` for the ids the table holds (accumulates).
    fn embedding_backward(
        &self,
        ids: &Self::Ids,
        dout: Self::Ref<'_>,
        dtable: Self::Mut<'_>,
        first_id: usize,
        dim: usize,
    );
    /// `dpos[r % seq, :] += dout[r, :]` (accumulates).
    fn position_embedding_backward(&self, dout: Self::Ref<'_>, dpos: Self::Mut<'_>, seq: usize, dim: usize);

    // ---- norms ----------------------------------------------------------------------------
    /// `out = x / rms(x) * weight`; saves `rstd[r] = 1 / sqrt(mean(x^2) + eps)`.
    fn rmsnorm_forward(
        &self,
        x: Self::Ref<'_>,
        weight: Self::Ref<'_>,
        out: Self::Mut<'_>,
        rstd: Self::Mut<'_>,
        dim: usize,
        eps: f32,
    );
    /// Accumulates into `dx` (the residual stream's gradient) and `dweight`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dout: Self::Ref<'_>,
        x: Self::Ref<'_>,
        weight: Self::Ref<'_>,
        rstd: Self::Ref<'_>,
        dx: Self::Mut<'_>,
        dweight: Self::Mut<'_>,
        dim: usize,
    );
    /// `out = (x - mean) * rstd * weight + bias`; saves mean and rstd per row.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        x: Self::Ref<'_>,
        weight: Self::Ref<'_>,
        bias: Self::Ref<'_>,
        out: Self::Mut<'_>,
        mean: Self::Mut<'_>,
        rstd: Self::Mut<'_>,
        dim: usize,
        eps: f32,
    );
    /// Accumulates into `dx`, `dweight` and `dbias`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dout: Self::Ref<'_>,
        x: Self::Ref<'_>,
        weight: Self::Ref<'_>,
        mean: Self::Ref<'_>,
        rstd: Self::Ref<'_>,
        dx: Self::Mut<'_>,
        dweight: Self::Mut<'_>,
        dbias: Self::Mut<'_>,
        dim: usize,
    );

    // ---- attention ---------------------------------------------------------------------------
    /// Rotary embedding in place on the q and k heads of a fused qkv buffer, Hugging Face's
    /// "rotate half" pairing (element i with i + D/2), q's heads also multiplied by `q_scale`
    /// (muP's attention multiplier, see `ModelConfig::q_scale`; 1 without). `inverse` applies
    /// the transpose rotation (and the same scale), which is the backward. `cos_sin` is
    /// `[seq, D/2, 2]` from [`rope_table`].
    fn rope(&self, qkv: Self::Mut<'_>, cos_sin: Self::Ref<'_>, shape: AttnShape, inverse: bool, q_scale: f32);
    /// RMSNorm of every q and k head of a fused qkv buffer over its `head_dim` values (Qwen3's
    /// q_norm and k_norm): a head x becomes `x / rms(x) * w`, with w `weight[..D]` for q's heads
    /// and `weight[D..]` for k's; v's heads are copied. Saves `rstd` (fp32, `[rows, H + Hkv]`).
    fn qk_norm_forward(
        &self,
        qkv: Self::Ref<'_>,
        weight: Self::Ref<'_>,
        out: Self::Mut<'_>,
        rstd: Self::Mut<'_>,
        shape: AttnShape,
        eps: f32,
    );
    /// Backward of [`Backend::qk_norm_forward`] in place: `dqkv` holds the gradient of `out` and
    /// becomes that of `qkv` (v's heads pass through); accumulates `dweight` (fp32, `[2 D]`).
    fn qk_norm_backward(
        &self,
        dqkv: Self::Mut<'_>,
        qkv: Self::Ref<'_>,
        weight: Self::Ref<'_>,
        rstd: Self::Ref<'_>,
        dweight: Self::Mut<'_>,
        shape: AttnShape,
    );
    /// Causal softmax attention. Reads q, k, v from `qkv` (`[rows, qkv_width]`), writes
    /// `out` (`[rows, H*D]`) and `lse` (`[batch, H, seq]`, log-sum-exp of the scaled scores),
    /// which is all backward needs besides the inputs. With `first_keys` (`[rows]`, see
    /// [`document_starts`]) the query at position t of sequence b attends the keys from
    /// `first_keys[b seq + t]` to t only; without, from 0.
    fn attention_forward(
        &self,
        qkv: Self::Ref<'_>,
        out: Self::Mut<'_>,
        lse: Self::Mut<'_>,
        shape: AttnShape,
        first_keys: Option<&Self::Ids>,
    );
    /// Writes (`=`) `dqkv`, the gradient of the whole fused qkv buffer.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dout: Self::Ref<'_>,
        qkv: Self::Ref<'_>,
        out: Self::Ref<'_>,
        lse: Self::Ref<'_>,
        dqkv: Self::Mut<'_>,
        shape: AttnShape,
        first_keys: Option<&Self::Ids>,
    );

    /// Inference attention over a key/value cache. The new rows are `shape.seq` tokens per
    /// sequence at positions `pos..pos + shape.seq`: their k and v are appended to the caches
    /// (`[batch, max_seq, Hkv * D]`), and `out` (`[rows, H*D]`) gets each new query's causal
    /// attention over positions `0..=` its own, or over the last `window` of them (itself
    /// included) in a sliding-window layer. Prefill and one-token decode are both this op.
    #[allow(clippy::too_many_arguments)]
    fn attention_cached(
        &self,
        qkv: Self::Ref<'_>,
        k_cache: Self::Mut<'_>,
        v_cache: Self::Mut<'_>,
        out: Self::Mut<'_>,
        shape: AttnShape,
        pos: usize,
        max_seq: usize,
        window: Option<usize>,
    );

    // ---- Mamba ---------------------------------------------------------------------------------
    /// Mamba's causal depthwise convolution followed by SiLU:
    /// `y[b,t,d] = silu(bias[d] + sum_k w[d,k] x[b,t-K+1+k,d])` (zero before the sequence).
    /// `x` and `y` are `[batch, len, channels]`, `w` is `[channels, K]`.
    #[allow(clippy::too_many_arguments)]
    fn conv1d_forward(
        &self,
        x: Self::Ref<'_>,
        w: Self::Ref<'_>,
        bias: Self::Ref<'_>,
        y: Self::Mut<'_>,
        len: usize,
        channels: usize,
    );
    /// Writes `dx`; accumulates `dw` and `dbias`. Recomputes the pre-activation from `x`.
    #[allow(clippy::too_many_arguments)]
    fn conv1d_backward(
        &self,
        dy: Self::Ref<'_>,
        x: Self::Ref<'_>,
        w: Self::Ref<'_>,
        bias: Self::Ref<'_>,
        dx: Self::Mut<'_>,
        dw: Self::Mut<'_>,
        dbias: Self::Mut<'_>,
        len: usize,
        channels: usize,
    );
    /// [`Backend::conv1d_forward`] continuing sequences already begun (inference): `state`
    /// (`[batch, K - 1, channels]`) holds each sequence's K - 1 inputs before `x`'s first
    /// token (zeros before the sequence starts) and becomes its last K - 1 inputs after `x`.
    #[allow(clippy::too_many_arguments)]
    fn conv1d_recurrent(
        &self,
        x: Self::Ref<'_>,
        w: Self::Ref<'_>,
        bias: Self::Ref<'_>,
        state: Self::Mut<'_>,
        y: Self::Mut<'_>,
        len: usize,
        channels: usize,
    );
    /// The selective scan's recurrence (see [`ScanInputs`]) continuing from `state`
    /// (`[batch, channels, state]`, f32: each sequence's h before `x`'s first token, zeros at
    /// its start), which becomes h after `x`'s last token; writes `y`. Inference: nothing is
    /// saved for backward (`shape.chunk` is not read).
    fn selective_scan_recurrent(
        &self,
        x: ScanInputs<Self::Ref<'_>>,
        y: Self::Mut<'_>,
        state: Self::Mut<'_>,
        shape: ScanShape,
    );
    /// The SSD's recurrence (see [`SsdInputs`]) token by token from `state` (`[batch, heads,
    /// head_dim, state]`, f32), which becomes the state after `x`'s last token; writes `y`.
    /// Inference, as [`Backend::selective_scan_recurrent`].
    fn ssd_recurrent(&self, x: SsdInputs<Self::Ref<'_>>, y: Self::Mut<'_>, state: Self::Mut<'_>, shape: SsdShape);
    /// Selective scan (Mamba-1) with its input-dependent step, decay, skip and output gate
    /// fused, see [`ScanInputs`]. Writes `y` (`[batch, len, channels]`) and the chunk-boundary
    /// `states` (`[batch, shape.saved(), channels, state]`) that backward recomputes from.
    fn selective_scan_forward(
        &self,
        x: ScanInputs<Self::Ref<'_>>,
        y: Self::Mut<'_>,
        states: Self::Mut<'_>,
        shape: ScanShape,
    );
    fn selective_scan_backward(
        &self,
        dy: Self::Ref<'_>,
        x: ScanInputs<Self::Ref<'_>>,
        states: Self::Ref<'_>,
        grads: ScanGrads<Self::Mut<'_>>,
        shape: ScanShape,
    );
    /// SSD chunked scan (Mamba-2), see [`SsdInputs`]. Writes `y` (`[rows, heads * head_dim]`)
    /// and the chunk-boundary `states` (`[batch, shape.saved(), heads, head_dim, state]`).
    fn ssd_forward(&self, x: SsdInputs<Self::Ref<'_>>, y: Self::Mut<'_>, states: Self::Mut<'_>, shape: SsdShape);
    fn ssd_backward(
        &self,
        dy: Self::Ref<'_>,
        x: SsdInputs<Self::Ref<'_>>,
        states: Self::Ref<'_>,
        grads: SsdGrads<Self::Mut<'_>>,
        shape: SsdShape,
    );
    /// Mamba-2's gated RMSNorm: `g = x * silu(z)`, then each group of `group` consecutive
    /// values is scaled by its `rstd = 1 / sqrt(mean(g^2) + eps)` (saved, `[rows * width /
    /// group]`) and by `weight` (`[width]`).
    #[allow(clippy::too_many_arguments)]
    fn gated_rmsnorm_forward(
        &self,
        x: Self::Ref<'_>,
        z: Self::Ref<'_>,
        weight: Self::Ref<'_>,
        out: Self::Mut<'_>,
        rstd: Self::Mut<'_>,
        group: usize,
        eps: f32,
    );
    /// Writes `dx` and `dz`; accumulates `dweight`.
    #[allow(clippy::too_many_arguments)]
    fn gated_rmsnorm_backward(
        &self,
        dout: Self::Ref<'_>,
        x: Self::Ref<'_>,
        z: Self::Ref<'_>,
        weight: Self::Ref<'_>,
        rstd: Self::Ref<'_>,
        dx: Self::Mut<'_>,
        dz: Self::Mut<'_>,
        dweight: Self::Mut<'_>,
        group: usize,
    );

    // ---- activations -------------------------------------------------------------------------
    /// A gated linear unit: `out = act(gate) * up` with gate and up the two halves of each
    /// `[2 * width]` row (SwiGLU with SiLU, GeGLU with GELU).
    fn glu_forward(&self, act: Activation, gate_up: Self::Ref<'_>, out: Self::Mut<'_>, width: usize);
    /// Writes `dgate_up`.
    fn glu_backward(
        &self,
        act: Activation,
        dout: Self::Ref<'_>,
        gate_up: Self::Ref<'_>,
        dgate_up: Self::Mut<'_>,
        width: usize,
    );
    /// `out = act(x)` elementwise.
    fn activation_forward(&self, act: Activation, x: Self::Ref<'_>, out: Self::Mut<'_>);
    /// Writes `dx`.
    fn activation_backward(&self, act: Activation, dout: Self::Ref<'_>, x: Self::Ref<'_>, dx: Self::Mut<'_>);

    // ---- loss ----------------------------------------------------------------------------------
    /// Softmax cross-entropy per row of `[rows, columns.stride]` logits, over the first
    /// `columns.vocab` of each row: writes `losses[r] = logsumexp(logits[r]) - logits[r, t_r]`,
    /// where `t_r = targets[first_row + r]` (the logits are rows `first_row..` of the targets'
    /// micro-batch: a chunk of it).
    /// If `grad_scale` is given, overwrites `logits` in place with
    /// `grad_scale * (softmax(logits) - onehot(t))` and the padding columns with 0, so the
    /// matrix exists once; without it, the logits are scratch afterwards (the CPU leaves its
    /// exponentials there). A row whose target is [`IGNORED_TARGET`] has loss 0 and a zero
    /// gradient (all three loss ops).
    fn cross_entropy(
        &self,
        logits: Self::Mut<'_>,
        targets: &Self::Ids,
        first_row: usize,
        losses: Self::Mut<'_>,
        columns: LogitColumns,
        grad_scale: Option<f32>,
    );
    /// The first half of a vocab-parallel cross-entropy, on a shard of the logits: the columns
    /// of ids `first_id..first_id + columns.vocab`, rows as in [`Backend::cross_entropy`].
    /// Writes per row `stats[3r..3r + 3]` = (the row's max m, sum of exp(logit - m), the
    /// target's logit if this shard holds the target, else 0), or (0, 0, 0) where the target
    /// is [`IGNORED_TARGET`] (a real row's sum is at least 1). Combining the shards' rows gives
    /// each row's log-sum-exp (see [`combine_ce_stats`]).
    fn cross_entropy_stats(
        &self,
        logits: Self::Ref<'_>,
        targets: &Self::Ids,
        first_row: usize,
        stats: Self::Mut<'_>,
        first_id: usize,
        columns: LogitColumns,
    );
    /// The second half: overwrites the shard of logits with
    /// `grad_scale * (exp(logit - lse[r]) - onehot(t))`, given every row's global log-sum-exp,
    /// and the padding columns with 0.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_grad(
        &self,
        logits: Self::Mut<'_>,
        targets: &Self::Ids,
        first_row: usize,
        lse: Self::Ref<'_>,
        first_id: usize,
        columns: LogitColumns,
        grad_scale: f32,
    );

    // ---- optimizer -----------------------------------------------------------------------------
    /// One AdamW step over a flat range of f32 buffers: params, grads and the two moments
    /// have equal length. If `copy` is given (the compute-type parameters of a mixed-precision
    /// run, `params` being the fp32 master), it receives the updated parameters too.
    fn adamw(
        &self,
        params: Self::Mut<'_>,
        grads: Self::Ref<'_>,
        m: Self::Mut<'_>,
        v: Self::Mut<'_>,
        hp: AdamWParams,
        copy: Option<Self::Mut<'_>>,
    );
}

/// The columns of a row of logits: `vocab` tokens' logits, rows `stride >= vocab` apart. The
/// columns past `vocab` come from an output head padded to aligned rows and are no token's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogitColumns {
    pub vocab: usize,
    pub stride: usize,
}

impl LogitColumns {
    /// `vocab` columns, no padding.
    pub fn dense(vocab: usize) -> Self {
        Self { vocab, stride: vocab }
    }
}

/// The target of a token that is not learned (a prompt's, in fine-tuning on completions): the
/// loss ops give its row loss 0 and no gradient.
pub const IGNORED_TARGET: u32 = u32::MAX;

/// Combines the rows of [`Backend::cross_entropy_stats`] from every vocab shard (`parts[s]`
/// from shard `s`, shards in any fixed order) into each row's log-sum-exp (into `lse`) and
/// returns the sum of the rows' losses, `lse - target logit`; an ignored target's row (every
/// shard's sum 0) adds nothing.
pub fn combine_ce_stats(parts: &[&[f32]], lse: &mut [f32]) -> f64 {
    let mut loss = 0.0;
    for (r, out) in lse.iter_mut().enumerate() {
        if parts.iter().all(|p| p[3 * r + 1] == 0.0) {
            *out = 0.0;
            continue;
        }
        let max = parts.iter().map(|p| p[3 * r]).fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = parts.iter().map(|p| p[3 * r + 1] as f64 * ((p[3 * r] - max) as f64).exp()).sum();
        let target: f64 = parts.iter().map(|p| p[3 * r + 2] as f64).sum();
        let row_lse = max as f64 + sum.ln();
        *out = row_lse as f32;
        loss += row_lse - target;
    }
    loss
}

/// The inverse frequencies `theta^(-2i / head_dim)` of Hugging Face Llama's rotary
/// embeddings (no scaling), `head_dim / 2` of them. Computed in f64, so every backend starts
/// from the same numbers.
pub fn rope_inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2).map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64) as f32).collect()
}

/// The rotary table `[seq, inv_freq.len(), 2]` of (cos, sin) for positions `0..seq`.
pub fn rope_table_of(seq: usize, inv_freq: &[f32]) -> Vec<f32> {
    let mut table = Vec::with_capacity(seq * inv_freq.len() * 2);
    for pos in 0..seq {
        for &f in inv_freq {
            // Hugging Face computes the angle as f32 pos * inv_freq; matching that keeps parity
            // with transformers at long positions.
            let angle = (pos as f32) * f;
            table.push(angle.cos());
            table.push(angle.sin());
        }
    }
    table
}

/// The rotary table of [`rope_inv_freq`]'s frequencies.
pub fn rope_table(seq: usize, head_dim: usize, theta: f64) -> Vec<f32> {
    rope_table_of(seq, &rope_inv_freq(head_dim, theta))
}
