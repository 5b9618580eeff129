//! The MLP as a block's mixer: `down(act(up(x)))`, with a gated unit (gate and up fused as one
//! `[2F, d]` matrix: SwiGLU, Llama; GeGLU, Gemma), GELU (GPT-2) or squared ReLU (Nemotron-H).

use crate::Elems;
use crate::layers::{Dx, Linear};
use ondol_core::backend::{Activation, Backend};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MlpKind {
    /// `act(gate) * up`.
    Glu(Activation),
    Plain(Activation),
}

#[derive(Clone, Debug)]
pub(crate) struct Mlp {
    /// Llama and Gemma: gate and up fused (`[2F, d]`); GPT-2: c_fc; Nemotron-H: up_proj.
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
    /// The post-activation's gradient (scratch where the backend fuses the activation's
    /// backward into the down projection's GEMM).
    dact: B::Buf,
}

impl Mlp {
    fn pre_width(&self) -> usize {
        self.up.d_out
    }

    pub fn acts<B: Backend>(&self, be: &B, rows: usize) -> MlpActs<B> {
        MlpActs { pre: be.zeros(rows * self.pre_width()), act: be.zeros(rows * self.hidden) }
    }

    pub fn act_elems(&self, rows: usize) -> Elems {
        Elems::compute(rows * (self.pre_width() + self.hidden))
    }

    pub fn grads<B: Backend>(&self, be: &B, rows: usize) -> MlpGrads<B> {
        MlpGrads { dpre: be.zeros(rows * self.pre_width()), dact: be.zeros(rows * self.hidden) }
    }

    /// Elements of [`Mlp::grads`].
    pub fn grad_elems(&self, rows: usize) -> Elems {
        Elems::compute(rows * (self.pre_width() + self.hidden))
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
        match self.kind {
            MlpKind::Glu(act) => {
                self.up.forward(be, p, x, &mut a.pre, rows);
                be.glu_forward(act, be.all(&a.pre), be.all_mut(&mut a.act), self.hidden)
            }
            MlpKind::Plain(act) => self.up.forward_activation(be, p, x, act, &mut a.pre, &mut a.act, rows),
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
        let act_in = be.all(&a.act);
        match self.kind {
            MlpKind::Glu(act) => {
                self.down.backward(be, p, grads, act_in, dout, Dx::Write(be.all_mut(&mut g.dact)), rows);
                be.glu_backward(act, be.all(&g.dact), be.all(&a.pre), be.all_mut(&mut g.dpre), self.hidden)
            }
            MlpKind::Plain(act) => {
                let pre = (act, be.all(&a.pre));
                self.down.backward_through_activation(be, p, grads, act_in, pre, dout, &mut g.dpre, &mut g.dact, rows)
            }
        }
        self.up.backward(be, p, grads, x, be.all(&g.dpre), Dx::Write(be.all_mut(dx)), rows);
    }
}
