//! The Mamba-2 mixer (Dao & Gu 2024, "SSD"), as Hugging Face's `Mamba2Mixer` computes it:
//!
//! ```text
//! z, xBC, dt = in_proj(h)              (three GEMMs over row slices of one weight)
//! xBC    = silu(causal_conv1d(xBC))    (depthwise over the E + 2 G N channels, with bias)
//! y      = ssd(x, dt, A = -exp(A_log), B, C, D)   (softplus(dt + dt_bias) fused)
//! y      = gated_rmsnorm(y, z)         (y silu(z), normalised per group, times norm.weight)
//! out    = out_proj(y)
//! ```
//! E = expand * d_model = heads * head_dim; B and C come in G groups of N states.

use crate::Elems;
use crate::layers::{CausalConv, Dx, Linear, RecurrentState};
use ondol_core::backend::{Backend, SsdGrads, SsdInputs, SsdShape};
use std::ops::Range;

#[derive(Clone, Debug)]
pub(crate) struct Mamba2 {
    pub in_z: Linear,
    pub in_xbc: Linear,
    pub in_dt: Linear,
    pub conv: CausalConv,
    pub dt_bias: Range<usize>,
    pub a_log: Range<usize>,
    pub d: Range<usize>,
    pub norm_w: Range<usize>,
    pub out: Linear,
    pub heads: usize,
    pub head_dim: usize,
    pub groups: usize,
    pub state: usize,
    pub chunk: usize,
    /// Values per gated-norm group (E / G in Mamba-2).
    pub norm_group: usize,
    pub eps: f32,
}

pub(crate) struct Mamba2Acts<B: Backend> {
    z: B::Buf,
    xbc_raw: B::Buf,
    xbc: B::Buf,
    dt: B::Buf,
    y: B::Buf,
    states: B::Buf,
    normed: B::Buf,
    rstd: B::Buf,
}

pub(crate) struct Mamba2Grads<B: Backend> {
    dnormed: B::Buf,
    dy: B::Buf,
    dz: B::Buf,
    dxbc: B::Buf,
    dxbc_raw: B::Buf,
    ddt: B::Buf,
}

impl Mamba2 {
    fn shape(&self, batch: usize, len: usize) -> SsdShape {
        SsdShape {
            batch,
            len,
            heads: self.heads,
            head_dim: self.head_dim,
            groups: self.groups,
            state: self.state,
            chunk: self.chunk,
        }
    }

    /// Lengths of z, xBC before and after the convolution, dt, y, the saved states, the
    /// normed output and its rstd.
    fn act_lens(&self, batch: usize, seq: usize) -> [usize; 8] {
        let s = self.shape(batch, seq);
        let (rows, e, w) = (s.rows(), s.inner(), s.xbc_width());
        [
            rows * e,
            rows * w,
            rows * w,
            rows * self.heads,
            rows * e,
            s.states_len(),
            rows * e,
            rows * e / self.norm_group,
        ]
    }

    pub fn acts<B: Backend>(&self, be: &B, batch: usize, seq: usize) -> Mamba2Acts<B> {
        let [z, xbc_raw, xbc, dt, y, states, normed, rstd] = self.act_lens(batch, seq);
        let [z, xbc_raw, xbc, dt, y, normed] = [z, xbc_raw, xbc, dt, y, normed].map(|n| be.zeros(n));
        Mamba2Acts { z, xbc_raw, xbc, dt, y, states: be.zeros_f32(states), normed, rstd: be.zeros_f32(rstd) }
    }

    pub fn act_elems(&self, batch: usize, seq: usize) -> Elems {
        let [z, xbc_raw, xbc, dt, y, states, normed, rstd] = self.act_lens(batch, seq);
        Elems::compute(z + xbc_raw + xbc + dt + y + normed) + Elems::f32(states + rstd)
    }

    /// Lengths of d(normed), dy, dz, dxBC after and before the convolution, and d(dt).
    fn grad_lens(&self, rows: usize) -> [usize; 6] {
        let s = self.shape(1, 1);
        let (e, w) = (rows * s.inner(), rows * s.xbc_width());
        [e, e, e, w, w, rows * self.heads]
    }

    pub fn grads<B: Backend>(&self, be: &B, rows: usize) -> Mamba2Grads<B> {
        let [dnormed, dy, dz, dxbc, dxbc_raw, ddt] = self.grad_lens(rows).map(|n| be.zeros(n));
        Mamba2Grads { dnormed, dy, dz, dxbc, dxbc_raw, ddt }
    }

    pub fn grad_elems(&self, rows: usize) -> Elems {
        Elems::compute(self.grad_lens(rows).iter().sum())
    }

    fn ssd_inputs<'a, B: Backend>(
        &self,
        be: &'a B,
        p: &'a B::Buf,
        xbc: &'a B::Buf,
        dt: &'a B::Buf,
    ) -> SsdInputs<B::Ref<'a>> {
        SsdInputs {
            xbc: be.all(xbc),
            dt: be.all(dt),
            dt_bias: be.view(p, self.dt_bias.clone()),
            a_log: be.view(p, self.a_log.clone()),
            d: be.view(p, self.d.clone()),
        }
    }

    /// The inference state of `batch` sequences before their first token.
    pub fn recurrent_state<B: Backend>(&self, be: &B, batch: usize) -> RecurrentState<B> {
        let s = self.shape(batch, 1);
        let conv = be.zeros(batch * (self.conv.taps() - 1) * s.xbc_width());
        RecurrentState { conv, ssm: be.zeros_f32(batch * s.inner() * s.state) }
    }

    /// With `state` (inference), the sequences continue from it and it moves on past them;
    /// nothing is saved for backward then.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        h: B::Ref<'_>,
        a: &mut Mamba2Acts<B>,
        out: &mut B::Buf,
        (batch, seq): (usize, usize),
        state: Option<&mut RecurrentState<B>>,
    ) {
        let (rows, shape) = (batch * seq, self.shape(batch, seq));
        self.in_z.forward(be, p, h, &mut a.z, rows);
        self.in_xbc.forward(be, p, h, &mut a.xbc_raw, rows);
        self.in_dt.forward(be, p, h, &mut a.dt, rows);
        match state {
            Some(st) => {
                self.conv.forward_recurrent(be, p, be.all(&a.xbc_raw), &mut st.conv, &mut a.xbc, seq);
                let inputs = self.ssd_inputs(be, p, &a.xbc, &a.dt);
                be.ssd_recurrent(inputs, be.all_mut(&mut a.y), be.all_mut(&mut st.ssm), shape);
            }
            None => {
                self.conv.forward(be, p, be.all(&a.xbc_raw), &mut a.xbc, seq);
                let inputs = self.ssd_inputs(be, p, &a.xbc, &a.dt);
                be.ssd_forward(inputs, be.all_mut(&mut a.y), be.all_mut(&mut a.states), shape);
            }
        }
        let norm_w = be.view(p, self.norm_w.clone());
        let (normed, rstd) = (be.all_mut(&mut a.normed), be.all_mut(&mut a.rstd));
        be.gated_rmsnorm_forward(be.all(&a.y), be.all(&a.z), norm_w, normed, rstd, self.norm_group, self.eps);
        self.out.forward(be, p, be.all(&a.normed), out, rows);
    }

    /// Accumulates parameter gradients; writes `dh`, the gradient of the block's normed input.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        grads: &mut B::Buf,
        h: B::Ref<'_>,
        a: &Mamba2Acts<B>,
        dout: B::Ref<'_>,
        dh: &mut B::Buf,
        g: &mut Mamba2Grads<B>,
        (batch, seq): (usize, usize),
    ) {
        let (rows, shape) = (batch * seq, self.shape(batch, seq));
        self.out.backward(be, p, grads, be.all(&a.normed), dout, Dx::Write(be.all_mut(&mut g.dnormed)), rows);
        be.gated_rmsnorm_backward(
            be.all(&g.dnormed),
            be.all(&a.y),
            be.all(&a.z),
            be.view(p, self.norm_w.clone()),
            be.all(&a.rstd),
            be.all_mut(&mut g.dy),
            be.all_mut(&mut g.dz),
            be.view_mut(grads, self.norm_w.clone()),
            self.norm_group,
        );
        {
            let [ddt_bias, da_log, dd] =
                be.views_mut(grads, [self.dt_bias.clone(), self.a_log.clone(), self.d.clone()]);
            let sg = SsdGrads { dxbc: be.all_mut(&mut g.dxbc), ddt: be.all_mut(&mut g.ddt), ddt_bias, da_log, dd };
            let inputs = self.ssd_inputs(be, p, &a.xbc, &a.dt);
            be.ssd_backward(be.all(&g.dy), inputs, be.all(&a.states), sg, shape);
        }
        self.conv.backward(be, p, grads, be.all(&a.xbc_raw), be.all(&g.dxbc), &mut g.dxbc_raw, seq);
        self.in_z.backward(be, p, grads, h, be.all(&g.dz), Dx::Write(be.all_mut(dh)), rows);
        self.in_xbc.backward(be, p, grads, h, be.all(&g.dxbc_raw), Dx::Add(be.all_mut(dh)), rows);
        self.in_dt.backward(be, p, grads, h, be.all(&g.ddt), Dx::Add(be.all_mut(dh)), rows);
    }
}
