//! The MLP as a block's mixer: `down(act(up(x)))`, with SwiGLU (Llama: gate and up fused as
//! one `[2F, d]` matrix), GELU (GPT-2) or squared ReLU (Nemotron-H).

use crate::layers::{Dx, Linear};
use ondol_core::backend::{Activation, Backend};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MlpKind {
    /// `silu(gate) * up`.
    SwiGlu,
    Plain(Activation),
}

#[derive(Clone, Debug)]
pub(crate) struct Mlp {
    /// Llama: gate and up fused (`[2F, d]`); GPT-2: c_fc; Nemotron-H: up_proj.
    pub up: Linear,
    pub down: Linear,
    pub kind: MlpKind,
    pub hidden: usize,
}

/// The MLP's pre- and post-activation, saved for backward.
pub(crate) struct MlpActs<B: Backend> {
    pre: B::Buf,
    act: B::Buf,
}

pub(crate) struct MlpGrads<B: Backend> {
    dpre: B::Buf,
    dact: B::Buf,
}

impl Mlp {
    fn pre_width(&self) -> usize {
        self.up.d_out
    }

    pub fn acts<B: Backend>(&self, be: &B, rows: usize) -> MlpActs<B> {
        MlpActs { pre: be.zeros(rows * self.pre_width()), act: be.zeros(rows * self.hidden) }
    }

    pub fn act_floats(&self, rows: usize) -> u64 {
        (rows * (self.pre_width() + self.hidden)) as u64
    }

    pub fn grads<B: Backend>(&self, be: &B, rows: usize) -> MlpGrads<B> {
        MlpGrads { dpre: be.zeros(rows * self.pre_width()), dact: be.zeros(rows * self.hidden) }
    }

    pub fn forward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        x: B::Ref<'_>,
        a: &mut MlpActs<B>,
        out: &mut B::Buf,
        rows: usize,
    ) {
        self.up.forward(be, p, x, &mut a.pre, rows);
        match self.kind {
            MlpKind::SwiGlu => be.swiglu_forward(be.all(&a.pre), be.all_mut(&mut a.act), self.hidden),
            MlpKind::Plain(act) => be.activation_forward(act, be.all(&a.pre), be.all_mut(&mut a.act)),
        }
        self.down.forward(be, p, be.all(&a.act), out, rows);
    }

    /// Accumulates parameter gradients; writes `dx`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        grads: &mut B::Buf,
        x: B::Ref<'_>,
        a: &MlpActs<B>,
        dout: B::Ref<'_>,
        dx: &mut B::Buf,
        g: &mut MlpGrads<B>,
        rows: usize,
    ) {
        self.down.backward(be, p, grads, be.all(&a.act), dout, Dx::Write(&mut g.dact), rows);
        let (dact, pre, dpre) = (be.all(&g.dact), be.all(&a.pre), be.all_mut(&mut g.dpre));
        match self.kind {
            MlpKind::SwiGlu => be.swiglu_backward(dact, pre, dpre, self.hidden),
            MlpKind::Plain(act) => be.activation_backward(act, dact, pre, dpre),
        }
        self.up.backward(be, p, grads, x, be.all(&g.dpre), Dx::Write(dx), rows);
    }
}
