//! The pieces every block is built from: a dense layer and a norm, each knowing where its
//! parameters sit in the flat buffer.

use crate::Elems;
use ondol_core::backend::{Activation, Backend, Gemm};
use std::ops::Range;

/// How a dense layer's weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WeightLayout {
    /// `nn.Linear`: `[out, in]`, y = x W^T.
    OutIn,
    /// GPT-2's `Conv1D`: `[in, out]`, y = x W.
    InOut,
}

/// What a backward does with the gradient of a layer's input.
pub(crate) enum Dx<M> {
    Write(M),
    /// Add to it: the input also feeds other layers (Mamba's projections read one input).
    Add(M),
}

/// A dense layer's place in the flat parameter buffer.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    pub w: Range<usize>,
    pub b: Option<Range<usize>>,
    pub d_in: usize,
    pub d_out: usize,
    pub layout: WeightLayout,
    /// Whether forward adds the bias. False on the tensor-parallel shards but the first of a
    /// row-parallel layer: their outputs are partial sums, and the bias must be added once.
    pub adds_bias: bool,
}

impl Linear {
    /// An `nn.Linear` without bias.
    pub fn out_in(w: Range<usize>, d_in: usize, d_out: usize) -> Self {
        Self { w, b: None, d_in, d_out, layout: WeightLayout::OutIn, adds_bias: true }
    }

    /// Output rows `rows` of an `[out, in]` weight without bias, as a layer of its own: one
    /// GEMM per output slice of a fused projection (Mamba's in_proj and x_proj).
    pub fn rows_of(&self, rows: Range<usize>) -> Self {
        assert!(self.layout == WeightLayout::OutIn && self.b.is_none() && rows.end <= self.d_out);
        let w = self.w.start + rows.start * self.d_in..self.w.start + rows.end * self.d_in;
        Self::out_in(w, self.d_in, rows.len())
    }

    /// `y = x W (+ b)`, writing y.
    pub fn forward<B: Backend>(&self, be: &B, p: &B::Buf, x: B::Ref<'_>, y: &mut B::Buf, rows: usize) {
        self.forward_view(be, p, x, be.all_mut(y), rows);
    }

    /// [`Linear::forward`] into a view (rows of a larger buffer).
    pub fn forward_view<B: Backend>(&self, be: &B, p: &B::Buf, x: B::Ref<'_>, y: B::Mut<'_>, rows: usize) {
        let w = be.view(p, self.w.clone());
        match self.bias(be, p) {
            Some(b) => be.gemm_bias(self.gemm(rows), x, w, b, y),
            None => be.gemm(self.gemm(rows), x, w, y),
        }
    }

    /// `pre = x W (+ b)` and `out = act(pre)`, writing both (one pass where the backend fuses
    /// the activation into the GEMM).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_activation<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        x: B::Ref<'_>,
        act: Activation,
        pre: &mut B::Buf,
        out: &mut B::Buf,
        rows: usize,
    ) {
        let (g, w) = (self.gemm(rows), be.view(p, self.w.clone()));
        be.gemm_activation(g, x, w, self.bias(be, p), act, be.all_mut(pre), be.all_mut(out));
    }

    /// The forward GEMM: `[rows, d_in] x W`.
    fn gemm(&self, rows: usize) -> Gemm {
        Gemm::new(rows, self.d_out, self.d_in, false, self.layout == WeightLayout::OutIn)
    }

    /// The GEMM of the input's gradient: `[rows, d_out] x W^T`.
    fn input_grad_gemm(&self, rows: usize) -> Gemm {
        Gemm::new(rows, self.d_in, self.d_out, false, self.layout == WeightLayout::InOut)
    }

    /// The bias, where this shard adds it.
    fn bias<'a, B: Backend>(&self, be: &B, p: &'a B::Buf) -> Option<B::Ref<'a>> {
        self.b.as_ref().filter(|_| self.adds_bias).map(|b| be.view(p, b.clone()))
    }

    /// Accumulates dW (and db); writes or adds dx as asked.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        grads: &mut B::Buf,
        x: B::Ref<'_>,
        dy: B::Ref<'_>,
        dx: Dx<B::Mut<'_>>,
        rows: usize,
    ) {
        let (g, w) = (self.input_grad_gemm(rows), be.view(p, self.w.clone()));
        match dx {
            Dx::Write(dx) => be.gemm(g, dy, w, dx),
            Dx::Add(dx) => be.gemm(g.accumulate(), dy, w, dx),
        }
        self.backward_params(be, grads, x, dy, rows);
    }

    /// The backward of a layer whose input `x` is `act(pre)`: dW (and db) accumulated, and
    /// `dpre = act'(pre) * dy W^T` written (in the GEMM's epilogue where the backend fuses it;
    /// else through `scratch`, the size of `x`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_through_activation<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        grads: &mut B::Buf,
        x: B::Ref<'_>,
        (act, pre): (Activation, B::Ref<'_>),
        dy: B::Ref<'_>,
        dpre: &mut B::Buf,
        scratch: &mut B::Buf,
        rows: usize,
    ) {
        self.backward_params(be, grads, x, dy, rows);
        let (g, w) = (self.input_grad_gemm(rows), be.view(p, self.w.clone()));
        be.gemm_activation_backward(g, dy, w, act, pre, be.all_mut(dpre), be.all_mut(scratch));
    }

    /// Accumulates dW (and db) for input `x` and output gradient `dy`.
    fn backward_params<B: Backend>(&self, be: &B, grads: &mut B::Buf, x: B::Ref<'_>, dy: B::Ref<'_>, rows: usize) {
        let (i, o) = (self.d_in, self.d_out);
        let dw = be.view_mut(grads, self.w.clone());
        match self.layout {
            WeightLayout::OutIn => be.gemm(Gemm::new(o, i, rows, true, false).accumulate(), dy, x, dw),
            WeightLayout::InOut => be.gemm(Gemm::new(i, o, rows, true, false).accumulate(), x, dy, dw),
        }
        if let Some(b) = &self.b {
            be.bias_backward(dy, be.view_mut(grads, b.clone()), o);
        }
    }

    pub fn params(&self) -> usize {
        self.d_in * self.d_out + if self.b.is_some() { self.d_out } else { 0 }
    }
}

/// Mamba's causal depthwise convolution over `channels`, with bias, followed by SiLU.
#[derive(Clone, Debug)]
pub(crate) struct CausalConv {
    pub w: Range<usize>,
    pub b: Range<usize>,
    pub channels: usize,
}

/// A Mamba mixer's inference state for incremental decoding: the convolution's last K - 1
/// inputs per sequence (`[batch, K - 1, channels]`) and the scan's recurrent state (f32).
pub(crate) struct RecurrentState<B: Backend> {
    pub conv: B::Buf,
    pub ssm: B::Buf,
}

impl CausalConv {
    /// Taps of the kernel (K).
    pub fn taps(&self) -> usize {
        self.w.len() / self.channels
    }

    /// [`CausalConv::forward`] continuing each sequence from its last inputs in `carry`
    /// (`[batch, K - 1, channels]`), which then holds the last inputs of `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_recurrent<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        x: B::Ref<'_>,
        carry: &mut B::Buf,
        y: &mut B::Buf,
        seq: usize,
    ) {
        let (w, b) = (be.view(p, self.w.clone()), be.view(p, self.b.clone()));
        be.conv1d_recurrent(x, w, b, be.all_mut(carry), be.all_mut(y), seq, self.channels);
    }

    /// `y = silu(conv(x))` over sequences of `seq` tokens.
    pub fn forward<B: Backend>(&self, be: &B, p: &B::Buf, x: B::Ref<'_>, y: &mut B::Buf, seq: usize) {
        let (w, b) = (be.view(p, self.w.clone()), be.view(p, self.b.clone()));
        be.conv1d_forward(x, w, b, be.all_mut(y), seq, self.channels);
    }

    /// Writes `dx`; accumulates the weight and bias gradients.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        grads: &mut B::Buf,
        x: B::Ref<'_>,
        dy: B::Ref<'_>,
        dx: &mut B::Buf,
        seq: usize,
    ) {
        let [dw, db] = be.views_mut(grads, [self.w.clone(), self.b.clone()]);
        let (w, b) = (be.view(p, self.w.clone()), be.view(p, self.b.clone()));
        be.conv1d_backward(dy, x, w, b, be.all_mut(dx), dw, db, seq, self.channels);
    }
}

/// A norm's parameters: RMSNorm has a weight, LayerNorm a weight and a bias.
#[derive(Clone, Debug)]
pub(crate) struct Norm {
    pub w: Range<usize>,
    pub b: Option<Range<usize>>,
}

/// What a norm saves for backward.
pub(crate) struct NormActs<B: Backend> {
    pub out: B::Buf,
    mean: B::Buf,
    rstd: B::Buf,
}

impl<B: Backend> NormActs<B> {
    pub fn new(be: &B, rows: usize, dim: usize, layernorm: bool) -> Self {
        Self {
            out: be.zeros(rows * dim),
            mean: be.zeros_f32(if layernorm { rows } else { 0 }),
            rstd: be.zeros_f32(rows),
        }
    }
}

/// Elements [`NormActs::new`] allocates.
pub(crate) fn norm_elems(rows: usize, dim: usize, layernorm: bool) -> Elems {
    Elems::compute(rows * dim) + Elems::f32(if layernorm { 2 * rows } else { rows })
}

/// What an RMSNorm after a mixer saves for backward: its input (the mixer's output, summed
/// over the shards) and rstd.
pub(crate) struct PostNormActs<B: Backend> {
    pub input: B::Buf,
    rstd: B::Buf,
}

impl<B: Backend> PostNormActs<B> {
    pub fn new(be: &B, rows: usize, dim: usize) -> Self {
        Self { input: be.zeros(rows * dim), rstd: be.zeros_f32(rows) }
    }
}

/// Elements [`PostNormActs::new`] allocates.
pub(crate) fn post_norm_elems(rows: usize, dim: usize) -> Elems {
    Elems::compute(rows * dim) + Elems::f32(rows)
}

impl Norm {
    /// `out = rmsnorm(a.input)`, the norm after a mixer (RMSNorm: the models with one are Llama's).
    pub fn forward_post<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        a: &mut PostNormActs<B>,
        out: &mut B::Buf,
        dim: usize,
        eps: f32,
    ) {
        let w = be.view(p, self.w.clone());
        be.rmsnorm_forward(be.all(&a.input), w, be.all_mut(out), be.all_mut(&mut a.rstd), dim, eps);
    }

    /// Writes (`=`) into `dx` the gradient of [`Norm::forward_post`]'s input; accumulates the
    /// weight's.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_post<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        grads: &mut B::Buf,
        dout: B::Ref<'_>,
        a: &PostNormActs<B>,
        dx: &mut B::Buf,
        dim: usize,
    ) {
        be.fill(be.all_mut(dx), 0.0);
        let (w, dw) = (be.view(p, self.w.clone()), be.view_mut(grads, self.w.clone()));
        be.rmsnorm_backward(dout, be.all(&a.input), w, be.all(&a.rstd), be.all_mut(dx), dw, dim);
    }

    pub fn forward<B: Backend>(&self, be: &B, p: &B::Buf, x: B::Ref<'_>, a: &mut NormActs<B>, dim: usize, eps: f32) {
        let w = be.view(p, self.w.clone());
        match &self.b {
            None => be.rmsnorm_forward(x, w, be.all_mut(&mut a.out), be.all_mut(&mut a.rstd), dim, eps),
            Some(b) => be.layernorm_forward(
                x,
                w,
                be.view(p, b.clone()),
                be.all_mut(&mut a.out),
                be.all_mut(&mut a.mean),
                be.all_mut(&mut a.rstd),
                dim,
                eps,
            ),
        }
    }

    /// Accumulates into `dx` and the norm's parameter gradients.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        grads: &mut B::Buf,
        dout: B::Ref<'_>,
        x: B::Ref<'_>,
        a: &NormActs<B>,
        dx: &mut B::Buf,
        dim: usize,
    ) {
        let w = be.view(p, self.w.clone());
        match &self.b {
            None => {
                let dw = be.view_mut(grads, self.w.clone());
                be.rmsnorm_backward(dout, x, w, be.all(&a.rstd), be.all_mut(dx), dw, dim);
            }
            Some(b) => {
                let [dw, db] = be.views_mut(grads, [self.w.clone(), b.clone()]);
                let (mean, rstd) = (be.all(&a.mean), be.all(&a.rstd));
                be.layernorm_backward(dout, x, w, mean, rstd, be.all_mut(dx), dw, db, dim);
            }
        }
    }
}
