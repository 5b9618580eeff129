//! Causal self-attention as a block's mixer: fused qkv projection, optional RMSNorm of each q
//! and k head (Qwen3), optional rotary positions (Llama; GPT-2 has learned positions and
//! Nemotron-H's attention none), grouped-query attention, output projection.

use crate::Elems;
use crate::layers::{Dx, Linear};
use ondol_core::backend::{AttnShape, Backend};
use std::ops::Range;

#[derive(Clone, Debug)]
pub(crate) struct Attention {
    /// q, k and v projections as one `[(H + 2 Hkv) D, d]` matrix.
    pub qkv: Linear,
    pub out: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope: bool,
    /// Keys per query of a sliding-window layer (see `ModelConfig::sliding_window`).
    pub window: Option<usize>,
    /// Qwen3's q_norm and k_norm weights back to back (`[2 D]`), with their epsilon.
    pub qk_norm: Option<(Range<usize>, f32)>,
    /// What q is multiplied by with its rotation (muP's attention multiplier; see
    /// `ModelConfig::q_scale`).
    pub q_scale: f32,
}

/// What attention saves for backward: qkv after rotation, the output and its log-sum-exp;
/// under qk_norm also the projection's output before the norms and their rstd.
pub(crate) struct AttnActs<B: Backend> {
    qkv: B::Buf,
    attn: B::Buf,
    lse: B::Buf,
    pre_norm: Option<(B::Buf, B::Buf)>,
}

/// Gradient scratch, shared by every attention block in turn.
pub(crate) struct AttnGrads<B: Backend> {
    dqkv: B::Buf,
    dattn: B::Buf,
}

/// Where a call's tokens sit: the rotary tables from their first position on (the global
/// layers' and the sliding-window layers', one table unless those have their own); where
/// documents are packed into sequences and attend only within their own, the first key each
/// query attends (see `Backend::attention_forward`); and in a model with sliding-window
/// layers, the first key each query attends in those.
pub(crate) struct Positions<'a, B: Backend + 'a> {
    pub rope: B::Ref<'a>,
    pub local_rope: B::Ref<'a>,
    pub first_keys: Option<&'a B::Ids>,
    pub window_keys: Option<&'a B::Ids>,
}

impl<B: Backend> Clone for Positions<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Positions<'_, B> {}

/// One layer's key/value cache and where the new tokens start.
pub(crate) struct KvSlot<'a, B: Backend> {
    pub k: &'a mut B::Buf,
    pub v: &'a mut B::Buf,
    pub pos: usize,
    pub max_seq: usize,
}

impl Attention {
    /// The first keys this layer's queries attend from (None: 0).
    fn first_keys<'a, B: Backend>(&self, at: Positions<'a, B>) -> Option<&'a B::Ids> {
        match self.window {
            Some(_) => Some(at.window_keys.expect("the workspace of a model with windows holds their first keys")),
            None => at.first_keys,
        }
    }

    /// The rotary table this layer's positions take.
    fn rope_table<'a, B: Backend>(&self, at: Positions<'a, B>) -> B::Ref<'a> {
        if self.window.is_some() { at.local_rope } else { at.rope }
    }

    pub fn shape(&self, batch: usize, seq: usize) -> AttnShape {
        AttnShape { batch, seq, n_heads: self.n_heads, n_kv_heads: self.n_kv_heads, head_dim: self.head_dim }
    }

    pub fn acts<B: Backend>(&self, be: &B, batch: usize, seq: usize) -> AttnActs<B> {
        let [qkv, attn, lse, rstd] = self.act_lens(batch, seq);
        let pre_norm = self.qk_norm.is_some().then(|| (be.zeros(qkv), be.zeros_f32(rstd)));
        AttnActs { qkv: be.zeros(qkv), attn: be.zeros(attn), lse: be.zeros_f32(lse), pre_norm }
    }

    /// Elements of [`Attention::acts`].
    pub fn act_elems(&self, batch: usize, seq: usize) -> Elems {
        let [qkv, attn, lse, rstd] = self.act_lens(batch, seq);
        let pre_norm = if self.qk_norm.is_some() { Elems::compute(qkv) + Elems::f32(rstd) } else { Elems::default() };
        Elems::compute(qkv + attn) + Elems::f32(lse) + pre_norm
    }

    /// Lengths of qkv, the output, its log-sum-exp and (under qk_norm) the norms' rstd.
    fn act_lens(&self, batch: usize, seq: usize) -> [usize; 4] {
        let s = self.shape(batch, seq);
        let rows = s.rows();
        [rows * s.qkv_width(), rows * s.q_width(), batch * self.n_heads * seq, rows * (self.n_heads + self.n_kv_heads)]
    }

    /// Lengths of dqkv and d(attention output).
    fn grad_lens(&self, batch: usize, seq: usize) -> [usize; 2] {
        let s = self.shape(batch, seq);
        [s.rows() * s.qkv_width(), s.rows() * s.q_width()]
    }

    pub fn grads<B: Backend>(&self, be: &B, batch: usize, seq: usize) -> AttnGrads<B> {
        let [dqkv, dattn] = self.grad_lens(batch, seq).map(|n| be.zeros(n));
        AttnGrads { dqkv, dattn }
    }

    pub fn grad_elems(&self, batch: usize, seq: usize) -> Elems {
        Elems::compute(self.grad_lens(batch, seq).iter().sum())
    }

    /// `out = attention(x)`; with `cache`, appends the new keys and values to it and attends
    /// over everything cached.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        x: B::Ref<'_>,
        a: &mut AttnActs<B>,
        out: &mut B::Buf,
        at: Positions<'_, B>,
        cache: Option<KvSlot<'_, B>>,
        (batch, seq): (usize, usize),
    ) {
        let (shape, rows) = (self.shape(batch, seq), batch * seq);
        match (&self.qk_norm, &mut a.pre_norm) {
            (Some((w, eps)), Some((raw, rstd))) => {
                self.qkv.forward(be, p, x, raw, rows);
                let (raw, w) = (be.all(raw), be.view(p, w.clone()));
                be.qk_norm_forward(raw, w, be.all_mut(&mut a.qkv), be.all_mut(rstd), shape, *eps);
            }
            (None, _) => self.qkv.forward(be, p, x, &mut a.qkv, rows),
            (Some(_), None) => unreachable!("Attention::acts holds the pre-norm buffers under qk_norm"),
        }
        if self.rope {
            be.rope(be.all_mut(&mut a.qkv), self.rope_table(at), shape, false, self.q_scale);
        }
        match cache {
            None => {
                let (qkv, attn, lse) = (be.all(&a.qkv), be.all_mut(&mut a.attn), be.all_mut(&mut a.lse));
                be.attention_forward(qkv, attn, lse, shape, self.first_keys(at));
            }
            Some(c) => {
                let (k, v) = (be.all_mut(c.k), be.all_mut(c.v));
                let (qkv, attn) = (be.all(&a.qkv), be.all_mut(&mut a.attn));
                be.attention_cached(qkv, k, v, attn, shape, c.pos, c.max_seq, self.window);
            }
        }
        self.out.forward(be, p, be.all(&a.attn), out, rows);
    }

    /// Accumulates parameter gradients; writes `dx`, the gradient of the block's normed input.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        grads: &mut B::Buf,
        x: B::Ref<'_>,
        a: &AttnActs<B>,
        dout: B::Ref<'_>,
        dx: &mut B::Buf,
        g: &mut AttnGrads<B>,
        at: Positions<'_, B>,
        (batch, seq): (usize, usize),
    ) {
        let (shape, rows) = (self.shape(batch, seq), batch * seq);
        self.out.backward(be, p, grads, be.all(&a.attn), dout, Dx::Write(be.all_mut(&mut g.dattn)), rows);
        let (qkv, attn, lse) = (be.all(&a.qkv), be.all(&a.attn), be.all(&a.lse));
        let first_keys = self.first_keys(at);
        be.attention_backward(be.all(&g.dattn), qkv, attn, lse, be.all_mut(&mut g.dqkv), shape, first_keys);
        if self.rope {
            be.rope(be.all_mut(&mut g.dqkv), self.rope_table(at), shape, true, self.q_scale);
        }
        if let Some((w, _)) = &self.qk_norm {
            let (raw, rstd) = a.pre_norm.as_ref().expect("Attention::acts holds the pre-norm buffers under qk_norm");
            let (dw, w) = (be.view_mut(grads, w.clone()), be.view(p, w.clone()));
            be.qk_norm_backward(be.all_mut(&mut g.dqkv), be.all(raw), w, be.all(rstd), dw, shape);
        }
        self.qkv.backward(be, p, grads, x, be.all(&g.dqkv), Dx::Write(be.all_mut(dx)), rows);
    }
}
