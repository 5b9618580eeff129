//! Decoder-only transformers: the Llama family and the GPT-2 family, one block structure.
//!
//! ```text
//! x = embed(ids) (+ learned positions, GPT-2)
//! for each layer:  mid = x + o_proj(attention(rope(qkv_proj(norm1(x)))))
//!                  x   = mid + down_proj(act(up_proj(norm2(mid))))
//! logits = head(norm_f(x))
//! ```
//! Llama: RMSNorm, rotary positions, grouped-query heads, SwiGLU, no biases. GPT-2:
//! LayerNorm, learned positions, GELU, biases, Conv1D weights stored `[in, out]`.
//!
//! Forward saves, per layer, every input that backward needs (the two residual-stream
//! values, both norm outputs and statistics, qkv after rotation, the attention output and its
//! log-sum-exp, the MLP's pre- and post-activation); backward walks the layers in reverse,
//! carrying the residual-stream gradient `dres`, and accumulates into the flat gradient
//! buffer. The model knows nothing of parallelism or of which device it runs on.

use crate::config::{Arch, ModelConfig};
use crate::params::{Init, ParamLayout, Path};
use ondol_core::Result;
use ondol_core::backend::{Activation, AttnShape, Backend, Gemm, rope_table};
use std::ops::Range;

/// How a dense layer's weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WeightLayout {
    /// `nn.Linear`: `[out, in]`, y = x W^T.
    OutIn,
    /// GPT-2's `Conv1D`: `[in, out]`, y = x W.
    InOut,
}

/// A dense layer's place in the flat parameter buffer.
#[derive(Clone, Debug)]
struct Linear {
    w: Range<usize>,
    b: Option<Range<usize>>,
    d_in: usize,
    d_out: usize,
    layout: WeightLayout,
}

impl Linear {
    /// `y = x W (+ b)`, writing y.
    fn forward<B: Backend>(&self, be: &B, p: &B::Buf, x: B::Ref<'_>, y: &mut B::Buf, rows: usize) {
        let g = Gemm::new(rows, self.d_out, self.d_in, false, self.layout == WeightLayout::OutIn);
        be.gemm(g, x, be.view(p, self.w.clone()), be.all_mut(y));
        if let Some(b) = &self.b {
            be.add_bias(be.all_mut(y), be.view(p, b.clone()), self.d_out);
        }
    }

    /// Accumulates dW (and db); writes dx if asked.
    #[allow(clippy::too_many_arguments)]
    fn backward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buf,
        grads: &mut B::Buf,
        x: B::Ref<'_>,
        dy: B::Ref<'_>,
        dx: Option<&mut B::Buf>,
        rows: usize,
    ) {
        let (i, o) = (self.d_in, self.d_out);
        if let Some(dx) = dx {
            let g = Gemm::new(rows, i, o, false, self.layout == WeightLayout::InOut);
            be.gemm(g, dy, be.view(p, self.w.clone()), be.all_mut(dx));
        }
        let dw = be.view_mut(grads, self.w.clone());
        match self.layout {
            WeightLayout::OutIn => be.gemm(Gemm::new(o, i, rows, true, false).accumulate(), dy, x, dw),
            WeightLayout::InOut => be.gemm(Gemm::new(i, o, rows, true, false).accumulate(), x, dy, dw),
        }
        if let Some(b) = &self.b {
            be.bias_backward(dy, be.view_mut(grads, b.clone()), o);
        }
    }

    fn params(&self) -> usize {
        self.d_in * self.d_out + if self.b.is_some() { self.d_out } else { 0 }
    }
}

/// A norm's parameters: RMSNorm has a weight, LayerNorm a weight and a bias.
#[derive(Clone, Debug)]
struct Norm {
    w: Range<usize>,
    b: Option<Range<usize>>,
}

/// What a norm saves for backward.
struct NormActs<B: Backend> {
    out: B::Buf,
    mean: B::Buf,
    rstd: B::Buf,
}

impl<B: Backend> NormActs<B> {
    fn new(be: &B, rows: usize, dim: usize, layernorm: bool) -> Self {
        Self { out: be.zeros(rows * dim), mean: be.zeros(if layernorm { rows } else { 0 }), rstd: be.zeros(rows) }
    }
}

impl Norm {
    fn forward<B: Backend>(&self, be: &B, p: &B::Buf, x: B::Ref<'_>, a: &mut NormActs<B>, dim: usize, eps: f32) {
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
    fn backward<B: Backend>(
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

#[derive(Clone, Debug)]
struct Layer {
    norm1: Norm,
    qkv: Linear,
    out: Linear,
    norm2: Norm,
    /// Llama: gate and up fused (`[2F, d]`); GPT-2: c_fc.
    mlp_in: Linear,
    mlp_out: Linear,
}

/// A Llama- or GPT-2-style model: its config, its parameter layout, and where each layer's
/// tensors sit in the flat buffer.
#[derive(Clone, Debug)]
pub struct Transformer {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    embed: Range<usize>,
    positions: Option<Range<usize>>,
    layers: Vec<Layer>,
    norm_f: Norm,
    head: Linear,
}

impl Transformer {
    pub fn new(cfg: ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let (d, v, f) = (cfg.d_model, cfg.vocab_size, cfg.ffn());
        let (hd, kvd) = (cfg.n_heads * cfg.head_dim(), cfg.kv_heads() * cfg.head_dim());
        let std = Init::Normal { std: cfg.init_std };
        let resid_std = if cfg.init_residual_scaling {
            Init::Normal { std: cfg.init_std / (2.0 * cfg.n_layers as f32).sqrt() }
        } else {
            std
        };
        let (ones, zeros) = (Init::Constant(1.0), Init::Constant(0.0));
        let mut lay = ParamLayout::default();
        let llama = cfg.arch == Arch::Llama;
        let root = Path::new(if llama { "model" } else { "transformer" });

        let (embed, positions) = if llama {
            (lay.add(root.at("embed_tokens").at("weight"), &[v, d], std, false), None)
        } else {
            let wte = lay.add(root.at("wte").at("weight"), &[v, d], std, false);
            (wte, Some(lay.add(root.at("wpe").at("weight"), &[cfg.max_seq_len, d], std, false)))
        };

        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let layer = if llama {
                let p = root.at("layers").at(i);
                let (att, mlp) = (p.at("self_attn"), p.at("mlp"));
                let norm1 = Norm { w: lay.add(p.at("input_layernorm").at("weight"), &[d], ones, false), b: None };
                // q, k, v back to back: one [(H + 2 Hkv) D, d] matrix.
                let q = lay.add(att.at("q_proj").at("weight"), &[hd, d], std, true);
                lay.add(att.at("k_proj").at("weight"), &[kvd, d], std, true);
                let vr = lay.add(att.at("v_proj").at("weight"), &[kvd, d], std, true);
                let o = lay.add(att.at("o_proj").at("weight"), &[d, hd], resid_std, true);
                let norm2 =
                    Norm { w: lay.add(p.at("post_attention_layernorm").at("weight"), &[d], ones, false), b: None };
                let gate = lay.add(mlp.at("gate_proj").at("weight"), &[f, d], std, true);
                let up = lay.add(mlp.at("up_proj").at("weight"), &[f, d], std, true);
                let down = lay.add(mlp.at("down_proj").at("weight"), &[d, f], resid_std, true);
                let dense =
                    |w: Range<usize>, d_in, d_out| Linear { w, b: None, d_in, d_out, layout: WeightLayout::OutIn };
                Layer {
                    norm1,
                    qkv: dense(q.start..vr.end, d, hd + 2 * kvd),
                    out: dense(o, hd, d),
                    norm2,
                    mlp_in: dense(gate.start..up.end, d, 2 * f),
                    mlp_out: dense(down, f, d),
                }
            } else {
                let p = root.at("h").at(i);
                let norm = |name: &str, lay: &mut ParamLayout| Norm {
                    w: lay.add(p.at(name).at("weight"), &[d], ones, false),
                    b: Some(lay.add(p.at(name).at("bias"), &[d], zeros, false)),
                };
                let norm1 = norm("ln_1", &mut lay);
                let conv = |path: Path, d_in, d_out, init, lay: &mut ParamLayout| Linear {
                    w: lay.add(path.at("weight"), &[d_in, d_out], init, true),
                    b: Some(lay.add(path.at("bias"), &[d_out], zeros, false)),
                    d_in,
                    d_out,
                    layout: WeightLayout::InOut,
                };
                let qkv = conv(p.at("attn").at("c_attn"), d, 3 * d, std, &mut lay);
                let out = conv(p.at("attn").at("c_proj"), d, d, resid_std, &mut lay);
                let norm2 = norm("ln_2", &mut lay);
                let mlp_in = conv(p.at("mlp").at("c_fc"), d, f, std, &mut lay);
                let mlp_out = conv(p.at("mlp").at("c_proj"), f, d, resid_std, &mut lay);
                Layer { norm1, qkv, out, norm2, mlp_in, mlp_out }
            };
            layers.push(layer);
        }

        let norm_f = if llama {
            Norm { w: lay.add(root.at("norm").at("weight"), &[d], ones, false), b: None }
        } else {
            Norm {
                w: lay.add(root.at("ln_f").at("weight"), &[d], ones, false),
                b: Some(lay.add(root.at("ln_f").at("bias"), &[d], zeros, false)),
            }
        };
        let head_w =
            if cfg.tied() { embed.clone() } else { lay.add(Path::new("lm_head").at("weight"), &[v, d], std, true) };
        let head = Linear { w: head_w, b: None, d_in: d, d_out: v, layout: WeightLayout::OutIn };
        Ok(Self { cfg, layout: lay, embed, positions, layers, norm_f, head })
    }

    fn attn_shape(&self, batch: usize, seq: usize) -> AttnShape {
        AttnShape {
            batch,
            seq,
            n_heads: self.cfg.n_heads,
            n_kv_heads: self.cfg.kv_heads(),
            head_dim: self.cfg.head_dim(),
        }
    }

    /// All parameters, counted once (a tied head is the embedding).
    pub fn num_params(&self) -> usize {
        self.layout.total()
    }

    /// Parameters that take part in matrix multiplies for every token: all but the
    /// embedding tables, plus the output head (counted even when tied, since its GEMM runs).
    pub fn num_flop_params(&self) -> usize {
        let embeddings = self.embed.len() + self.positions.as_ref().map_or(0, |r| r.len());
        let tied_head = if self.cfg.tied() { self.head.params() } else { 0 };
        self.layout.total() - embeddings + tied_head
    }

    /// Training FLOPs per token (PaLM appendix B): 6 N + 12 L d T, forward and backward.
    pub fn flops_per_token(&self, seq: usize) -> u64 {
        6 * self.num_flop_params() as u64 + 12 * (self.cfg.n_layers * self.cfg.d_model * seq) as u64
    }

    /// Bytes of activation memory a [`Workspace`] for this micro-batch shape holds (f32).
    pub fn activation_bytes(&self, batch: usize, seq: usize, recompute_every: usize) -> u64 {
        let cfg = &self.cfg;
        let (rows, d, f) = ((batch * seq) as u64, cfg.d_model as u64, cfg.ffn() as u64);
        let shape = self.attn_shape(batch, seq);
        let (qkv, q) = (shape.qkv_width() as u64, shape.q_width() as u64);
        let mlp_in = if cfg.arch == Arch::Llama { 2 * f } else { f };
        let norm = rows * d + 2 * rows;
        let lse = (batch * cfg.n_heads * seq) as u64;
        let per_layer = 2 * norm + rows * (qkv + q + d + mlp_in + f) + lse;
        let saved =
            (0..cfg.n_layers).filter(|&l| !recomputed(l, recompute_every)).count() + usize::from(recompute_every > 0);
        let floats = saved as u64 * per_layer
            + (cfg.n_layers as u64 + 1) * rows * d
            + norm
            + rows * (cfg.vocab_size as u64 + 1)
            + rows * (2 * d + qkv + q + mlp_in + f);
        4 * floats
    }

    /// Computes the logits of `ids` (`[batch, seq]`, row-major) into `ws.logits`, saving
    /// what backward needs in `ws`.
    pub fn forward<B: Backend>(&self, be: &B, params: &B::Buf, ws: &mut Workspace<B>, ids: &B::Ids) {
        self.forward_at(be, params, ws, ids, None);
    }

    /// Inference: the logits of `ws.seq` new tokens per sequence that follow the `cache.len`
    /// tokens already in `cache`, appending their keys and values to it.
    pub fn forward_cached<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        ws: &mut Workspace<B>,
        ids: &B::Ids,
        cache: &mut KvCache<B>,
    ) {
        assert!(cache.len + ws.seq <= cache.max_seq && cache.batch == ws.batch, "KV cache too small");
        self.forward_at(be, params, ws, ids, Some(&mut *cache));
        cache.len += ws.seq;
    }

    fn forward_at<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        ws: &mut Workspace<B>,
        ids: &B::Ids,
        cache: Option<&mut KvCache<B>>,
    ) {
        let (d, rows, eps) = (self.cfg.d_model, ws.rows, self.cfg.norm_eps);
        // The new tokens start at position `pos`: positions and rotations are read from there.
        let pos = cache.as_ref().map_or(0, |c| c.len);
        let positions = self.positions.as_ref().map(|r| (be.view(params, r.start + pos * d..r.end), ws.seq));
        be.embedding_forward(ids, be.view(params, self.embed.clone()), positions, be.all_mut(&mut ws.res[0]), d);

        let (mut kv_cache, rope) = match cache {
            Some(KvCache { k, v, rope, max_seq, .. }) => {
                // GPT-2's table is empty (learned positions): an empty view, never read.
                let len = be.len(rope);
                let table = be.view(&*rope, (pos * self.cfg.head_dim()).min(len)..len);
                (Some((k, v, *max_seq)), table)
            }
            None => (None, be.all(&ws.rope)),
        };
        for l in 0..self.layers.len() {
            let (done, next) = ws.res.split_at_mut(l + 1);
            // A recomputed layer runs in the shared scratch; its input stays in `res`.
            let a = match ws.layers[l].as_mut() {
                Some(a) => a,
                None => ws.shared.as_mut().expect("a scratch for recomputed layers"),
            };
            let kv = kv_cache.as_mut().map(|(k, v, max_seq)| (&mut k[l], &mut v[l], pos, *max_seq));
            self.block_forward(be, params, l, &done[l], a, &mut next[0], rope, kv, rows);
        }

        let last = &ws.res[self.layers.len()];
        self.norm_f.forward(be, params, be.all(last), &mut ws.norm_f, d, eps);
        self.head.forward(be, params, be.all(&ws.norm_f.out), &mut ws.logits, rows);
    }

    /// Layer `l` on input `x`: saves what backward needs in `a` and writes its output to
    /// `x_next`. With `kv`, attention appends to and reads from that layer's KV cache.
    #[allow(clippy::too_many_arguments)]
    fn block_forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        l: usize,
        x: &B::Buf,
        a: &mut LayerActs<B>,
        x_next: &mut B::Buf,
        rope: B::Ref<'_>,
        kv: Option<(&mut B::Buf, &mut B::Buf, usize, usize)>,
        rows: usize,
    ) {
        let (layer, d, eps) = (&self.layers[l], self.cfg.d_model, self.cfg.norm_eps);
        let shape = self.attn_shape(rows / a.seq, a.seq);
        layer.norm1.forward(be, params, be.all(x), &mut a.norm1, d, eps);
        layer.qkv.forward(be, params, be.all(&a.norm1.out), &mut a.qkv, rows);
        if self.cfg.arch == Arch::Llama {
            be.rope(be.all_mut(&mut a.qkv), rope, shape, false);
        }
        match kv {
            None => be.attention_forward(be.all(&a.qkv), be.all_mut(&mut a.attn), be.all_mut(&mut a.lse), shape),
            Some((k, v, pos, max_seq)) => {
                let (k, v) = (be.all_mut(k), be.all_mut(v));
                be.attention_cached(be.all(&a.qkv), k, v, be.all_mut(&mut a.attn), shape, pos, max_seq);
            }
        }
        layer.out.forward(be, params, be.all(&a.attn), &mut a.mid, rows);
        be.add_assign(be.all_mut(&mut a.mid), be.all(x));

        layer.norm2.forward(be, params, be.all(&a.mid), &mut a.norm2, d, eps);
        layer.mlp_in.forward(be, params, be.all(&a.norm2.out), &mut a.mlp_in, rows);
        match self.cfg.arch {
            Arch::Llama => be.swiglu_forward(be.all(&a.mlp_in), be.all_mut(&mut a.act), self.cfg.ffn()),
            Arch::Gpt2 => be.activation_forward(Activation::Gelu, be.all(&a.mlp_in), be.all_mut(&mut a.act)),
        }
        layer.mlp_out.forward(be, params, be.all(&a.act), x_next, rows);
        be.add_assign(be.all_mut(x_next), be.all(&a.mid));
    }

    /// Cross-entropy of `ws.logits` against `targets`; returns the SUM of the per-token
    /// losses. With `grad_scale`, the logits are replaced by `grad_scale * dloss/dlogits`,
    /// ready for [`Transformer::backward`].
    pub fn loss<B: Backend>(&self, be: &B, ws: &mut Workspace<B>, targets: &B::Ids, grad_scale: Option<f32>) -> f64 {
        let vocab = self.cfg.vocab_size;
        be.cross_entropy(be.all_mut(&mut ws.logits), targets, be.all_mut(&mut ws.losses), vocab, grad_scale);
        be.sum(be.all(&ws.losses))
    }

    /// Backpropagates the logit gradients left in `ws.logits` by [`Transformer::loss`],
    /// accumulating into `grads` (same layout as `params`).
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        ws: &mut Workspace<B>,
        ids: &B::Ids,
    ) {
        let (d, rows) = (self.cfg.d_model, ws.rows);
        let shape = self.attn_shape(ws.batch, ws.seq);
        let s = &mut ws.scratch;

        self.head.backward(be, params, grads, be.all(&ws.norm_f.out), be.all(&ws.logits), Some(&mut s.dnorm), rows);
        be.fill(be.all_mut(&mut s.dres), 0.0);
        let last = &ws.res[self.layers.len()];
        self.norm_f.backward(be, params, grads, be.all(&s.dnorm), be.all(last), &ws.norm_f, &mut s.dres, d);

        let rope = be.all(&ws.rope);
        for l in (0..self.layers.len()).rev() {
            let layer = &self.layers[l];
            let a: &LayerActs<B> = match &ws.layers[l] {
                Some(a) => a,
                None => {
                    // Activation checkpointing: run the block again from its saved input. The
                    // same ops on the same bits give the same activations; its output goes to
                    // scratch (`dnorm` is free until this layer's MLP backward writes it).
                    let shared = ws.shared.as_mut().expect("a scratch for recomputed layers");
                    self.block_forward(be, params, l, &ws.res[l], shared, &mut s.dnorm, rope, None, rows);
                    shared
                }
            };
            // dres holds dL/d(x_next) = dL/d(mid) (skip path) + the MLP branch below.
            layer.mlp_out.backward(be, params, grads, be.all(&a.act), be.all(&s.dres), Some(&mut s.dact), rows);
            match self.cfg.arch {
                Arch::Llama => {
                    be.swiglu_backward(be.all(&s.dact), be.all(&a.mlp_in), be.all_mut(&mut s.dmlp_in), self.cfg.ffn())
                }
                Arch::Gpt2 => be.activation_backward(
                    Activation::Gelu,
                    be.all(&s.dact),
                    be.all(&a.mlp_in),
                    be.all_mut(&mut s.dmlp_in),
                ),
            }
            layer.mlp_in.backward(
                be,
                params,
                grads,
                be.all(&a.norm2.out),
                be.all(&s.dmlp_in),
                Some(&mut s.dnorm),
                rows,
            );
            layer.norm2.backward(be, params, grads, be.all(&s.dnorm), be.all(&a.mid), &a.norm2, &mut s.dres, d);

            // dres now holds dL/d(mid) = dL/d(x) (skip path) + the attention branch below.
            layer.out.backward(be, params, grads, be.all(&a.attn), be.all(&s.dres), Some(&mut s.dattn), rows);
            let (qkv, attn, lse) = (be.all(&a.qkv), be.all(&a.attn), be.all(&a.lse));
            be.attention_backward(be.all(&s.dattn), qkv, attn, lse, be.all_mut(&mut s.dqkv), shape);
            if self.cfg.arch == Arch::Llama {
                be.rope(be.all_mut(&mut s.dqkv), be.all(&ws.rope), shape, true);
            }
            layer.qkv.backward(be, params, grads, be.all(&a.norm1.out), be.all(&s.dqkv), Some(&mut s.dnorm), rows);
            layer.norm1.backward(be, params, grads, be.all(&s.dnorm), be.all(&ws.res[l]), &a.norm1, &mut s.dres, d);
        }

        be.embedding_backward(ids, be.all(&s.dres), be.view_mut(grads, self.embed.clone()), d);
        if let Some(pos) = &self.positions {
            be.position_embedding_backward(be.all(&s.dres), be.view_mut(grads, pos.clone()), ws.seq, d);
        }
    }
}

/// Whether layer `l` is recomputed in backward when every `every`-th layer is (0: none).
fn recomputed(l: usize, every: usize) -> bool {
    every > 0 && l.is_multiple_of(every)
}

/// Every layer's keys and values of the tokens seen so far, for incremental decoding.
pub struct KvCache<B: Backend> {
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
    /// Rotary table for all `max_seq` positions (empty for learned positions).
    rope: B::Buf,
    pub batch: usize,
    pub max_seq: usize,
    /// Tokens already in the cache, per sequence.
    pub len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(be: &B, model: &Transformer, batch: usize, max_seq: usize) -> Self {
        let cfg = &model.cfg;
        let kvw = cfg.kv_heads() * cfg.head_dim();
        let rope = match cfg.arch {
            Arch::Llama => rope_table(max_seq, cfg.head_dim(), cfg.rope_theta),
            Arch::Gpt2 => Vec::new(),
        };
        Self {
            k: (0..cfg.n_layers).map(|_| be.zeros(batch * max_seq * kvw)).collect(),
            v: (0..cfg.n_layers).map(|_| be.zeros(batch * max_seq * kvw)).collect(),
            rope: be.upload(&rope),
            batch,
            max_seq,
            len: 0,
        }
    }
}

/// What one layer's forward saves for its backward.
struct LayerActs<B: Backend> {
    /// Tokens per sequence of the micro-batch these buffers are sized for.
    seq: usize,
    norm1: NormActs<B>,
    qkv: B::Buf,
    attn: B::Buf,
    lse: B::Buf,
    mid: B::Buf,
    norm2: NormActs<B>,
    mlp_in: B::Buf,
    act: B::Buf,
}

/// Gradients of activations, reused by every layer in turn.
struct Scratch<B: Backend> {
    dres: B::Buf,
    dnorm: B::Buf,
    dqkv: B::Buf,
    dattn: B::Buf,
    dmlp_in: B::Buf,
    dact: B::Buf,
}

/// Every activation buffer of one micro-batch shape, allocated once and reused each step.
pub struct Workspace<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    rows: usize,
    /// The residual stream entering each layer, and leaving the last (`n_layers + 1`).
    res: Vec<B::Buf>,
    /// Saved activations per layer; None for a layer recomputed in backward.
    layers: Vec<Option<LayerActs<B>>>,
    /// The one set of activation buffers that recomputed layers share.
    shared: Option<LayerActs<B>>,
    norm_f: NormActs<B>,
    /// Logits after forward; logit gradients after [`Transformer::loss`] with a grad scale.
    pub logits: B::Buf,
    losses: B::Buf,
    rope: B::Buf,
    scratch: Scratch<B>,
}

impl<B: Backend> Workspace<B> {
    pub fn new(be: &B, model: &Transformer, batch: usize, seq: usize) -> Result<Self> {
        Self::with_recompute(be, model, batch, seq, 0)
    }

    /// A workspace that keeps no activations for every `recompute_every`-th layer (0: none),
    /// recomputing them in backward from the layer's input: less memory, one more forward of
    /// those layers, identical results.
    pub fn with_recompute(
        be: &B,
        model: &Transformer,
        batch: usize,
        seq: usize,
        recompute_every: usize,
    ) -> Result<Self> {
        let cfg = &model.cfg;
        if seq == 0 || seq > cfg.max_seq_len {
            return Err(ondol_core::Error::config(
                "training.seq_len",
                format!("{seq} must be between 1 and model.max_seq_len = {}", cfg.max_seq_len),
            ));
        }
        let rows = batch * seq;
        let (d, f) = (cfg.d_model, cfg.ffn());
        let shape = model.attn_shape(batch, seq);
        let layernorm = cfg.arch == Arch::Gpt2;
        let mlp_in = match cfg.arch {
            Arch::Llama => 2 * f,
            Arch::Gpt2 => f,
        };
        let layer = || LayerActs {
            seq,
            norm1: NormActs::new(be, rows, d, layernorm),
            qkv: be.zeros(rows * shape.qkv_width()),
            attn: be.zeros(rows * shape.q_width()),
            lse: be.zeros(batch * cfg.n_heads * seq),
            mid: be.zeros(rows * d),
            norm2: NormActs::new(be, rows, d, layernorm),
            mlp_in: be.zeros(rows * mlp_in),
            act: be.zeros(rows * f),
        };
        let rope = match cfg.arch {
            Arch::Llama => rope_table(seq, cfg.head_dim(), cfg.rope_theta),
            Arch::Gpt2 => Vec::new(),
        };
        Ok(Self {
            batch,
            seq,
            rows,
            res: (0..=cfg.n_layers).map(|_| be.zeros(rows * d)).collect(),
            layers: (0..cfg.n_layers).map(|l| (!recomputed(l, recompute_every)).then(layer)).collect(),
            shared: (recompute_every > 0).then(layer),
            norm_f: NormActs::new(be, rows, d, layernorm),
            logits: be.zeros(rows * cfg.vocab_size),
            losses: be.zeros(rows),
            rope: be.upload(&rope),
            scratch: Scratch {
                dres: be.zeros(rows * d),
                dnorm: be.zeros(rows * d),
                dqkv: be.zeros(rows * shape.qkv_width()),
                dattn: be.zeros(rows * shape.q_width()),
                dmlp_in: be.zeros(rows * mlp_in),
                dact: be.zeros(rows * f),
            },
        })
    }
}
