//! Decoder-only language models as a stack of pre-norm residual blocks:
//!
//! ```text
//! x = embed(ids) (+ learned positions, GPT-2)
//! for each block:  x = x + mixer(norm(x))      mixer: attention | MLP | Mamba-1 | Mamba-2
//! logits = head(norm_f(x))
//! ```
//! A Llama or GPT-2 layer is two blocks (attention, then MLP); a Mamba layer is one; a
//! hybrid's `pattern` names each layer's mixer (Nemotron-H). Llama: RMSNorm, rotary
//! positions, grouped-query heads, SwiGLU, no biases. GPT-2: LayerNorm, learned positions,
//! GELU, biases, Conv1D weights stored `[in, out]`. Mamba: RMSNorm, tied head.
//!
//! Forward saves the residual stream entering every block and what each block's backward
//! needs; backward walks the blocks in reverse, carrying the residual-stream gradient `dres`,
//! and accumulates into the flat gradient buffer. The model knows nothing of parallelism or of
//! which device it runs on.

use crate::attention::{Attention, AttnActs, AttnGrads, CacheSlot};
use crate::config::{Arch, LayerKind, ModelConfig};
use crate::layers::{CausalConv, Dx, Linear, Norm, NormActs, WeightLayout, norm_floats};
use crate::mamba::{Mamba, MambaActs, MambaGrads};
use crate::mamba2::{Mamba2, Mamba2Acts, Mamba2Grads};
use crate::mlp::{Mlp, MlpActs, MlpGrads, MlpKind};
use crate::params::{Init, ParamLayout, Path};
use ondol_core::Result;
use ondol_core::backend::{Activation, Backend, rope_table};
use std::ops::Range;

#[derive(Clone, Debug)]
enum Mixer {
    Attention(Attention),
    Mlp(Mlp),
    Mamba(Mamba),
    Mamba2(Mamba2),
}

/// Kinds of mixer, as indices into per-kind scratch.
const KINDS: usize = 4;

impl Mixer {
    fn kind(&self) -> usize {
        match self {
            Mixer::Attention(_) => 0,
            Mixer::Mlp(_) => 1,
            Mixer::Mamba(_) => 2,
            Mixer::Mamba2(_) => 3,
        }
    }
}

#[derive(Clone, Debug)]
struct Block {
    norm: Norm,
    mixer: Mixer,
}

/// A language model: its config, its parameter layout, and where each block's tensors sit in
/// the flat buffer.
#[derive(Clone, Debug)]
pub struct Model {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    embed: Range<usize>,
    positions: Option<Range<usize>>,
    blocks: Vec<Block>,
    /// The layer each block belongs to (activation checkpointing counts layers).
    block_layer: Vec<usize>,
    norm_f: Norm,
    head: Linear,
}

/// Registers parameters under one path and hands out their ranges.
struct Builder<'a> {
    lay: &'a mut ParamLayout,
    cfg: &'a ModelConfig,
}

impl Builder<'_> {
    fn std(&self) -> Init {
        Init::Normal { std: self.cfg.init_std }
    }
    /// Init of projections into the residual stream: scaled by 1/sqrt(2 n_layers) if asked.
    fn resid_std(&self) -> Init {
        let cfg = self.cfg;
        let scale = if cfg.init_residual_scaling { (2.0 * cfg.n_layers as f32).sqrt() } else { 1.0 };
        Init::Normal { std: cfg.init_std / scale }
    }
    fn add(&mut self, path: Path, shape: &[usize], init: Init, decay: bool) -> Range<usize> {
        self.lay.add(path, shape, init, decay)
    }
    fn dense(&mut self, path: Path, d_in: usize, d_out: usize, init: Init) -> Linear {
        Linear::out_in(self.add(path.at("weight"), &[d_out, d_in], init, true), d_in, d_out)
    }
    fn rmsnorm(&mut self, path: Path, dim: usize) -> Norm {
        Norm { w: self.add(path.at("weight"), &[dim], Init::Constant(1.0), false), b: None }
    }
    fn layernorm(&mut self, path: Path, dim: usize) -> Norm {
        Norm {
            w: self.add(path.at("weight"), &[dim], Init::Constant(1.0), false),
            b: Some(self.add(path.at("bias"), &[dim], Init::Constant(0.0), false)),
        }
    }
    /// GPT-2's Conv1D: `[in, out]` weight and a bias.
    fn conv1d_dense(&mut self, path: Path, d_in: usize, d_out: usize, init: Init) -> Linear {
        Linear {
            w: self.add(path.at("weight"), &[d_in, d_out], init, true),
            b: Some(self.add(path.at("bias"), &[d_out], Init::Constant(0.0), false)),
            d_in,
            d_out,
            layout: WeightLayout::InOut,
        }
    }

    /// q, k and v back to back (one `[(H + 2 Hkv) D, d]` GEMM) and the output projection.
    fn attention(&mut self, p: &Path, names: [&str; 4], rope: bool) -> Attention {
        let cfg = self.cfg;
        let (d, hd, kvd) = (cfg.d_model, cfg.n_heads * cfg.head_dim(), cfg.kv_heads() * cfg.head_dim());
        let std = self.std();
        let q = self.add(p.at(names[0]).at("weight"), &[hd, d], std, true);
        self.add(p.at(names[1]).at("weight"), &[kvd, d], std, true);
        let v = self.add(p.at(names[2]).at("weight"), &[kvd, d], std, true);
        let init = self.resid_std();
        Attention {
            qkv: Linear::out_in(q.start..v.end, d, hd + 2 * kvd),
            out: self.dense(p.at(names[3]), hd, d, init),
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.kv_heads(),
            head_dim: cfg.head_dim(),
            rope,
        }
    }

    /// `conv1d.weight` `[channels, 1, K]` and its bias, PyTorch's default init U(±1/sqrt(K)).
    fn causal_conv(&mut self, p: &Path, channels: usize) -> CausalConv {
        let k = self.cfg.ssm.conv_kernel;
        let bound = Init::Uniform { bound: 1.0 / (k as f32).sqrt() };
        let w = self.add(p.at("conv1d").at("weight"), &[channels, 1, k], bound, true);
        CausalConv { w, b: self.add(p.at("conv1d").at("bias"), &[channels], bound, false), channels }
    }

    fn mamba(&mut self, p: &Path) -> Mamba {
        let cfg = self.cfg;
        let (d, e, n, r) = (cfg.d_model, cfg.ssm_inner(), cfg.ssm_state(), cfg.ssm_rank());
        let std = self.std();
        let in_proj = self.dense(p.at("in_proj"), d, 2 * e, std);
        let conv = self.causal_conv(p, e);
        let x_proj = self.dense(p.at("x_proj"), e, r + 2 * n, std);
        let dt_init = Init::Uniform { bound: 1.0 / (r as f32).sqrt() };
        let dt_proj = self.dense(p.at("dt_proj"), r, e, dt_init);
        let s = &cfg.ssm;
        let step = Init::StepBias { min: s.time_step_min, max: s.time_step_max, floor: s.time_step_floor };
        let dt_bias = self.add(p.at("dt_proj").at("bias"), &[e], step, false);
        let a_log = self.add(p.at("A_log"), &[e, n], Init::LogIndex { period: n }, false);
        let d_skip = self.add(p.at("D"), &[e], Init::Constant(1.0), false);
        let init = self.resid_std();
        Mamba {
            in_x: in_proj.rows_of(0..e),
            in_z: in_proj.rows_of(e..2 * e),
            conv,
            x_dt: x_proj.rows_of(0..r),
            x_b: x_proj.rows_of(r..r + n),
            x_c: x_proj.rows_of(r + n..r + 2 * n),
            dt_proj,
            dt_bias,
            a_log,
            d: d_skip,
            out: self.dense(p.at("out_proj"), e, d, init),
            inner: e,
            state: n,
            rank: r,
            chunk: s.chunk_size,
        }
    }

    fn mamba2(&mut self, p: &Path) -> Mamba2 {
        let cfg = self.cfg;
        let (d, e, n) = (cfg.d_model, cfg.ssm_inner(), cfg.ssm_state());
        let (heads, groups) = (cfg.ssm_heads(), cfg.ssm.n_groups);
        let conv_dim = e + 2 * groups * n;
        let std = self.std();
        let in_proj = self.dense(p.at("in_proj"), d, e + conv_dim + heads, std);
        let conv = self.causal_conv(p, conv_dim);
        let s = &cfg.ssm;
        let step = Init::StepBias { min: s.time_step_min, max: s.time_step_max, floor: s.time_step_floor };
        let dt_bias = self.add(p.at("dt_bias"), &[heads], step, false);
        let a_log = self.add(p.at("A_log"), &[heads], Init::LogIndex { period: heads }, false);
        let d_skip = self.add(p.at("D"), &[heads], Init::Constant(1.0), false);
        let norm_w = self.add(p.at("norm").at("weight"), &[e], Init::Constant(1.0), false);
        let init = self.resid_std();
        Mamba2 {
            in_z: in_proj.rows_of(0..e),
            in_xbc: in_proj.rows_of(e..e + conv_dim),
            in_dt: in_proj.rows_of(e + conv_dim..e + conv_dim + heads),
            conv,
            dt_bias,
            a_log,
            d: d_skip,
            norm_w,
            out: self.dense(p.at("out_proj"), e, d, init),
            heads,
            head_dim: s.head_dim,
            groups,
            state: n,
            chunk: s.chunk_size,
            // transformers' Nemotron-H floors the step at time_step_min; its Mamba-2 does not.
            dt_min: if cfg.arch == Arch::Hybrid { s.time_step_min as f32 } else { 0.0 },
            norm_group: e / groups,
            eps: cfg.norm_eps,
        }
    }
}

impl Model {
    pub fn new(cfg: ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let mut lay = ParamLayout::default();
        let (d, v, f) = (cfg.d_model, cfg.vocab_size, cfg.ffn());
        let mut b = Builder { lay: &mut lay, cfg: &cfg };
        let std = b.std();
        let mut blocks = Vec::new();
        let mut block_layer = Vec::new();
        let (embed, positions, norm_f) = match cfg.arch {
            Arch::Llama => {
                let root = Path::new("model");
                let embed = b.add(root.at("embed_tokens").at("weight"), &[v, d], std, false);
                for l in 0..cfg.n_layers {
                    let p = root.at("layers").at(l);
                    let norm = b.rmsnorm(p.at("input_layernorm"), d);
                    let names = ["q_proj", "k_proj", "v_proj", "o_proj"];
                    let attn = b.attention(&p.at("self_attn"), names, true);
                    blocks.push(Block { norm, mixer: Mixer::Attention(attn) });
                    let norm = b.rmsnorm(p.at("post_attention_layernorm"), d);
                    let mlp = p.at("mlp");
                    let gate = b.dense(mlp.at("gate_proj"), d, f, std);
                    let up = b.dense(mlp.at("up_proj"), d, f, std);
                    let init = b.resid_std();
                    let down = b.dense(mlp.at("down_proj"), f, d, init);
                    let up = Linear::out_in(gate.w.start..up.w.end, d, 2 * f);
                    let mlp = Mlp { up, down, kind: MlpKind::SwiGlu, hidden: f };
                    blocks.push(Block { norm, mixer: Mixer::Mlp(mlp) });
                    block_layer.extend([l, l]);
                }
                (embed, None, b.rmsnorm(root.at("norm"), d))
            }
            Arch::Gpt2 => {
                let root = Path::new("transformer");
                let embed = b.add(root.at("wte").at("weight"), &[v, d], std, false);
                let positions = b.add(root.at("wpe").at("weight"), &[cfg.max_seq_len, d], std, false);
                for l in 0..cfg.n_layers {
                    let p = root.at("h").at(l);
                    let norm = b.layernorm(p.at("ln_1"), d);
                    let qkv = b.conv1d_dense(p.at("attn").at("c_attn"), d, 3 * d, std);
                    let init = b.resid_std();
                    let out = b.conv1d_dense(p.at("attn").at("c_proj"), d, d, init);
                    let (n_heads, head_dim) = (cfg.n_heads, cfg.head_dim());
                    let attn = Attention { qkv, out, n_heads, n_kv_heads: n_heads, head_dim, rope: false };
                    blocks.push(Block { norm, mixer: Mixer::Attention(attn) });
                    let norm = b.layernorm(p.at("ln_2"), d);
                    let up = b.conv1d_dense(p.at("mlp").at("c_fc"), d, f, std);
                    let down = b.conv1d_dense(p.at("mlp").at("c_proj"), f, d, init);
                    let mlp = Mlp { up, down, kind: MlpKind::Plain(Activation::Gelu), hidden: f };
                    blocks.push(Block { norm, mixer: Mixer::Mlp(mlp) });
                    block_layer.extend([l, l]);
                }
                (embed, Some(positions), b.layernorm(root.at("ln_f"), d))
            }
            Arch::Mamba | Arch::Mamba2 | Arch::Hybrid => {
                let root = Path::new("backbone");
                let embed = b.add(root.at("embeddings").at("weight"), &[v, d], std, false);
                for (l, kind) in cfg.layer_kinds().into_iter().enumerate() {
                    let p = root.at("layers").at(l);
                    let norm = b.rmsnorm(p.at("norm"), d);
                    let m = p.at("mixer");
                    let mixer = match (kind, cfg.arch) {
                        (LayerKind::Mamba, Arch::Mamba) => Mixer::Mamba(b.mamba(&m)),
                        (LayerKind::Mamba, _) => Mixer::Mamba2(b.mamba2(&m)),
                        (LayerKind::Attention, _) => {
                            Mixer::Attention(b.attention(&m, ["q_proj", "k_proj", "v_proj", "o_proj"], false))
                        }
                        (LayerKind::Mlp, _) => {
                            let up = b.dense(m.at("up_proj"), d, f, std);
                            let init = b.resid_std();
                            let down = b.dense(m.at("down_proj"), f, d, init);
                            Mixer::Mlp(Mlp { up, down, kind: MlpKind::Plain(Activation::Relu2), hidden: f })
                        }
                    };
                    blocks.push(Block { norm, mixer });
                    block_layer.push(l);
                }
                (embed, None, b.rmsnorm(root.at("norm_f"), d))
            }
        };
        let head_w =
            if cfg.tied() { embed.clone() } else { b.add(Path::new("lm_head").at("weight"), &[v, d], std, true) };
        let head = Linear::out_in(head_w, d, v);
        Ok(Self { cfg, layout: lay, embed, positions, blocks, block_layer, norm_f, head })
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

    /// Training FLOPs per token (forward and backward): 6 N for the matrix multiplies (PaLM
    /// appendix B), 12 d T per attention block for the scores and their weighted sum, and the
    /// scans counted as computed: Mamba-1 about 9 FLOPs per (channel, state) forward; the SSD
    /// per head Q (N + P) for the intra-chunk pairs (Q = chunk, or T if shorter) and 4 P N for
    /// the state; backward twice the forward.
    pub fn flops_per_token(&self, seq: usize) -> u64 {
        let mixers: u64 = self
            .blocks
            .iter()
            .map(|b| match &b.mixer {
                Mixer::Attention(a) => 12 * (a.n_heads * a.head_dim * seq) as u64,
                Mixer::Mlp(_) => 0,
                Mixer::Mamba(m) => 3 * 9 * (m.inner * m.state) as u64,
                Mixer::Mamba2(m) => {
                    let q = m.chunk.min(seq);
                    3 * (m.heads * (q * (m.state + m.head_dim) + 4 * m.head_dim * m.state)) as u64
                }
            })
            .sum();
        6 * self.num_flop_params() as u64 + mixers
    }

    /// Bytes of activation memory a [`Workspace`] for this micro-batch shape holds (f32).
    pub fn activation_bytes(&self, batch: usize, seq: usize, recompute_every: usize) -> u64 {
        let (rows, d, v) = ((batch * seq) as u64, self.cfg.d_model as u64, self.cfg.vocab_size as u64);
        let layernorm = self.norm_f.is_layernorm();
        let block = |b: &Block| norm_floats(batch * seq, d as usize, layernorm) + b.mixer.act_floats(batch, seq);
        let saved: u64 = (0..self.blocks.len())
            .filter(|&i| !self.recomputed(i, recompute_every))
            .map(|i| block(&self.blocks[i]))
            .sum();
        let shared: u64 = if recompute_every > 0 { self.first_of_each_kind().map(block).sum() } else { 0 };
        let grads: u64 = self.first_of_each_kind().map(|b| b.mixer.grad_floats(batch, seq)).sum();
        let residual = (self.blocks.len() as u64 + 1) * rows * d;
        let head = norm_floats(batch * seq, d as usize, layernorm) + rows * (v + 1);
        4 * (saved + shared + grads + residual + head + 2 * rows * d)
    }

    /// One block of each mixer kind present (blocks of a kind share their dimensions).
    fn first_of_each_kind(&self) -> impl Iterator<Item = &Block> {
        (0..KINDS).filter_map(|k| self.blocks.iter().find(|b| b.mixer.kind() == k))
    }

    /// Whether block `i` keeps no activations and is recomputed in backward, when every
    /// `every`-th layer is (0: none).
    fn recomputed(&self, i: usize, every: usize) -> bool {
        every > 0 && self.block_layer[i].is_multiple_of(every)
    }

    /// Whether [`Model::forward_cached`] works: attention caches keys and values, but a Mamba
    /// mixer's recurrent state is not cached yet.
    pub fn supports_kv_cache(&self) -> bool {
        self.blocks.iter().all(|b| !matches!(b.mixer, Mixer::Mamba(_) | Mixer::Mamba2(_)))
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
        assert!(self.supports_kv_cache(), "forward_cached on a model with Mamba mixers");
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
                // Without rotary positions the table is empty: an empty view, never read.
                let len = be.len(rope);
                let table = be.view(&*rope, (pos * self.cfg.head_dim()).min(len)..len);
                (Some((k, v, *max_seq)), table)
            }
            None => (None, be.all(&ws.rope)),
        };
        for i in 0..self.blocks.len() {
            let (done, next) = ws.res.split_at_mut(i + 1);
            // A recomputed block runs in the shared scratch of its kind; its input stays in `res`.
            let kind = self.blocks[i].mixer.kind();
            let a = match ws.acts[i].as_mut() {
                Some(a) => a,
                None => ws.shared[kind].as_mut().expect("a scratch for recomputed blocks"),
            };
            let slot = kv_cache.as_mut().map(|(k, v, max_seq)| CacheSlot {
                k: &mut k[i],
                v: &mut v[i],
                pos,
                max_seq: *max_seq,
            });
            self.block_forward(be, params, i, &done[i], a, &mut next[0], rope, slot, (ws.batch, ws.seq));
        }

        let last = &ws.res[self.blocks.len()];
        self.norm_f.forward(be, params, be.all(last), &mut ws.norm_f, d, eps);
        self.head.forward(be, params, be.all(&ws.norm_f.out), &mut ws.logits, rows);
    }

    /// Block `i` on input `x`: saves what backward needs in `a` and writes its output,
    /// `x + mixer(norm(x))`, to `x_next`.
    #[allow(clippy::too_many_arguments)]
    fn block_forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        i: usize,
        x: &B::Buf,
        a: &mut BlockActs<B>,
        x_next: &mut B::Buf,
        rope: B::Ref<'_>,
        cache: Option<CacheSlot<'_, B>>,
        dims: (usize, usize),
    ) {
        let (block, d, eps) = (&self.blocks[i], self.cfg.d_model, self.cfg.norm_eps);
        block.norm.forward(be, params, be.all(x), &mut a.norm, d, eps);
        let h = be.all(&a.norm.out);
        match (&block.mixer, &mut a.mixer) {
            (Mixer::Attention(m), MixerActs::Attention(a)) => m.forward(be, params, h, a, x_next, rope, cache, dims),
            (Mixer::Mlp(m), MixerActs::Mlp(a)) => m.forward(be, params, h, a, x_next, dims.0 * dims.1),
            (Mixer::Mamba(m), MixerActs::Mamba(a)) => m.forward(be, params, h, a, x_next, dims),
            (Mixer::Mamba2(m), MixerActs::Mamba2(a)) => m.forward(be, params, h, a, x_next, dims),
            _ => unreachable!("activations of another mixer kind"),
        }
        be.add_assign(be.all_mut(x_next), be.all(x));
    }

    /// Cross-entropy of `ws.logits` against `targets`; returns the SUM of the per-token
    /// losses. With `grad_scale`, the logits are replaced by `grad_scale * dloss/dlogits`,
    /// ready for [`Model::backward`].
    pub fn loss<B: Backend>(&self, be: &B, ws: &mut Workspace<B>, targets: &B::Ids, grad_scale: Option<f32>) -> f64 {
        let vocab = self.cfg.vocab_size;
        be.cross_entropy(be.all_mut(&mut ws.logits), targets, be.all_mut(&mut ws.losses), vocab, grad_scale);
        be.sum(be.all(&ws.losses))
    }

    /// Backpropagates the logit gradients left in `ws.logits` by [`Model::loss`],
    /// accumulating into `grads` (same layout as `params`).
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        ws: &mut Workspace<B>,
        ids: &B::Ids,
    ) {
        let (d, rows, dims) = (self.cfg.d_model, ws.rows, (ws.batch, ws.seq));
        let s = &mut ws.scratch;

        let dnorm = Dx::Write(&mut s.dnorm);
        self.head.backward(be, params, grads, be.all(&ws.norm_f.out), be.all(&ws.logits), dnorm, rows);
        be.fill(be.all_mut(&mut s.dres), 0.0);
        let last = &ws.res[self.blocks.len()];
        self.norm_f.backward(be, params, grads, be.all(&s.dnorm), be.all(last), &ws.norm_f, &mut s.dres, d);

        let rope = be.all(&ws.rope);
        for i in (0..self.blocks.len()).rev() {
            let block = &self.blocks[i];
            let a: &BlockActs<B> = match &ws.acts[i] {
                Some(a) => a,
                None => {
                    // Activation checkpointing: run the block again from its saved input. The
                    // same ops on the same bits give the same activations; its output goes to
                    // scratch (`dnorm` is free until this block's mixer backward writes it).
                    let shared = ws.shared[block.mixer.kind()].as_mut().expect("a scratch for recomputed blocks");
                    self.block_forward(be, params, i, &ws.res[i], shared, &mut s.dnorm, rope, None, dims);
                    shared
                }
            };
            // dres holds dL/d(x_next) = dL/dx along the skip path; the norm adds the mixer's branch.
            let (h, dout) = (be.all(&a.norm.out), be.all(&s.dres));
            let dh = &mut s.dnorm;
            match (&block.mixer, &a.mixer) {
                (Mixer::Attention(m), MixerActs::Attention(a)) => {
                    let g = s.attn.as_mut().expect("attention scratch");
                    m.backward(be, params, grads, h, a, dout, dh, g, rope, dims);
                }
                (Mixer::Mlp(m), MixerActs::Mlp(a)) => {
                    let g = s.mlp.as_mut().expect("MLP scratch");
                    m.backward(be, params, grads, h, a, dout, dh, g, rows);
                }
                (Mixer::Mamba(m), MixerActs::Mamba(a)) => {
                    let g = s.mamba.as_mut().expect("Mamba scratch");
                    m.backward(be, params, grads, h, a, dout, dh, g, dims);
                }
                (Mixer::Mamba2(m), MixerActs::Mamba2(a)) => {
                    let g = s.mamba2.as_mut().expect("Mamba-2 scratch");
                    m.backward(be, params, grads, h, a, dout, dh, g, dims);
                }
                _ => unreachable!("activations of another mixer kind"),
            }
            block.norm.backward(be, params, grads, be.all(&s.dnorm), be.all(&ws.res[i]), &a.norm, &mut s.dres, d);
        }

        be.embedding_backward(ids, be.all(&s.dres), be.view_mut(grads, self.embed.clone()), d);
        if let Some(pos) = &self.positions {
            be.position_embedding_backward(be.all(&s.dres), be.view_mut(grads, pos.clone()), ws.seq, d);
        }
    }

    /// The rotary table for `seq` positions, or an empty one if no block rotates.
    fn rope_table(&self, seq: usize) -> Vec<f32> {
        let rotates = self.blocks.iter().any(|b| matches!(&b.mixer, Mixer::Attention(a) if a.rope));
        if rotates { rope_table(seq, self.cfg.head_dim(), self.cfg.rope_theta) } else { Vec::new() }
    }
}

impl Mixer {
    fn acts<B: Backend>(&self, be: &B, batch: usize, seq: usize) -> MixerActs<B> {
        match self {
            Mixer::Attention(m) => MixerActs::Attention(m.acts(be, batch, seq)),
            Mixer::Mlp(m) => MixerActs::Mlp(m.acts(be, batch * seq)),
            Mixer::Mamba(m) => MixerActs::Mamba(m.acts(be, batch, seq)),
            Mixer::Mamba2(m) => MixerActs::Mamba2(m.acts(be, batch, seq)),
        }
    }

    fn act_floats(&self, batch: usize, seq: usize) -> u64 {
        match self {
            Mixer::Attention(m) => m.act_floats(batch, seq),
            Mixer::Mlp(m) => m.act_floats(batch * seq),
            Mixer::Mamba(m) => m.act_floats(batch, seq),
            Mixer::Mamba2(m) => m.act_floats(batch, seq),
        }
    }

    /// Floats of this kind's gradient scratch (see [`Scratch`]).
    fn grad_floats(&self, batch: usize, seq: usize) -> u64 {
        match self {
            Mixer::Attention(m) => m.grad_floats(batch, seq),
            // The MLP's gradient scratch mirrors its saved activations.
            Mixer::Mlp(m) => m.act_floats(batch * seq),
            Mixer::Mamba(m) => m.grad_floats(batch * seq),
            Mixer::Mamba2(m) => m.grad_floats(batch * seq),
        }
    }
}

/// Every attention block's keys and values of the tokens seen so far, for incremental
/// decoding.
pub struct KvCache<B: Backend> {
    /// Per block (empty for blocks without attention).
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
    /// Rotary table for all `max_seq` positions (empty without rotary positions).
    rope: B::Buf,
    pub batch: usize,
    pub max_seq: usize,
    /// Tokens already in the cache, per sequence.
    pub len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(be: &B, model: &Model, batch: usize, max_seq: usize) -> Self {
        let kv_len = |b: &Block| match &b.mixer {
            Mixer::Attention(a) => batch * max_seq * a.n_kv_heads * a.head_dim,
            _ => 0,
        };
        Self {
            k: model.blocks.iter().map(|b| be.zeros(kv_len(b))).collect(),
            v: model.blocks.iter().map(|b| be.zeros(kv_len(b))).collect(),
            rope: be.upload(&model.rope_table(max_seq)),
            batch,
            max_seq,
            len: 0,
        }
    }
}

enum MixerActs<B: Backend> {
    Attention(AttnActs<B>),
    Mlp(MlpActs<B>),
    Mamba(MambaActs<B>),
    Mamba2(Mamba2Acts<B>),
}

/// What one block's forward saves for its backward.
struct BlockActs<B: Backend> {
    norm: NormActs<B>,
    mixer: MixerActs<B>,
}

/// Gradients of activations, reused by every block in turn; one set per mixer kind present.
struct Scratch<B: Backend> {
    dres: B::Buf,
    dnorm: B::Buf,
    attn: Option<AttnGrads<B>>,
    mlp: Option<MlpGrads<B>>,
    mamba: Option<MambaGrads<B>>,
    mamba2: Option<Mamba2Grads<B>>,
}

/// Every activation buffer of one micro-batch shape, allocated once and reused each step.
pub struct Workspace<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    rows: usize,
    /// The residual stream entering each block, and leaving the last (`blocks + 1`).
    res: Vec<B::Buf>,
    /// Saved activations per block; None for a block recomputed in backward.
    acts: Vec<Option<BlockActs<B>>>,
    /// Per mixer kind, the one set of activation buffers that recomputed blocks share.
    shared: Vec<Option<BlockActs<B>>>,
    norm_f: NormActs<B>,
    /// Logits after forward; logit gradients after [`Model::loss`] with a grad scale.
    pub logits: B::Buf,
    losses: B::Buf,
    rope: B::Buf,
    scratch: Scratch<B>,
}

impl<B: Backend> Workspace<B> {
    pub fn new(be: &B, model: &Model, batch: usize, seq: usize) -> Result<Self> {
        Self::with_recompute(be, model, batch, seq, 0)
    }

    /// A workspace that keeps no activations for the blocks of every `recompute_every`-th
    /// layer (0: none), recomputing them in backward from the block's input: less memory, one
    /// more forward of those blocks, identical results.
    pub fn with_recompute(be: &B, model: &Model, batch: usize, seq: usize, recompute_every: usize) -> Result<Self> {
        let cfg = &model.cfg;
        if seq == 0 || seq > cfg.max_seq_len {
            return Err(ondol_core::Error::config(
                "training.seq_len",
                format!("{seq} must be between 1 and model.max_seq_len = {}", cfg.max_seq_len),
            ));
        }
        let (rows, d) = (batch * seq, cfg.d_model);
        let layernorm = model.norm_f.is_layernorm();
        let block_acts =
            |b: &Block| BlockActs { norm: NormActs::new(be, rows, d, layernorm), mixer: b.mixer.acts(be, batch, seq) };
        let blocks = &model.blocks;
        let recomputed_kind =
            |k: usize| (0..blocks.len()).any(|i| blocks[i].mixer.kind() == k && model.recomputed(i, recompute_every));
        // Per kind present: gradient scratch, and the shared activations if any block recomputes.
        let mut shared: Vec<Option<BlockActs<B>>> = (0..KINDS).map(|_| None).collect();
        let mut scratch = Scratch {
            dres: be.zeros(rows * d),
            dnorm: be.zeros(rows * d),
            attn: None,
            mlp: None,
            mamba: None,
            mamba2: None,
        };
        for block in model.first_of_each_kind() {
            let kind = block.mixer.kind();
            if recomputed_kind(kind) {
                shared[kind] = Some(block_acts(block));
            }
            match &block.mixer {
                Mixer::Attention(m) => scratch.attn = Some(m.grads(be, batch, seq)),
                Mixer::Mlp(m) => scratch.mlp = Some(m.grads(be, rows)),
                Mixer::Mamba(m) => scratch.mamba = Some(m.grads(be, rows)),
                Mixer::Mamba2(m) => scratch.mamba2 = Some(m.grads(be, rows)),
            }
        }
        Ok(Self {
            batch,
            seq,
            rows,
            res: (0..=blocks.len()).map(|_| be.zeros(rows * d)).collect(),
            acts: (0..blocks.len())
                .map(|i| (!model.recomputed(i, recompute_every)).then(|| block_acts(&blocks[i])))
                .collect(),
            shared,
            norm_f: NormActs::new(be, rows, d, layernorm),
            logits: be.zeros(rows * cfg.vocab_size),
            losses: be.zeros(rows),
            rope: be.upload(&model.rope_table(seq)),
            scratch,
        })
    }
}
