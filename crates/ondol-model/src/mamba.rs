//! The Mamba-1 mixer (Gu & Dao 2023), as Hugging Face's `MambaMixer` computes it:
//!
//! ```text
//! x, z   = in_proj(h)                  (two GEMMs over the row halves of one [2E, d] weight)
//! u      = silu(causal_conv1d(x))      (depthwise, kernel K, with bias)
//! dt, B, C = x_proj(u)                 (three GEMMs: R, N and N outputs)
//! delta  = dt_proj.weight dt           (its bias and the softplus are fused into the scan)
//! y      = selective_scan(u, delta, A = -exp(A_log), B, C, D) * silu(z)
//! out    = out_proj(y)
//! ```
//! E = expand * d_model channels, N states per channel, R = time_step_rank.
//!
//! Split over tensor-parallel shards by channels, each shard's x_proj sees only its channels:
//! dt, B and C are summed over the shards after x_proj in forward, and their gradients (partial
//! over the channels, from the scan and dt_proj) before x_proj in backward.

use crate::Elems;
use crate::layers::{CausalConv, Dx, Linear, RecurrentState};
use crate::part::TensorParallel;
use ondol_core::Result;
use ondol_core::backend::{Backend, ScanGrads, ScanInputs, ScanShape};
use std::ops::Range;

#[derive(Clone, Debug)]
pub(crate) struct Mamba {
    pub in_x: Linear,
    pub in_z: Linear,
    pub conv: CausalConv,
    pub x_dt: Linear,
    pub x_b: Linear,
    pub x_c: Linear,
    /// dt_proj's weight; its bias is `dt_bias`, applied inside the scan.
    pub dt_proj: Linear,
    pub dt_bias: Range<usize>,
    pub a_log: Range<usize>,
    pub d: Range<usize>,
    pub out: Linear,
    pub inner: usize,
    pub state: usize,
    pub rank: usize,
    /// Tokens between the states the scan saves for backward.
    pub chunk: usize,
    /// Whether the channels are split over tensor-parallel shards.
    pub split: bool,
}

pub(crate) struct MambaActs<B: Backend> {
    x: B::Buf,
    z: B::Buf,
    u: B::Buf,
    dt: B::Buf,
    b: B::Buf,
    c: B::Buf,
    delta: B::Buf,
    y: B::Buf,
    states: B::Buf,
}

pub(crate) struct MambaGrads<B: Backend> {
    dy: B::Buf,
    du: B::Buf,
    ddelta: B::Buf,
    db: B::Buf,
    dc: B::Buf,
    dz: B::Buf,
    ddt: B::Buf,
    dx: B::Buf,
}

impl Mamba {
    fn shape(&self, batch: usize, len: usize) -> ScanShape {
        ScanShape { batch, len, channels: self.inner, state: self.state, chunk: self.chunk }
    }

    /// Lengths of x, z, u, dt, B, C, delta, y and the saved states.
    fn act_lens(&self, batch: usize, seq: usize) -> [usize; 9] {
        let (rows, e, n) = (batch * seq, self.inner, self.state);
        let states = batch * self.shape(batch, seq).saved() * e * n;
        [rows * e, rows * e, rows * e, rows * self.rank, rows * n, rows * n, rows * e, rows * e, states]
    }

    pub fn acts<B: Backend>(&self, be: &B, batch: usize, seq: usize) -> MambaActs<B> {
        let [x, z, u, dt, b, c, delta, y, states] = self.act_lens(batch, seq);
        let [x, z, u, dt, b, c, delta, y] = [x, z, u, dt, b, c, delta, y].map(|n| be.zeros(n));
        MambaActs { x, z, u, dt, b, c, delta, y, states: be.zeros_f32(states) }
    }

    pub fn act_elems(&self, batch: usize, seq: usize) -> Elems {
        let [lens @ .., states] = self.act_lens(batch, seq);
        Elems::compute(lens.iter().sum()) + Elems::f32(states)
    }

    /// Lengths of dy, du, ddelta, dB, dC, dz, d(dt) and dx.
    fn grad_lens(&self, rows: usize) -> [usize; 8] {
        let (e, n) = (rows * self.inner, rows * self.state);
        [e, e, e, n, n, e, rows * self.rank, e]
    }

    pub fn grads<B: Backend>(&self, be: &B, rows: usize) -> MambaGrads<B> {
        let [dy, du, ddelta, db, dc, dz, ddt, dx] = self.grad_lens(rows).map(|n| be.zeros(n));
        MambaGrads { dy, du, ddelta, db, dc, dz, ddt, dx }
    }

    pub fn grad_elems(&self, rows: usize) -> Elems {
        Elems::compute(self.grad_lens(rows).iter().sum())
    }

    /// The scan's inputs: activations `u`, `delta`, `b`, `c`, `z` and the parameters.
    #[allow(clippy::too_many_arguments)]
    fn scan_inputs<'a, B: Backend>(
        &self,
        be: &'a B,
        p: &'a B::Buf,
        [u, delta, b, c, z]: [&'a B::Buf; 5],
    ) -> ScanInputs<B::Ref<'a>> {
        ScanInputs {
            u: be.all(u),
            delta: be.all(delta),
            delta_bias: be.view(p, self.dt_bias.clone()),
            a_log: be.view(p, self.a_log.clone()),
            b: be.all(b),
            c: be.all(c),
            d: be.view(p, self.d.clone()),
            z: be.all(z),
        }
    }

    /// The inference state of `batch` sequences before their first token.
    pub fn recurrent_state<B: Backend>(&self, be: &B, batch: usize) -> RecurrentState<B> {
        let conv = be.zeros(batch * (self.conv.taps() - 1) * self.inner);
        RecurrentState { conv, ssm: be.zeros_f32(batch * self.inner * self.state) }
    }

    /// With `state` (inference), the sequences continue from it and it moves on past them;
    /// nothing is saved for backward then.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        h: B::Ref<'_>,
        a: &mut MambaActs<B>,
        out: &mut B::Buf,
        (batch, seq): (usize, usize),
        mut state: Option<&mut RecurrentState<B>>,
        tp: &mut dyn TensorParallel<B>,
    ) -> Result<()> {
        let rows = batch * seq;
        self.in_x.forward(be, p, h, &mut a.x, rows);
        self.in_z.forward(be, p, h, &mut a.z, rows);
        match state.as_deref_mut() {
            Some(st) => self.conv.forward_recurrent(be, p, be.all(&a.x), &mut st.conv, &mut a.u, seq),
            None => self.conv.forward(be, p, be.all(&a.x), &mut a.u, seq),
        }
        self.x_dt.forward(be, p, be.all(&a.u), &mut a.dt, rows);
        self.x_b.forward(be, p, be.all(&a.u), &mut a.b, rows);
        self.x_c.forward(be, p, be.all(&a.u), &mut a.c, rows);
        if self.split {
            for part in [&mut a.dt, &mut a.b, &mut a.c] {
                tp.all_reduce(be, part)?;
            }
        }
        self.dt_proj.forward(be, p, be.all(&a.dt), &mut a.delta, rows);
        let MambaActs { u, delta, b, c, z, y, states, .. } = a;
        let (inputs, shape) = (self.scan_inputs(be, p, [u, delta, b, c, z]), self.shape(batch, seq));
        match state {
            Some(st) => be.selective_scan_recurrent(inputs, be.all_mut(y), be.all_mut(&mut st.ssm), shape),
            None => be.selective_scan_forward(inputs, be.all_mut(y), be.all_mut(states), shape),
        }
        self.out.forward(be, p, be.all(&a.y), out, rows);
        Ok(())
    }

    /// Accumulates parameter gradients; writes `dh`, the gradient of the block's normed input.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        grads: &mut B::Buf,
        h: B::Ref<'_>,
        a: &MambaActs<B>,
        dout: B::Ref<'_>,
        dh: &mut B::Buf,
        g: &mut MambaGrads<B>,
        (batch, seq): (usize, usize),
        tp: &mut dyn TensorParallel<B>,
    ) -> Result<()> {
        let rows = batch * seq;
        self.out.backward(be, p, grads, be.all(&a.y), dout, Dx::Write(be.all_mut(&mut g.dy)), rows);
        {
            let [ddelta_bias, da_log, dd] =
                be.views_mut(grads, [self.dt_bias.clone(), self.a_log.clone(), self.d.clone()]);
            let sg = ScanGrads {
                du: be.all_mut(&mut g.du),
                ddelta: be.all_mut(&mut g.ddelta),
                ddelta_bias,
                da_log,
                db: be.all_mut(&mut g.db),
                dc: be.all_mut(&mut g.dc),
                dd,
                dz: be.all_mut(&mut g.dz),
            };
            let inputs = self.scan_inputs(be, p, [&a.u, &a.delta, &a.b, &a.c, &a.z]);
            be.selective_scan_backward(be.all(&g.dy), inputs, be.all(&a.states), sg, self.shape(batch, seq));
        }
        self.dt_proj.backward(be, p, grads, be.all(&a.dt), be.all(&g.ddelta), Dx::Write(be.all_mut(&mut g.ddt)), rows);
        if self.split {
            for part in [&mut g.ddt, &mut g.db, &mut g.dc] {
                tp.all_reduce(be, part)?;
            }
        }
        let u = be.all(&a.u);
        self.x_dt.backward(be, p, grads, u, be.all(&g.ddt), Dx::Add(be.all_mut(&mut g.du)), rows);
        self.x_b.backward(be, p, grads, u, be.all(&g.db), Dx::Add(be.all_mut(&mut g.du)), rows);
        self.x_c.backward(be, p, grads, u, be.all(&g.dc), Dx::Add(be.all_mut(&mut g.du)), rows);
        self.conv.backward(be, p, grads, be.all(&a.x), be.all(&g.du), &mut g.dx, seq);
        self.in_x.backward(be, p, grads, h, be.all(&g.dx), Dx::Write(be.all_mut(dh)), rows);
        self.in_z.backward(be, p, grads, h, be.all(&g.dz), Dx::Add(be.all_mut(dh)), rows);
        Ok(())
    }
}
