//! Decoder-only language models as a stack of residual blocks, pre-norm unless a Llama's
//! `block_norms` puts its norms after the mixers (`x + norm(mixer(x))`, EXAONE 4) or on both
//! sides (`x + norm(mixer(norm(x)))`, Peri-LN):
//!
//! ```text
//! x = embed(ids) (+ learned positions, GPT-2)
//! for each block:  x = x + mixer(norm(x))      mixer: attention | MLP | Mamba-1 | Mamba-2
//! logits = head(norm_f(x))
//! ```
//! A Llama or GPT-2 layer is two blocks (attention, then MLP); a Mamba layer is one; a
//! hybrid's `pattern` names each layer's mixer (Nemotron-H). Llama: RMSNorm, rotary
//! positions, grouped-query heads, SwiGLU, no biases. Gemma 3: Llama's layout with norms on
//! both sides, q and k norms, GeGLU, the embedding scaled by sqrt(d_model) (its files store the
//! norms' scales minus one). GPT-2: LayerNorm, learned positions, GELU, biases, Conv1D weights
//! stored `[in, out]`. Mamba: RMSNorm, tied head.
//!
//! Forward saves the residual stream entering every block and what each block's backward
//! needs; backward walks the blocks in reverse, carrying the residual-stream gradient `dres`,
//! and accumulates into the flat gradient buffer. The model knows nothing of parallelism or of
//! which device it runs on.

// A shard is a list of pieces of its global tensor, most often one.
#![allow(clippy::single_range_in_vec_init)]
use crate::Elems;
use crate::attention::{Attention, AttnActs, AttnGrads, KvSlot, Positions};
use crate::config::{Arch, BlockNorms, LayerAttention, LayerKind, ModelConfig};
use crate::layers::{
    CausalConv, Dx, Linear, Norm, NormActs, PostNormActs, RecurrentState, WeightLayout, norm_elems, post_norm_elems,
};
use crate::mamba::{Mamba, MambaActs, MambaGrads};
use crate::mamba2::{Mamba2, Mamba2Acts, Mamba2Grads};
use crate::mlp::{Mlp, MlpActs, MlpGrads, MlpKind};
use crate::params::{Init, ParamLayout, Path, Placement};
use crate::part::{Alone, Part, TensorParallel};
use ondol_core::Result;
use ondol_core::backend::{Activation, Backend, LogitColumns, combine_ce_stats, rope_table_of, window_first_keys};
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

/// One residual block: `x + post(mixer(pre(x)))`, with a norm before the mixer, after it,
/// or both (see [`crate::BlockNorms`]).
#[derive(Clone, Debug)]
struct Block {
    norm: Option<Norm>,
    mixer: Mixer,
    post: Option<Norm>,
}

/// A language model, or the part of one that a rank holds: its config, its parameter layout,
/// and where each block's tensors sit in the flat buffer.
#[derive(Clone, Debug)]
pub struct Model {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    pub part: Part,
    /// The token ids the embedding and head rows of this part hold.
    vocab: Range<usize>,
    /// The token embedding (first stage only).
    embed: Option<Range<usize>>,
    positions: Option<Range<usize>>,
    blocks: Vec<Block>,
    /// The layer each block belongs to (activation checkpointing counts layers).
    block_layer: Vec<usize>,
    /// The flat range of each block's parameters (blocks are laid out one after another,
    /// between the embedding and the head).
    block_params: Vec<Range<usize>>,
    /// The final norm and the output layer (last stage only).
    head: Option<Head>,
}

#[derive(Clone, Debug)]
struct Head {
    norm_f: Norm,
    out: Linear,
}

/// Registers a part's parameters (shards or replicas of the global tensors) and hands out
/// their ranges.
struct Builder<'a> {
    lay: &'a mut ParamLayout,
    cfg: &'a ModelConfig,
    part: &'a Part,
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
    /// A tensor every tensor-parallel shard holds whole (norms, learned positions, the biases
    /// of row-parallel layers); the first shard's copy is the primary.
    fn add(&mut self, path: Path, shape: &[usize], init: Init, decay: bool) -> Range<usize> {
        let place = Placement { primary: self.part.tp_rank == 0, ..Placement::whole(shape) };
        self.lay.add_placed(path, place, init, decay)
    }
    /// The `pieces` along `axis` of the global tensor of `shape`.
    fn shard(
        &mut self,
        path: Path,
        shape: &[usize],
        (axis, pieces): (usize, Vec<Range<usize>>),
        init: Init,
        decay: bool,
    ) -> Range<usize> {
        let place = Placement { global_shape: shape.to_vec(), axis, pieces, ..Placement::whole(shape) };
        self.lay.add_placed(path, place, init, decay)
    }
    /// An `nn.Linear` `[d_out, d_in]` whose output rows `rows` this shard holds (column-parallel;
    /// all rows when not split).
    fn column(&mut self, path: Path, d_in: usize, d_out: usize, rows: Vec<Range<usize>>, init: Init) -> Linear {
        let w = self.shard(path.at("weight"), &[d_out, d_in], (0, rows), init, true);
        let local = w.len() / d_in;
        Linear::out_in(w, d_in, local)
    }
    /// An `nn.Linear` `[d_out, d_in]` whose input columns `cols` this shard holds (row-parallel).
    fn row(&mut self, path: Path, d_in: usize, d_out: usize, cols: Range<usize>, init: Init) -> Linear {
        let w = self.shard(path.at("weight"), &[d_out, d_in], (1, vec![cols.clone()]), init, true);
        Linear::out_in(w, cols.len(), d_out)
    }
    /// A norm's weight or bias: replicated, and under sequence parallelism each shard sees only
    /// its slice of the tokens, so its gradient is partial (summed over the shards).
    fn norm_param(&mut self, path: Path, dim: usize, init: Init) -> Range<usize> {
        let place = Placement {
            primary: self.part.tp_rank == 0,
            partial_grad: self.part.sequence_parallel,
            ..Placement::whole(&[dim])
        };
        self.lay.add_placed(path, place, init, false)
    }
    fn rmsnorm(&mut self, path: Path, dim: usize) -> Norm {
        let w = self.norm_param(path.at("weight"), dim, Init::Constant(1.0));
        Norm { w: self.norm_scale(w), b: None }
    }
    /// An RMSNorm's weight (`range`), which Gemma 3's files store minus one.
    fn norm_scale(&mut self, range: Range<usize>) -> Range<usize> {
        if self.cfg.stores_norms_minus_one() {
            self.lay.store_minus_one(&range);
        }
        range
    }
    fn layernorm(&mut self, path: Path, dim: usize) -> Norm {
        Norm {
            w: self.norm_param(path.at("weight"), dim, Init::Constant(1.0)),
            b: Some(self.norm_param(path.at("bias"), dim, Init::Constant(0.0))),
        }
    }
    /// GPT-2's Conv1D (`[in, out]` weight and a bias) whose output columns `cols` this shard
    /// holds (column-parallel).
    fn conv1d_column(&mut self, path: Path, d_in: usize, d_out: usize, cols: Vec<Range<usize>>, init: Init) -> Linear {
        let w = self.shard(path.at("weight"), &[d_in, d_out], (1, cols.clone()), init, true);
        let b = self.shard(path.at("bias"), &[d_out], (0, cols), Init::Constant(0.0), false);
        Linear { d_out: b.len(), w, b: Some(b), d_in, layout: WeightLayout::InOut, adds_bias: true }
    }
    /// GPT-2's Conv1D whose input rows `rows` this shard holds (row-parallel): the bias is
    /// replicated and added by the first shard only.
    fn conv1d_row(&mut self, path: Path, d_in: usize, d_out: usize, rows: Range<usize>, init: Init) -> Linear {
        let w = self.shard(path.at("weight"), &[d_in, d_out], (0, vec![rows.clone()]), init, true);
        let b = self.add(path.at("bias"), &[d_out], Init::Constant(0.0), false);
        let adds_bias = self.part.tp_rank == 0;
        Linear { w, b: Some(b), d_in: rows.len(), d_out, layout: WeightLayout::InOut, adds_bias }
    }

    /// This shard's query heads and key/value heads (as head ranges), and whether its kv heads
    /// are shared with other shards (fewer kv heads than shards).
    fn heads(&self) -> (Range<usize>, Range<usize>, bool) {
        let (cfg, part) = (self.cfg, self.part);
        let (q, kv) = (part.even(cfg.n_heads), cfg.kv_heads());
        if kv.is_multiple_of(part.tp) {
            (q, part.even(kv), false)
        } else {
            let head = part.tp_rank / (part.tp / kv);
            (q, head..head + 1, true)
        }
    }

    /// q, k and v back to back (one `[(H + 2 Hkv) D, d]` GEMM, with their biases back to back
    /// where the model has them) and the output projection; this shard's heads of each.
    fn attention(&mut self, p: &Path, names: [&str; 4], kind: LayerAttention) -> Attention {
        let cfg = self.cfg;
        let (d, dh) = (cfg.d_model, cfg.head_dim());
        let (q_heads, kv_heads, shared) = self.heads();
        let span = |r: &Range<usize>| r.start * dh..r.end * dh;
        let std = self.std();
        let q = self.shard(p.at(names[0]).at("weight"), &[cfg.n_heads * dh, d], (0, vec![span(&q_heads)]), std, true);
        let kv_shape = [cfg.kv_heads() * dh, d];
        let kv_place = Placement {
            global_shape: kv_shape.to_vec(),
            axis: 0,
            pieces: vec![span(&kv_heads)],
            // Shards sharing a kv head each hold part of its gradient; the first one counts.
            primary: !shared || self.part.tp_rank.is_multiple_of(self.part.tp / cfg.kv_heads()),
            partial_grad: shared,
            pad: 0,
        };
        self.lay.add_placed(p.at(names[1]).at("weight"), kv_place.clone(), std, true);
        let v = self.lay.add_placed(p.at(names[2]).at("weight"), kv_place.clone(), std, true);
        let (hd, kvd) = (q_heads.len() * dh, kv_heads.len() * dh);
        let mut qkv = Linear::out_in(q.start..v.end, d, hd + 2 * kvd);
        if cfg.qkv_bias {
            let zero = Init::Constant(0.0);
            let q_bias =
                self.shard(p.at(names[0]).at("bias"), &[cfg.n_heads * dh], (0, vec![span(&q_heads)]), zero, false);
            let kv_bias = Placement { global_shape: vec![cfg.kv_heads() * dh], ..kv_place };
            self.lay.add_placed(p.at(names[1]).at("bias"), kv_bias.clone(), zero, false);
            let v_bias = self.lay.add_placed(p.at(names[2]).at("bias"), kv_bias, zero, false);
            qkv.b = Some(q_bias.start..v_bias.end);
        }
        // q_norm and k_norm back to back; each shard's heads give part of their gradients.
        let qk_norm = cfg.has_qk_norm().then(|| {
            let place = Placement {
                primary: self.part.tp_rank == 0,
                partial_grad: self.part.tp > 1,
                ..Placement::whole(&[dh])
            };
            let one = Init::Constant(1.0);
            let q = self.lay.add_placed(p.at("q_norm").at("weight"), place.clone(), one, false);
            let q = self.norm_scale(q);
            let k = self.lay.add_placed(p.at("k_norm").at("weight"), place, one, false);
            let k = self.norm_scale(k);
            (q.start..k.end, cfg.norm_eps)
        });
        let init = self.resid_std();
        Attention {
            qkv,
            out: self.row(p.at(names[3]), cfg.n_heads * dh, d, span(&q_heads), init),
            n_heads: q_heads.len(),
            n_kv_heads: kv_heads.len(),
            head_dim: dh,
            rope: kind.rope,
            window: kind.window,
            qk_norm,
            q_scale: cfg.q_scale(),
        }
    }

    /// GPT-2's attention: one `[d, 3d]` c_attn (this shard's q, k and v columns) and c_proj.
    fn gpt2_attention(&mut self, p: &Path) -> Attention {
        let cfg = self.cfg;
        let (d, dh) = (cfg.d_model, cfg.head_dim());
        let heads = self.part.even(cfg.n_heads);
        let cols = heads.start * dh..heads.end * dh;
        let qkv_cols = (0..3).map(|i| i * d + cols.start..i * d + cols.end).collect();
        let (std, init) = (self.std(), self.resid_std());
        let qkv = self.conv1d_column(p.at("c_attn"), d, 3 * d, qkv_cols, std);
        let out = self.conv1d_row(p.at("c_proj"), d, d, cols, init);
        Attention {
            qkv,
            out,
            n_heads: heads.len(),
            n_kv_heads: heads.len(),
            head_dim: dh,
            rope: false,
            window: None,
            qk_norm: None,
            q_scale: 1.0,
        }
    }

    /// `conv1d.weight` `[channels, 1, K]` and its bias over this shard's `pieces` of the
    /// channels, PyTorch's default init U(±1/sqrt(K)).
    fn causal_conv(&mut self, p: &Path, channels: usize, pieces: Vec<Range<usize>>) -> CausalConv {
        let k = self.cfg.ssm.conv_kernel;
        let bound = Init::Uniform { bound: 1.0 / (k as f32).sqrt() };
        let w = self.shard(p.at("conv1d").at("weight"), &[channels, 1, k], (0, pieces.clone()), bound, true);
        let b = self.shard(p.at("conv1d").at("bias"), &[channels], (0, pieces), bound, false);
        CausalConv { channels: b.len(), w, b }
    }

    /// Mamba-1, split by channels: this shard's x and z rows of in_proj, its channels of the
    /// convolution, of x_proj's input columns (its dt, B and C are partial sums, summed over the
    /// shards), of dt_proj's rows and of the per-channel parameters, and out_proj's input columns.
    fn mamba(&mut self, p: &Path) -> Mamba {
        let (cfg, part) = (self.cfg, self.part);
        let (d, e, n, r) = (cfg.d_model, cfg.ssm_inner(), cfg.ssm_state(), cfg.ssm_rank());
        let mine = part.even(e);
        let std = self.std();
        let in_proj = self.column(p.at("in_proj"), d, 2 * e, vec![mine.clone(), mine.start + e..mine.end + e], std);
        let conv = self.causal_conv(p, e, vec![mine.clone()]);
        let x_proj = self.row(p.at("x_proj"), e, r + 2 * n, mine.clone(), std);
        let dt_init = Init::Uniform { bound: 1.0 / (r as f32).sqrt() };
        let dt_proj = self.column(p.at("dt_proj"), r, e, vec![mine.clone()], dt_init);
        let s = &cfg.ssm;
        let step = Init::StepBias { min: s.time_step_min, max: s.time_step_max, floor: s.time_step_floor };
        let per_channel = || (0, vec![mine.clone()]);
        let dt_bias = self.shard(p.at("dt_proj").at("bias"), &[e], per_channel(), step, false);
        let a_log = self.shard(p.at("A_log"), &[e, n], per_channel(), Init::LogIndex { period: n }, false);
        let d_skip = self.shard(p.at("D"), &[e], per_channel(), Init::Constant(1.0), false);
        let init = self.resid_std();
        let el = mine.len();
        Mamba {
            in_x: in_proj.rows_of(0..el),
            in_z: in_proj.rows_of(el..2 * el),
            conv,
            x_dt: x_proj.rows_of(0..r),
            x_b: x_proj.rows_of(r..r + n),
            x_c: x_proj.rows_of(r + n..r + 2 * n),
            dt_proj,
            dt_bias,
            a_log,
            d: d_skip,
            out: self.row(p.at("out_proj"), e, d, mine, init),
            inner: el,
            state: n,
            rank: r,
            chunk: s.chunk_size,
            split: part.tp > 1,
        }
    }

    /// Mamba-2, split by heads and B/C groups: this shard's z, x, B, C and dt rows of in_proj,
    /// its channels of the convolution, its heads' parameters and out_proj's input columns.
    fn mamba2(&mut self, p: &Path) -> Mamba2 {
        let (cfg, part) = (self.cfg, self.part);
        let (d, e, n) = (cfg.d_model, cfg.ssm_inner(), cfg.ssm_state());
        let (heads, groups) = (cfg.ssm_heads(), cfg.ssm.n_groups);
        let s = &cfg.ssm;
        let (my_heads, my_groups) = (part.even(heads), part.even(groups));
        let inner = my_heads.start * s.head_dim..my_heads.end * s.head_dim;
        let gn = my_groups.start * n..my_groups.end * n;
        let shift = |r: &Range<usize>, by: usize| r.start + by..r.end + by;
        let conv_dim = e + 2 * groups * n;
        let std = self.std();
        let rows = vec![
            inner.clone(),
            shift(&inner, e),
            shift(&gn, 2 * e),
            shift(&gn, 2 * e + groups * n),
            shift(&my_heads, e + conv_dim),
        ];
        let in_proj = self.column(p.at("in_proj"), d, e + conv_dim + heads, rows, std);
        let conv = self.causal_conv(p, conv_dim, vec![inner.clone(), shift(&gn, e), shift(&gn, e + groups * n)]);
        let step = Init::StepBias { min: s.time_step_min, max: s.time_step_max, floor: s.time_step_floor };
        let per_head = |r: &Range<usize>| (0, vec![r.clone()]);
        let dt_bias = self.shard(p.at("dt_bias"), &[heads], per_head(&my_heads), step, false);
        let a_log = self.shard(p.at("A_log"), &[heads], per_head(&my_heads), Init::LogIndex { period: heads }, false);
        let d_skip = self.shard(p.at("D"), &[heads], per_head(&my_heads), Init::Constant(1.0), false);
        let norm_w = self.shard(p.at("norm").at("weight"), &[e], (0, vec![inner.clone()]), Init::Constant(1.0), false);
        let init = self.resid_std();
        let (el, conv_l, hl) = (inner.len(), conv.channels, my_heads.len());
        Mamba2 {
            in_z: in_proj.rows_of(0..el),
            in_xbc: in_proj.rows_of(el..el + conv_l),
            in_dt: in_proj.rows_of(el + conv_l..el + conv_l + hl),
            conv,
            dt_bias,
            a_log,
            d: d_skip,
            norm_w,
            out: self.row(p.at("out_proj"), e, d, inner, init),
            heads: hl,
            head_dim: s.head_dim,
            groups: my_groups.len(),
            state: n,
            chunk: s.chunk_size,
            norm_group: e / groups,
            eps: cfg.norm_eps,
        }
    }

    /// This shard's hidden units of an MLP: Llama's gate and up (fused) and down, GPT-2's c_fc
    /// and c_proj, Nemotron-H's up and down.
    fn mlp(&mut self, p: &Path) -> Mlp {
        let cfg = self.cfg;
        let (d, f) = (cfg.d_model, cfg.ffn());
        let units = self.part.even(f);
        let (std, init) = (self.std(), self.resid_std());
        let hidden = units.len();
        match cfg.arch {
            Arch::Llama | Arch::Gemma3 => {
                let gate = self.column(p.at("gate_proj"), d, f, vec![units.clone()], std);
                let up = self.column(p.at("up_proj"), d, f, vec![units.clone()], std);
                let down = self.row(p.at("down_proj"), f, d, units, init);
                let up = Linear::out_in(gate.w.start..up.w.end, d, 2 * hidden);
                let act = if cfg.arch == Arch::Gemma3 { Activation::Gelu } else { Activation::Silu };
                Mlp { up, down, kind: MlpKind::Glu(act), hidden }
            }
            Arch::Gpt2 => {
                let up = self.conv1d_column(p.at("c_fc"), d, f, vec![units.clone()], std);
                let down = self.conv1d_row(p.at("c_proj"), f, d, units, init);
                Mlp { up, down, kind: MlpKind::Plain(Activation::Gelu), hidden }
            }
            _ => {
                let up = self.column(p.at("up_proj"), d, f, vec![units.clone()], std);
                let down = self.row(p.at("down_proj"), f, d, units, init);
                Mlp { up, down, kind: MlpKind::Plain(Activation::Relu2), hidden }
            }
        }
    }

    /// A `[vocab, d]` table's rows of this shard's vocabulary: the token embedding (no weight
    /// decay) or an untied output layer (decayed, like every matrix). A table the head reads
    /// is padded to the head's rows.
    fn vocab_rows(&mut self, path: Path, read_by_head: bool, decay: bool) -> Range<usize> {
        let place = self.vocab_place(read_by_head);
        let std = self.std();
        self.lay.add_placed(path, place, std, decay)
    }
    /// Where this shard's rows of a `[vocab, d]` table sit in the global one.
    fn vocab_place(&self, read_by_head: bool) -> Placement {
        let (v, d) = (self.cfg.vocab_size, self.cfg.d_model);
        let rows = self.part.vocab(v);
        let pad = if read_by_head { self.part.head_rows(v) - rows.len() } else { 0 };
        Placement { pieces: vec![rows], pad, ..Placement::whole(&[v, d]) }
    }
}

impl Model {
    /// The whole model, for one rank.
    pub fn new(cfg: ModelConfig) -> Result<Self> {
        let part = Part::whole(&cfg);
        Self::part(cfg, part)
    }

    /// The piece `part` of the model: its layers, its tensor-parallel shard of each, and the
    /// embedding (first stage) or final norm and head (last stage). Tensors keep their global
    /// names; each records where it sits in the global tensor.
    pub fn part(cfg: ModelConfig, part: Part) -> Result<Self> {
        cfg.validate()?;
        part.check(&cfg)?;
        let mut lay = ParamLayout::default();
        let d = cfg.d_model;
        let vocab = part.vocab(cfg.vocab_size);
        let mut b = Builder { lay: &mut lay, cfg: &cfg, part: &part };
        let mut blocks = Vec::new();
        let mut block_layer = Vec::new();
        let (root, embed_name) = match cfg.arch {
            Arch::Llama | Arch::Gemma3 => ("model", Path::new("model").at("embed_tokens")),
            Arch::Gpt2 => ("transformer", Path::new("transformer").at("wte")),
            _ => ("backbone", Path::new("backbone").at("embeddings")),
        };
        let root = Path::new(root);
        // A tied embedding is the head's weight, on this stage or as the last stage's copy
        // (whose gradient is summed with it): padded like the head either way.
        let embed = part.first.then(|| b.vocab_rows(embed_name.at("weight"), cfg.tied(), false));
        let std = b.std();
        let positions = (part.first && cfg.arch == Arch::Gpt2)
            .then(|| b.add(root.at("wpe").at("weight"), &[cfg.max_seq_len, d], std, false));
        let kinds = cfg.layer_kinds();
        let mut block_params = Vec::new();
        for l in part.layers.clone() {
            let mut start = b.lay.total();
            match cfg.arch {
                Arch::Llama | Arch::Gemma3 => {
                    let p = root.at("layers").at(l);
                    let [pre_attn, pre_mlp, post_attn, post_mlp] = llama_norm_names(&cfg);
                    let norm = pre_attn.map(|name| b.rmsnorm(p.at(name), d));
                    let names = ["q_proj", "k_proj", "v_proj", "o_proj"];
                    let mixer = Mixer::Attention(b.attention(&p.at("self_attn"), names, cfg.layer_attention(l)));
                    let post = post_attn.map(|name| b.rmsnorm(p.at(name), d));
                    blocks.push(Block { norm, mixer, post });
                    block_params.push(start..b.lay.total());
                    start = b.lay.total();
                    let norm = pre_mlp.map(|name| b.rmsnorm(p.at(name), d));
                    let mixer = Mixer::Mlp(b.mlp(&p.at("mlp")));
                    let post = post_mlp.map(|name| b.rmsnorm(p.at(name), d));
                    blocks.push(Block { norm, mixer, post });
                    block_layer.extend([l, l]);
                }
                Arch::Gpt2 => {
                    let p = root.at("h").at(l);
                    let norm = Some(b.layernorm(p.at("ln_1"), d));
                    blocks.push(Block { norm, mixer: Mixer::Attention(b.gpt2_attention(&p.at("attn"))), post: None });
                    block_params.push(start..b.lay.total());
                    start = b.lay.total();
                    let norm = Some(b.layernorm(p.at("ln_2"), d));
                    blocks.push(Block { norm, mixer: Mixer::Mlp(b.mlp(&p.at("mlp"))), post: None });
                    block_layer.extend([l, l]);
                }
                Arch::Mamba | Arch::Mamba2 | Arch::Hybrid => {
                    let p = root.at("layers").at(l);
                    let norm = Some(b.rmsnorm(p.at("norm"), d));
                    let m = p.at("mixer");
                    let mixer = match (kinds[l], cfg.arch) {
                        (LayerKind::Mamba, Arch::Mamba) => Mixer::Mamba(b.mamba(&m)),
                        (LayerKind::Mamba, _) => Mixer::Mamba2(b.mamba2(&m)),
                        (LayerKind::Attention, _) => {
                            let names = ["q_proj", "k_proj", "v_proj", "o_proj"];
                            Mixer::Attention(b.attention(&m, names, LayerAttention { window: None, rope: false }))
                        }
                        (LayerKind::Mlp, _) => Mixer::Mlp(b.mlp(&m)),
                    };
                    blocks.push(Block { norm, mixer, post: None });
                    block_layer.push(l);
                }
            }
            block_params.push(start..b.lay.total());
        }
        let head = if part.last {
            let norm_f = match cfg.arch {
                Arch::Llama | Arch::Gemma3 => b.rmsnorm(root.at("norm"), d),
                Arch::Gpt2 => b.layernorm(root.at("ln_f"), d),
                _ => b.rmsnorm(root.at("norm_f"), d),
            };
            let w = match (&embed, cfg.tied()) {
                (Some(e), true) => e.clone(),
                (None, true) => {
                    // The last stage keeps its own copy of the tied embedding for the head; the
                    // first stage's is the primary, and the two gradients are summed.
                    let place = Placement { primary: false, ..b.vocab_place(true) };
                    let std = b.std();
                    b.lay.add_placed(embed_name.at("weight"), place, std, false)
                }
                (_, false) => b.vocab_rows(Path::new("lm_head").at("weight"), true, true),
            };
            Some(Head { norm_f, out: Linear::out_in(w, d, part.head_rows(cfg.vocab_size)) })
        } else {
            None
        };
        Ok(Self { cfg, layout: lay, part, vocab, embed, positions, blocks, block_layer, block_params, head })
    }

    /// All parameters, counted once (a tied head is the embedding); a padded head's zero rows
    /// count, since they take memory.
    pub fn num_params(&self) -> usize {
        self.layout.total()
    }

    /// Parameters that take part in matrix multiplies for every token: all but the
    /// embedding tables, plus the output head (counted even when tied, since its GEMM runs).
    pub fn num_flop_params(&self) -> usize {
        let embeddings = self.embed.as_ref().map_or(0, |r| r.len()) + self.positions.as_ref().map_or(0, |r| r.len());
        // A head tied to this part's embedding (the last stage's own copy already counts).
        let tied_head = match (&self.head, &self.embed) {
            (Some(h), Some(_)) if self.cfg.tied() => h.out.params(),
            _ => 0,
        };
        self.layout.total() - embeddings + tied_head
    }

    /// Training FLOPs per token (forward and backward): 6 N for the matrix multiplies (PaLM
    /// appendix B), 12 d T per attention block for the scores and their weighted sum, and the
    /// scans counted as computed: Mamba-1 about 9 FLOPs per (channel, state) forward; the SSD
    /// per head Q (N + P) for the intra-chunk pairs (Q = chunk, or T if shorter) and 4 P N for
    /// the state; backward twice the forward. A sliding-window layer counts its keys as
    /// [`counted_keys`] does.
    pub fn flops_per_token(&self, seq: usize) -> u64 {
        let local = self.cfg.sliding_window.map_or(0.0, |w| counted_keys(seq, Some(w)));
        self.flops_per_token_attending(seq, (counted_keys(seq, None), local)).round() as u64
    }

    /// [`Model::flops_per_token`] with each global attention block counting `global` keys per
    /// token in place of T, and each sliding-window one `local`.
    pub fn flops_per_token_attending(&self, seq: usize, (global, local): (f64, f64)) -> f64 {
        let mixers: f64 = self
            .blocks
            .iter()
            .map(|b| match &b.mixer {
                Mixer::Attention(a) => {
                    12.0 * (a.n_heads * a.head_dim) as f64 * if a.window.is_some() { local } else { global }
                }
                Mixer::Mlp(_) => 0.0,
                Mixer::Mamba(m) => (3 * 9 * m.inner * m.state) as f64,
                Mixer::Mamba2(m) => {
                    let q = m.chunk.min(seq);
                    (3 * (m.heads * (q * (m.state + m.head_dim) + 4 * m.head_dim * m.state))) as f64
                }
            })
            .sum();
        (6 * self.num_flop_params()) as f64 + mixers
    }

    /// The activation memory that each micro-batch in flight holds, from its forward to its
    /// backward, in a [`Workspace`] of this shape: every buffer it allocates but the scratch
    /// that each call only uses while it runs ([`scratch_elems`]). On a backend it is
    /// `Elems::bytes(Backend::compute_bytes())`.
    pub fn activation_elems(&self, mb: MicroBatch) -> Elems {
        let MicroBatch { batch, seq, recompute_every, .. } = mb;
        let d = self.cfg.d_model;
        // The residual stream and the norms hold `stream` rows (fewer under sequence parallelism).
        let stream = self.part.stream_rows(batch * seq).len();
        let saved: Elems = (0..self.blocks.len())
            .filter(|&i| !self.recomputed(i, recompute_every))
            .map(|i| self.block_elems(&self.blocks[i], batch, seq))
            .sum();
        let head = self.head.is_some();
        let norm_f = if head { norm_elems(stream, d, self.layernorm()) } else { Elems::default() };
        let dhead = if head && self.part.sequence_parallel { batch * seq * d } else { 0 };
        // The residual stream entering each block and leaving the last, and its gradients (one
        // more where post-norms stand between the stream and the mixers' outputs, and one
        // where muP scales the blocks' branches).
        let grads = 2 + usize::from(self.has_post_norms()) + usize::from(self.scales_branches());
        let residual = (self.blocks.len() + 1) * stream * d + grads * stream * d;
        // The rotary table, and the first keys of sliding-window layers (4 bytes each, as f32).
        let window_keys = if self.cfg.sliding_window.is_some() { batch * seq } else { 0 };
        saved + norm_f + Elems::compute(residual + dhead) + Elems::f32(self.rope_len(seq) + window_keys)
    }

    /// Elements of what `block`'s forward saves for its backward (see [`Model::block_acts`]).
    fn block_elems(&self, block: &Block, batch: usize, seq: usize) -> Elems {
        let (stream, d) = (self.part.stream_rows(batch * seq).len(), self.cfg.d_model);
        let pre = if block.norm.is_some() { norm_elems(stream, d, self.layernorm()) } else { Elems::default() };
        let post = if block.post.is_some() { post_norm_elems(stream, d) } else { Elems::default() };
        pre + block.mixer.act_elems(batch, seq) + post
    }

    /// Whether some block has a norm after its mixer.
    fn has_post_norms(&self) -> bool {
        self.blocks.iter().any(|b| b.post.is_some())
    }

    /// Whether muP scales the blocks' outputs before the residual add.
    fn scales_branches(&self) -> bool {
        !self.blocks.is_empty() && self.cfg.mup.residual_multiplier != 1.0
    }

    /// The rows of the token embedding `embed` that lookups use: this shard's vocabulary,
    /// without the padding of a table the head also reads (the embedding takes any id inside
    /// its table, so the padding would catch the next shard's ids).
    fn lookup_rows(&self, embed: &Range<usize>) -> Range<usize> {
        embed.start..embed.start + self.vocab.len() * self.cfg.d_model
    }

    /// Rows of logits the loss makes at a time for a micro-batch of `rows` tokens: `requested`
    /// (at most `rows`), or for 0 all of them up to about [`LOSS_CHUNK_LOGITS`] logits, else
    /// even chunks, rounded up to 64 rows and of at least [`LOSS_CHUNK_MIN_ROWS`]. The default
    /// is the same on every tensor-parallel shard, whose losses exchange statistics chunk by
    /// chunk: it is reckoned on the widest shard's rows (the first's).
    pub fn loss_chunk(&self, rows: usize, requested: usize) -> usize {
        let chunk = match requested {
            0 => {
                let widest = Part { tp_rank: 0, ..self.part.clone() }.head_rows(self.cfg.vocab_size);
                let chunks = (rows * widest).div_ceil(LOSS_CHUNK_LOGITS).max(1);
                rows.div_ceil(chunks).next_multiple_of(64).max(LOSS_CHUNK_MIN_ROWS)
            }
            n => n,
        };
        chunk.min(rows).max(1)
    }

    /// The columns of a row of logits: this shard's vocabulary and the head's padding.
    pub fn logit_columns(&self) -> LogitColumns {
        LogitColumns { vocab: self.vocab.len(), stride: self.part.head_rows(self.cfg.vocab_size) }
    }

    /// Whether the norms are LayerNorms (GPT-2) rather than RMSNorms.
    fn layernorm(&self) -> bool {
        self.cfg.arch == Arch::Gpt2
    }

    /// The flat range of a tied embedding that another pipeline stage also holds: the first
    /// stage's embedding or the last stage's copy for its head. Their gradients are summed.
    pub fn shared_embedding(&self) -> Option<Range<usize>> {
        if !self.cfg.tied() || (self.part.first && self.part.last) {
            return None;
        }
        match (&self.embed, &self.head) {
            (Some(e), _) => Some(e.clone()),
            (None, Some(h)) => Some(h.out.w.clone()),
            (None, None) => None,
        }
    }

    /// The buffers of what `block`'s forward saves for its backward, for `batch x seq` tokens.
    fn block_acts<B: Backend>(&self, be: &B, block: &Block, batch: usize, seq: usize) -> BlockActs<B> {
        let (stream, d) = (self.part.stream_rows(batch * seq).len(), self.cfg.d_model);
        BlockActs {
            norm: block.norm.as_ref().map(|_| NormActs::new(be, stream, d, self.layernorm())),
            mixer: block.mixer.acts(be, batch, seq),
            post: block.post.as_ref().map(|_| PostNormActs::new(be, stream, d)),
        }
    }

    /// Whether block `i` keeps no activations and is recomputed in backward, when every
    /// `every`-th layer is (0: none).
    fn recomputed(&self, i: usize, every: usize) -> bool {
        every > 0 && self.block_layer[i].is_multiple_of(every)
    }

    /// Runs `ids` (`[batch, seq]`, row-major) up to the output head's input, saving
    /// what backward needs in `ws`; [`Model::loss`] or [`Model::logits`] goes on from there.
    pub fn forward<B: Backend>(&self, be: &B, params: &B::Buf, ws: &mut Workspace<B>, ids: &B::Ids) {
        self.forward_stage(be, params, ws, ids, &mut Alone).expect("a whole model does not communicate");
    }

    /// Forward of this part. The first stage embeds `ids`; a later one reads its input from
    /// [`Workspace::input_mut`]. The last stage leaves the head's input for
    /// [`Model::loss_stage`]; an earlier one its output in [`Workspace::output`].
    pub fn forward_stage<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        ws: &mut Workspace<B>,
        ids: &B::Ids,
        tp: &mut dyn TensorParallel<B>,
    ) -> Result<()> {
        self.forward_at(be, params, ws, ids, None, tp)
    }

    /// Inference: runs `ws.seq` new tokens per sequence that follow the `cache.len` tokens
    /// already in `cache` (their logits then come from [`Model::logits`]), adding them to it
    /// (attention's keys and values; a Mamba mixer's state moves on past them).
    pub fn forward_cached<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        ws: &mut Workspace<B>,
        ids: &B::Ids,
        cache: &mut InferenceCache<B>,
    ) {
        assert!(cache.len + ws.seq <= cache.max_seq && cache.batch == ws.batch, "inference cache too small");
        self.forward_at(be, params, ws, ids, Some(&mut *cache), &mut Alone)
            .expect("a whole model does not communicate");
        cache.len += ws.seq;
    }

    fn forward_at<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        ws: &mut Workspace<B>,
        ids: &B::Ids,
        cache: Option<&mut InferenceCache<B>>,
        tp: &mut dyn TensorParallel<B>,
    ) -> Result<()> {
        let (d, eps) = (self.cfg.d_model, self.cfg.norm_eps);
        let split = self.part.tp > 1;
        // The new tokens start at position `pos`: positions and rotations are read from there.
        let pos = cache.as_ref().map_or(0, |c| c.len);
        if let Some(embed) = &self.embed {
            // Positions are replicated: only the first shard adds them before the shards' sum.
            let positions = self
                .positions
                .as_ref()
                .filter(|_| self.part.tp_rank == 0)
                .map(|r| (be.view(params, r.start + pos * d..r.end), ws.seq));
            let (table, first_id) = (be.view(params, self.lookup_rows(embed)), self.vocab.start);
            // Each shard looks up every token in its vocabulary rows: the shards' sum is the
            // embedding.
            match Workspace::scratch(&mut ws.scratch).gathered.as_mut() {
                Some(g) => {
                    be.embedding_forward(ids, table, first_id, positions, be.all_mut(&mut g.output), d);
                    tp.reduce_scatter_rows(be, &g.output, &mut ws.res[0])?;
                }
                None => {
                    be.embedding_forward(ids, table, first_id, positions, be.all_mut(&mut ws.res[0]), d);
                    if split {
                        tp.all_reduce(be, &mut ws.res[0])?;
                    }
                }
            }
            scale_unless_one(be, &mut ws.res[0], self.cfg.embedding_scale());
        }

        let (mut cached, at) = match cache {
            Some(InferenceCache { blocks, rope, max_seq, .. }) => {
                let (rope, local_rope) = rope.views_from(be, pos * self.cfg.head_dim());
                (Some((blocks, *max_seq)), Positions { rope, local_rope, first_keys: None, window_keys: None })
            }
            None => (None, ws.positions.of(be)),
        };
        let Scratch { recomputed, gathered, .. } = Workspace::scratch(&mut ws.scratch);
        for i in 0..self.blocks.len() {
            let (done, next) = ws.res.split_at_mut(i + 1);
            // A recomputed block runs in the scratch of its kind; its input stays in `res`.
            let kind = self.blocks[i].mixer.kind();
            let a = match ws.acts[i].as_mut() {
                Some(a) => a,
                None => recomputed[kind].as_mut().expect("a recomputed kind"),
            };
            let slot = cached.as_mut().and_then(|(blocks, max_seq)| blocks[i].slot(pos, *max_seq));
            let io = BlockIo { x: &done[i], x_next: &mut next[0], gathered: gathered.as_mut() };
            self.block_forward(be, params, i, io, a, at, slot, (ws.batch, ws.seq), tp)?;
        }

        if let Some(head) = &self.head {
            // The head's input; the logits are made in chunks by the loss (or `logits`).
            let last = &ws.res[self.blocks.len()];
            let norm_f = ws.norm_f.as_mut().expect("the last stage's workspace has a final norm");
            head.norm_f.forward(be, params, be.all(last), norm_f, d, eps);
            // The logits' multiplier, on the head's input: the same logits, and the head's
            // weight gradient as the scaled logits give it.
            scale_unless_one(be, &mut norm_f.out, self.cfg.mup.logits_multiplier);
            if let Some(g) = gathered.as_mut() {
                tp.all_gather_rows(be, &norm_f.out, &mut g.input)?;
            }
        }
        Ok(())
    }

    /// The logits of the tokens of the last [`Model::forward`] (inference; training takes them
    /// chunk by chunk in [`Model::loss_stage`]), `[rows, vocab]` for this shard's vocabulary,
    /// without the head's padding.
    pub fn logits<B: Backend>(&self, be: &B, params: &B::Buf, ws: &mut Workspace<B>) -> Vec<f32> {
        let head = self.head.as_ref().expect("the last stage makes logits");
        let (d, columns) = (self.cfg.d_model, self.logit_columns());
        let mut out = Vec::with_capacity(ws.rows * columns.vocab);
        let chunks = ws.loss_chunks();
        let Workspace { norm_f, dhead, dnorm, scratch, .. } = ws;
        let Scratch { logits, gathered, .. } = Workspace::scratch(scratch);
        let (h, _) = head_io(norm_f, gathered, dhead, dnorm);
        for rows in chunks {
            let (x, block) = (be.view(h, rows.start * d..rows.end * d), 0..rows.len() * columns.stride);
            head.out.forward_view(be, params, x, be.view_mut(logits, block.clone()), rows.len());
            let chunk = be.download_view(be.view(logits, block));
            out.extend(chunk.chunks(columns.stride).flat_map(|row| &row[..columns.vocab]));
        }
        out
    }

    /// Block `i`: saves what backward needs in `a` and writes `x + mixer(norm(x))` (or with the
    /// norm after the mixer, or on both sides) to `io.x_next`. Split across shards, each mixer's
    /// output is one shard's partial sum: summed (all-reduce) before a post-norm and the residual
    /// add, or under sequence parallelism summed and scattered by tokens (reduce-scatter), the
    /// mixer having run on the gathered tokens.
    #[allow(clippy::too_many_arguments)]
    fn block_forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        i: usize,
        io: BlockIo<'_, B>,
        a: &mut BlockActs<B>,
        at: Positions<'_, B>,
        cache: Option<CacheSlot<'_, B>>,
        dims: (usize, usize),
        tp: &mut dyn TensorParallel<B>,
    ) -> Result<()> {
        let (block, d, eps) = (&self.blocks[i], self.cfg.d_model, self.cfg.norm_eps);
        let BlockIo { x, x_next, gathered } = io;
        let BlockActs { norm: pre, mixer: acts, post } = a;
        // The mixer's input: the pre-norm's output, or the stream itself.
        let input = match (&block.norm, pre) {
            (Some(norm), Some(pre)) => {
                norm.forward(be, params, be.all(x), pre, d, eps);
                &pre.out
            }
            _ => x,
        };
        // The mixer's output: the block's (before the residual add), or the post-norm's input.
        let output = match post.as_mut() {
            Some(post) => &mut post.input,
            None => &mut *x_next,
        };
        match gathered {
            Some(g) => {
                tp.all_gather_rows(be, input, &mut g.input)?;
                block.mixer.forward(be, params, be.all(&g.input), acts, &mut g.output, at, cache, dims, tp)?;
                tp.reduce_scatter_rows(be, &g.output, output)?;
            }
            None => {
                block.mixer.forward(be, params, be.all(input), acts, output, at, cache, dims, tp)?;
                if self.part.tp > 1 {
                    tp.all_reduce(be, output)?;
                }
            }
        }
        if let (Some(norm), Some(post)) = (&block.post, post) {
            norm.forward_post(be, params, post, x_next, d, eps);
        }
        scale_unless_one(be, x_next, self.cfg.mup.residual_multiplier);
        be.add_assign(be.all_mut(x_next), be.all(x));
        Ok(())
    }

    /// Cross-entropy of the last [`Model::forward`]'s tokens against `targets`; returns the SUM
    /// of the per-token losses. With `grad = (scale, grads)`, backpropagates `scale` times it
    /// through the output head: the head's weight gradient accumulates into `grads`, and its
    /// input gradient waits in the workspace for [`Model::backward`].
    pub fn loss<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        ws: &mut Workspace<B>,
        targets: &B::Ids,
        grad: Option<(f32, &mut B::Buf)>,
    ) -> f64 {
        self.loss_stage(be, params, ws, targets, grad, &mut Alone).expect("a whole model does not communicate")
    }

    /// [`Model::loss`] on the last stage. The logits are made and used up a chunk of rows at a
    /// time ([`Model::loss_chunk`]), so only one chunk of them ever exists: the head's
    /// GEMM, the fused cross-entropy (which leaves `scale * dloss/dlogits` in their place), and
    /// the head's two backward GEMMs. Split across shards, each holds a vocabulary shard of
    /// the logits (no rank ever holds them all): the shards exchange three numbers per row
    /// (max, sum of exponentials, target logit), from which each finds the rows' log-sum-exp.
    pub fn loss_stage<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        ws: &mut Workspace<B>,
        targets: &B::Ids,
        mut grad: Option<(f32, &mut B::Buf)>,
        tp: &mut dyn TensorParallel<B>,
    ) -> Result<f64> {
        let head = self.head.as_ref().expect("the last stage computes the loss");
        let (d, columns, first_id) = (self.cfg.d_model, self.logit_columns(), self.vocab.start);
        let chunks = ws.loss_chunks();
        let Workspace { norm_f, dhead, dnorm, scratch, .. } = ws;
        let Scratch { logits, losses, vocab_parallel, gathered, .. } = Workspace::scratch(scratch);
        let (h, dh) = head_io(norm_f, gathered, dhead, dnorm);
        let mut loss = 0.0;
        for rows in chunks {
            let (n, x) = (rows.len(), be.view(h, rows.start * d..rows.end * d));
            let block = 0..n * columns.stride;
            head.out.forward_view(be, params, x, be.view_mut(logits, block.clone()), n);
            let scale = grad.as_ref().map(|(scale, _)| *scale);
            match vocab_parallel.as_mut() {
                None => {
                    let chunk_losses = be.view_mut(losses, rows.clone());
                    be.cross_entropy(
                        be.view_mut(logits, block.clone()),
                        targets,
                        rows.start,
                        chunk_losses,
                        columns,
                        scale,
                    );
                }
                Some((stats, lse)) => {
                    let chunk_stats = be.view_mut(stats, 0..3 * n);
                    be.cross_entropy_stats(
                        be.view(logits, block.clone()),
                        targets,
                        rows.start,
                        chunk_stats,
                        first_id,
                        columns,
                    );
                    let all = tp.all_gather(&be.download_view(be.view(stats, 0..3 * n)))?;
                    let parts: Vec<&[f32]> = all.chunks(3 * n).collect();
                    let mut host_lse = vec![0.0f32; n];
                    loss += combine_ce_stats(&parts, &mut host_lse);
                    if let Some(scale) = scale {
                        be.write_view(be.view_mut(lse, 0..n), &host_lse);
                        let (chunk_logits, chunk_lse) = (be.view_mut(logits, block.clone()), be.view(lse, 0..n));
                        be.cross_entropy_grad(chunk_logits, targets, rows.start, chunk_lse, first_id, columns, scale);
                    }
                }
            }
            if let Some((_, grads)) = grad.as_mut() {
                let dx = be.view_mut(dh, rows.start * d..rows.end * d);
                head.out.backward(be, params, grads, x, be.view(logits, block), Dx::Write(dx), n);
            }
        }
        if vocab_parallel.is_none() {
            loss = be.sum(be.all(losses));
        }
        Ok(loss)
    }

    /// Backpropagates from the head's input gradient that [`Model::loss`] left in `ws`,
    /// accumulating into `grads` (same layout as `params`).
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        ws: &mut Workspace<B>,
        ids: &B::Ids,
    ) {
        self.backward_stage(be, params, grads, ws, ids, &mut Alone).expect("a whole model does not communicate");
    }

    /// Backward of this part. The last stage starts from the head's input gradient that
    /// [`Model::loss_stage`] left; an earlier one from the gradient of its output, written into
    /// [`Workspace::output_grad_mut`]. A stage after the first leaves the gradient of its input
    /// in [`Workspace::input_grad`].
    pub fn backward_stage<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        ws: &mut Workspace<B>,
        ids: &B::Ids,
        tp: &mut dyn TensorParallel<B>,
    ) -> Result<()> {
        let (d, dims) = (self.cfg.d_model, (ws.batch, ws.seq));
        let split = self.part.tp > 1;
        let Scratch { mixers, recomputed, gathered, .. } = Workspace::scratch(&mut ws.scratch);

        if let Some(head) = &self.head {
            let norm_f = ws.norm_f.as_ref().expect("the last stage's workspace has a final norm");
            // Each shard's head input gradient is a partial sum over the vocabulary.
            match ws.dhead.as_ref() {
                Some(dhead) => tp.reduce_scatter_rows(be, dhead, &mut ws.dnorm)?,
                None if split => tp.all_reduce(be, &mut ws.dnorm)?,
                None => {}
            }
            scale_unless_one(be, &mut ws.dnorm, self.cfg.mup.logits_multiplier);
            be.fill(be.all_mut(&mut ws.dres), 0.0);
            let last = &ws.res[self.blocks.len()];
            head.norm_f.backward(be, params, grads, be.all(&ws.dnorm), be.all(last), norm_f, &mut ws.dres, d);
            // The final norm and an untied head come after the blocks (a tied head's gradient
            // is the embedding's, complete only after the embedding's backward).
            let after_blocks = self.block_params.last().map_or(self.stem_params().end, |r| r.end);
            tp.grads_ready(be, grads, after_blocks..self.layout.total())?;
        }

        let at = ws.positions.of(be);
        for i in (0..self.blocks.len()).rev() {
            let block = &self.blocks[i];
            let a: &BlockActs<B> = match &ws.acts[i] {
                Some(a) => a,
                None => {
                    // Activation checkpointing: run the block again from its saved input. The
                    // same ops on the same bits give the same activations; its output goes to
                    // `dnorm`, free until this block's norm backward reads it.
                    let acts = recomputed[block.mixer.kind()].as_mut().expect("a recomputed kind");
                    let io = BlockIo { x: &ws.res[i], x_next: &mut ws.dnorm, gathered: gathered.as_mut() };
                    self.block_forward(be, params, i, io, acts, at, None, dims, tp)?;
                    acts
                }
            };
            // dres holds dL/d(x_next) = dL/dx along the skip path; the norm adds the mixer's
            // branch, whose output's gradient is muP's residual multiplier times it. A post-norm
            // stands between that and the mixer's output.
            let dbranch = match ws.dbranch.as_mut() {
                Some(dbranch) => {
                    be.fill(be.all_mut(dbranch), 0.0);
                    be.add_assign(be.all_mut(dbranch), be.all(&ws.dres));
                    be.scale(be.all_mut(dbranch), self.cfg.mup.residual_multiplier as f32);
                    &*dbranch
                }
                None => &ws.dres,
            };
            let dmixer = match (&block.post, &a.post, ws.dpost.as_mut()) {
                (Some(norm), Some(post), Some(dpost)) => {
                    norm.backward_post(be, params, grads, be.all(dbranch), post, dpost, d);
                    &*dpost
                }
                _ => dbranch,
            };
            let input = a.norm.as_ref().map_or(&ws.res[i], |pre| &pre.out);
            match gathered.as_mut() {
                Some(g) => {
                    tp.all_gather_rows(be, input, &mut g.input)?;
                    tp.all_gather_rows(be, dmixer, &mut g.output)?;
                    let (h, dout) = (be.all(&g.input), be.all(&g.output));
                    block.mixer.backward(be, params, grads, h, &a.mixer, dout, &mut g.dinput, mixers, at, dims, tp)?;
                    tp.reduce_scatter_rows(be, &g.dinput, &mut ws.dnorm)?;
                }
                None => {
                    let (h, dout, dh) = (be.all(input), be.all(dmixer), &mut ws.dnorm);
                    block.mixer.backward(be, params, grads, h, &a.mixer, dout, dh, mixers, at, dims, tp)?;
                    if split {
                        tp.all_reduce(be, &mut ws.dnorm)?;
                    }
                }
            }
            match (&block.norm, &a.norm) {
                (Some(norm), Some(pre)) => {
                    let (dnorm, x) = (be.all(&ws.dnorm), be.all(&ws.res[i]));
                    norm.backward(be, params, grads, dnorm, x, pre, &mut ws.dres, d);
                }
                _ => be.add_assign(be.all_mut(&mut ws.dres), be.all(&ws.dnorm)),
            }
            tp.grads_ready(be, grads, self.block_params[i].clone())?;
        }

        if self.embed.is_none() {
            return Ok(());
        }
        // Every shard's embedding needs the gradient of every token it looked up.
        let dx = match gathered.as_mut() {
            Some(g) => {
                tp.all_gather_rows(be, &ws.dres, &mut g.output)?;
                &mut g.output
            }
            None => &mut ws.dres,
        };
        scale_unless_one(be, dx, self.cfg.embedding_scale());
        if let Some(embed) = &self.embed {
            be.embedding_backward(ids, be.all(dx), be.view_mut(grads, self.lookup_rows(embed)), self.vocab.start, d);
        }
        if let Some(pos) = &self.positions {
            be.position_embedding_backward(be.all(dx), be.view_mut(grads, pos.clone()), ws.seq, d);
        }
        tp.grads_ready(be, grads, self.stem_params())?;
        Ok(())
    }

    /// The flat range of the parameters before the first block: the token (and position)
    /// embeddings of the first stage, empty elsewhere.
    fn stem_params(&self) -> Range<usize> {
        0..self.block_params.first().map_or(0, |r| r.start)
    }

    /// The rotary table for `seq` positions, followed by the sliding-window layers' where
    /// they have their own theta; empty if no block rotates.
    fn rope_table(&self, seq: usize) -> Vec<f32> {
        if !self.rotates() {
            return Vec::new();
        }
        let mut table = rope_table_of(seq, &self.cfg.rope_inv_freq());
        if let Some(local) = self.cfg.rope_inv_freq_local() {
            table.extend(rope_table_of(seq, &local));
        }
        table
    }

    /// Length of [`Model::rope_table`].
    fn rope_len(&self, seq: usize) -> usize {
        let tables = 1 + usize::from(self.cfg.has_local_rope());
        if self.rotates() { tables * seq * (self.cfg.head_dim() / 2) * 2 } else { 0 }
    }

    /// Whether an attention block rotates its queries and keys.
    fn rotates(&self) -> bool {
        self.blocks.iter().any(|b| matches!(&b.mixer, Mixer::Attention(a) if a.rope))
    }
}

impl Mixer {
    /// Forward on the normed input `h`, writing the mixer's output to `out` (a split Mamba-1
    /// sums its x_proj outputs over `tp` inside).
    #[allow(clippy::too_many_arguments)]
    fn forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        h: B::Ref<'_>,
        a: &mut MixerActs<B>,
        out: &mut B::Buf,
        at: Positions<'_, B>,
        cache: Option<CacheSlot<'_, B>>,
        dims: (usize, usize),
        tp: &mut dyn TensorParallel<B>,
    ) -> Result<()> {
        match (self, a) {
            (Mixer::Attention(m), MixerActs::Attention(a)) => {
                m.forward(be, params, h, a, out, at, cache.map(CacheSlot::kv), dims)
            }
            (Mixer::Mlp(m), MixerActs::Mlp(a)) => m.forward(be, params, h, a, out, dims.0 * dims.1),
            (Mixer::Mamba(m), MixerActs::Mamba(a)) => {
                return m.forward(be, params, h, a, out, dims, cache.map(CacheSlot::recurrent), tp);
            }
            (Mixer::Mamba2(m), MixerActs::Mamba2(a)) => {
                m.forward(be, params, h, a, out, dims, cache.map(CacheSlot::recurrent))
            }
            _ => unreachable!("activations of another mixer kind"),
        }
        Ok(())
    }

    /// Backward from `dout`, accumulating parameter gradients into `grads` and writing the
    /// gradient of `h` to `dh`.
    #[allow(clippy::too_many_arguments)]
    fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        h: B::Ref<'_>,
        a: &MixerActs<B>,
        dout: B::Ref<'_>,
        dh: &mut B::Buf,
        g: &mut MixerGrads<B>,
        at: Positions<'_, B>,
        dims: (usize, usize),
        tp: &mut dyn TensorParallel<B>,
    ) -> Result<()> {
        match (self, a) {
            (Mixer::Attention(m), MixerActs::Attention(a)) => {
                let g = g.attn.as_mut().expect("attention scratch");
                m.backward(be, params, grads, h, a, dout, dh, g, at, dims);
            }
            (Mixer::Mlp(m), MixerActs::Mlp(a)) => {
                let g = g.mlp.as_mut().expect("MLP scratch");
                m.backward(be, params, grads, h, a, dout, dh, g, dims.0 * dims.1);
            }
            (Mixer::Mamba(m), MixerActs::Mamba(a)) => {
                let g = g.mamba.as_mut().expect("Mamba scratch");
                return m.backward(be, params, grads, h, a, dout, dh, g, dims, tp);
            }
            (Mixer::Mamba2(m), MixerActs::Mamba2(a)) => {
                let g = g.mamba2.as_mut().expect("Mamba-2 scratch");
                m.backward(be, params, grads, h, a, dout, dh, g, dims);
            }
            _ => unreachable!("activations of another mixer kind"),
        }
        Ok(())
    }

    fn acts<B: Backend>(&self, be: &B, batch: usize, seq: usize) -> MixerActs<B> {
        match self {
            Mixer::Attention(m) => MixerActs::Attention(m.acts(be, batch, seq)),
            Mixer::Mlp(m) => MixerActs::Mlp(m.acts(be, batch * seq)),
            Mixer::Mamba(m) => MixerActs::Mamba(m.acts(be, batch, seq)),
            Mixer::Mamba2(m) => MixerActs::Mamba2(m.acts(be, batch, seq)),
        }
    }

    fn act_elems(&self, batch: usize, seq: usize) -> Elems {
        match self {
            Mixer::Attention(m) => m.act_elems(batch, seq),
            Mixer::Mlp(m) => m.act_elems(batch * seq),
            Mixer::Mamba(m) => m.act_elems(batch, seq),
            Mixer::Mamba2(m) => m.act_elems(batch, seq),
        }
    }

    /// Elements of this kind's gradient scratch (see [`Scratch`]).
    fn grad_elems(&self, batch: usize, seq: usize) -> Elems {
        match self {
            Mixer::Attention(m) => m.grad_elems(batch, seq),
            Mixer::Mlp(m) => m.grad_elems(batch * seq),
            Mixer::Mamba(m) => m.grad_elems(batch * seq),
            Mixer::Mamba2(m) => m.grad_elems(batch * seq),
        }
    }
}

/// What incremental decoding keeps of the tokens seen so far, per block: an attention
/// block's keys and values, a Mamba mixer's convolution inputs and recurrent state.
pub struct InferenceCache<B: Backend> {
    blocks: Vec<BlockCache<B>>,
    /// Rotary tables for all `max_seq` positions.
    rope: RopeTables<B>,
    pub batch: usize,
    pub max_seq: usize,
    /// Tokens already in the cache, per sequence.
    pub len: usize,
}

enum BlockCache<B: Backend> {
    /// An MLP block keeps nothing.
    Stateless,
    Kv {
        k: B::Buf,
        v: B::Buf,
    },
    Recurrent(RecurrentState<B>),
}

impl<B: Backend> BlockCache<B> {
    /// This block's part of the cache, the new tokens starting at position `pos`.
    fn slot(&mut self, pos: usize, max_seq: usize) -> Option<CacheSlot<'_, B>> {
        match self {
            BlockCache::Stateless => None,
            BlockCache::Kv { k, v } => Some(CacheSlot::Kv(KvSlot { k, v, pos, max_seq })),
            BlockCache::Recurrent(state) => Some(CacheSlot::Recurrent(state)),
        }
    }
}

/// One block's part of an [`InferenceCache`].
enum CacheSlot<'a, B: Backend> {
    Kv(KvSlot<'a, B>),
    Recurrent(&'a mut RecurrentState<B>),
}

impl<'a, B: Backend> CacheSlot<'a, B> {
    fn kv(self) -> KvSlot<'a, B> {
        match self {
            CacheSlot::Kv(slot) => slot,
            CacheSlot::Recurrent(_) => unreachable!("an attention block's cache holds keys and values"),
        }
    }

    fn recurrent(self) -> &'a mut RecurrentState<B> {
        match self {
            CacheSlot::Recurrent(state) => state,
            CacheSlot::Kv(_) => unreachable!("a Mamba block's cache holds its recurrent state"),
        }
    }
}

impl<B: Backend> InferenceCache<B> {
    pub fn new(be: &B, model: &Model, batch: usize, max_seq: usize) -> Self {
        let block = |b: &Block| match &b.mixer {
            Mixer::Attention(a) => {
                let len = batch * max_seq * a.n_kv_heads * a.head_dim;
                BlockCache::Kv { k: be.zeros(len), v: be.zeros(len) }
            }
            Mixer::Mlp(_) => BlockCache::Stateless,
            Mixer::Mamba(m) => BlockCache::Recurrent(m.recurrent_state(be, batch)),
            Mixer::Mamba2(m) => BlockCache::Recurrent(m.recurrent_state(be, batch)),
        };
        Self {
            blocks: model.blocks.iter().map(block).collect(),
            rope: RopeTables::new(be, model, max_seq),
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
    norm: Option<NormActs<B>>,
    mixer: MixerActs<B>,
    post: Option<PostNormActs<B>>,
}

/// The buffers that one call (forward, loss or backward) uses and leaves nothing in for the
/// next, reused by every block in turn. One rank's workspaces, of all its model chunks and all
/// its micro-batches in flight, share one scratch, given to the workspace at work
/// ([`Workspace::give_scratch`]).
pub struct Scratch<B: Backend> {
    /// The gradients of the mixers' activations, one set per mixer kind present.
    mixers: MixerGrads<B>,
    /// Per mixer kind, the activations that its recomputed blocks run in (activation
    /// checkpointing; None for a kind with no recomputed block).
    recomputed: Vec<Option<BlockActs<B>>>,
    /// One chunk of rows' logits, `[loss_chunk, head rows]` (a padded head's last columns are
    /// no token's), then their gradients (empty without the last stage).
    logits: B::Buf,
    /// Each token's loss (last stage only, without tp: the vocab-parallel loss sums on the host).
    losses: B::Buf,
    /// The vocab-parallel loss's row statistics and log-sum-exp (tp > 1 only).
    vocab_parallel: Option<(B::Buf, B::Buf)>,
    /// Sequence parallelism only.
    gathered: Option<Gathered<B>>,
}

/// The mixers' gradient scratch, per mixer kind present.
struct MixerGrads<B: Backend> {
    attn: Option<AttnGrads<B>>,
    mlp: Option<MlpGrads<B>>,
    mamba: Option<MambaGrads<B>>,
    mamba2: Option<Mamba2Grads<B>>,
}

/// What the scratch of workspaces for `models` (one rank's chunks, which differ only in their
/// layers, embedding and head) must hold.
struct ScratchPlan<'a> {
    /// One block of each mixer kind present: the gradient scratch.
    kinds: Vec<&'a Block>,
    /// A model and one of its recomputed blocks for each kind that some model recomputes.
    recomputed: Vec<(&'a Model, &'a Block)>,
    /// The chunk with the output head, if any, and its rows of logits at a time.
    head: Option<(&'a Model, usize)>,
    /// Rows of the micro-batch and the model width.
    rows: usize,
    d: usize,
    tp: bool,
    sequence_parallel: bool,
}

impl<'a> ScratchPlan<'a> {
    fn new(models: &[&'a Model], mb: MicroBatch) -> Self {
        let MicroBatch { batch, seq, recompute_every, loss_chunk } = mb;
        // Every block of every model, with its model and index there.
        let blocks = || models.iter().flat_map(|m| m.blocks.iter().enumerate().map(move |(i, b)| (*m, i, b)));
        let kinds = (0..KINDS).filter_map(|k| blocks().find(|(_, _, b)| b.mixer.kind() == k)).map(|(_, _, b)| b);
        let recomputed = (0..KINDS)
            .filter_map(|k| blocks().find(|(m, i, b)| b.mixer.kind() == k && m.recomputed(*i, recompute_every)))
            .map(|(m, _, b)| (m, b));
        let rows = batch * seq;
        let head = models.iter().find(|m| m.head.is_some()).map(|m| (*m, m.loss_chunk(rows, loss_chunk)));
        let part = &models.first().expect("a chunk").part;
        Self {
            kinds: kinds.collect(),
            recomputed: recomputed.collect(),
            head,
            rows,
            d: models[0].cfg.d_model,
            tp: part.tp > 1,
            sequence_parallel: part.sequence_parallel,
        }
    }

    /// Rows of logits at a time and their stride, with the output head.
    fn logit_chunk(&self) -> Option<(usize, usize)> {
        self.head.map(|(m, chunk)| (chunk, m.logit_columns().stride))
    }
}

/// Elements of the one [`Scratch`] of a rank's workspaces for `models` (its chunks) and
/// micro-batches of shape `mb`.
pub fn scratch_elems(models: &[&Model], mb: MicroBatch) -> Elems {
    let (plan, MicroBatch { batch, seq, .. }) = (ScratchPlan::new(models, mb), mb);
    let recomputed: Elems = plan.recomputed.iter().map(|(m, b)| m.block_elems(b, batch, seq)).sum();
    let grads: Elems = plan.kinds.iter().map(|b| b.mixer.grad_elems(batch, seq)).sum();
    // The logits' chunk, then each token's loss, or under tp the vocab-parallel statistics.
    let loss = plan.logit_chunk().map_or(Elems::default(), |(chunk, stride)| {
        Elems::compute(chunk * stride) + Elems::f32(if plan.tp { 4 * chunk } else { plan.rows })
    });
    let gathered = if plan.sequence_parallel { 3 * plan.rows * plan.d } else { 0 };
    recomputed + grads + loss + Elems::compute(gathered)
}

impl<B: Backend> Scratch<B> {
    /// The scratch of a rank's workspaces for `models` (see [`scratch_elems`]).
    pub fn new(be: &B, models: &[&Model], mb: MicroBatch) -> Self {
        let (plan, MicroBatch { batch, seq, .. }) = (ScratchPlan::new(models, mb), mb);
        let mut recomputed: Vec<Option<BlockActs<B>>> = (0..KINDS).map(|_| None).collect();
        for (m, block) in &plan.recomputed {
            recomputed[block.mixer.kind()] = Some(m.block_acts(be, block, batch, seq));
        }
        let (rows, d) = (plan.rows, plan.d);
        let mut mixers = MixerGrads { attn: None, mlp: None, mamba: None, mamba2: None };
        for block in &plan.kinds {
            match &block.mixer {
                Mixer::Attention(m) => mixers.attn = Some(m.grads(be, batch, seq)),
                Mixer::Mlp(m) => mixers.mlp = Some(m.grads(be, rows)),
                Mixer::Mamba(m) => mixers.mamba = Some(m.grads(be, rows)),
                Mixer::Mamba2(m) => mixers.mamba2 = Some(m.grads(be, rows)),
            }
        }
        let (chunk, stride) = plan.logit_chunk().unwrap_or((0, 0));
        let head = plan.head.is_some();
        Self {
            mixers,
            recomputed,
            logits: be.zeros(chunk * stride),
            losses: be.zeros_f32(if head && !plan.tp { rows } else { 0 }),
            vocab_parallel: (head && plan.tp).then(|| (be.zeros_f32(3 * chunk), be.zeros_f32(chunk))),
            gathered: plan.sequence_parallel.then(|| Gathered {
                input: be.zeros(rows * d),
                output: be.zeros(rows * d),
                dinput: be.zeros(rows * d),
            }),
        }
    }
}

/// Sequence parallelism's buffers of all the micro-batch's tokens, used within one forward,
/// loss or backward call (the residual stream and the norms hold only this shard's tokens).
struct Gathered<B: Backend> {
    /// A norm's output gathered from every shard: the input of a mixer or of the head.
    input: B::Buf,
    /// A mixer's output before the reduce-scatter; in backward, the gathered output gradient.
    output: B::Buf,
    /// The gradient of `input`, before the reduce-scatter.
    dinput: B::Buf,
}

/// A block's input, where its output goes, and the sequence-parallel buffers if any.
struct BlockIo<'a, B: Backend> {
    x: &'a B::Buf,
    x_next: &'a mut B::Buf,
    gathered: Option<&'a mut Gathered<B>>,
}

/// `x *= factor` (one of muP's multipliers), skipped where it is 1 so that a model without
/// them computes exactly as before.
fn scale_unless_one<B: Backend>(be: &B, x: &mut B::Buf, factor: f64) {
    if factor != 1.0 {
        be.scale(be.all_mut(x), factor as f32);
    }
}

/// The Hugging Face names of a Llama layer's norms, where it has them: before attention,
/// before the MLP, after attention, after the MLP (Llama's, EXAONE 4's, HyperCLOVA X's and
/// Gemma 3's).
fn llama_norm_names(cfg: &ModelConfig) -> [Option<&'static str>; 4] {
    if cfg.arch == Arch::Gemma3 {
        return [
            "input_layernorm",
            "pre_feedforward_layernorm",
            "post_attention_layernorm",
            "post_feedforward_layernorm",
        ]
        .map(Some);
    }
    match cfg.block_norms {
        BlockNorms::Pre => [Some("input_layernorm"), Some("post_attention_layernorm"), None, None],
        BlockNorms::Post => [None, None, Some("post_attention_layernorm"), Some("post_feedforward_layernorm")],
        BlockNorms::Both => {
            [Some("input_layernorm"), Some("post_attention_layernorm"), Some("post_norm1"), Some("post_norm2")]
        }
    }
}

/// The output head's input after forward (gathered under sequence parallelism), and where the
/// loss writes its gradient, before the shards' sum (`dhead`, or `dnorm`).
fn head_io<'a, B: Backend>(
    norm_f: &'a Option<NormActs<B>>,
    gathered: &'a Option<Gathered<B>>,
    dhead: &'a mut Option<B::Buf>,
    dnorm: &'a mut B::Buf,
) -> (&'a B::Buf, &'a mut B::Buf) {
    match gathered {
        Some(g) => (&g.input, dhead.as_mut().expect("a sequence-parallel last stage's workspace has dhead")),
        None => (&norm_f.as_ref().expect("the last stage's workspace has a final norm").out, dnorm),
    }
}

/// About this many logits exist at a time by default (1 GiB in bf16): a micro-batch's rows
/// beyond it are made and used up in even chunks (GPT-2 124M's 16 x 1024 tokens of 50304 in
/// 2, Llama-3.2-1B's 4 x 2048 of 128256 in 2).
pub const LOSS_CHUNK_LOGITS: usize = 1 << 29;

/// Chunks have at least this many rows (so more logits than [`LOSS_CHUNK_LOGITS`] past a
/// vocabulary of 131072): each chunk's weight-gradient GEMM reads and writes the head's whole
/// f32 gradient, a pass that costs under a fifth of the GEMM at this size.
pub const LOSS_CHUNK_MIN_ROWS: usize = 4096;

/// The shape of a micro-batch's work: its tokens, the blocks its backward recomputes, the rows
/// of logits its loss makes at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MicroBatch {
    pub batch: usize,
    pub seq: usize,
    /// The blocks of every this many layers keep no activations and are recomputed in
    /// backward from their input (0: none): less memory, one more forward of those blocks,
    /// identical results.
    pub recompute_every: usize,
    /// Rows of logits the loss makes at a time (0: the default, see [`Model::loss_chunk`]).
    pub loss_chunk: usize,
}

impl MicroBatch {
    /// `batch` sequences of `seq` tokens, nothing recomputed, the default chunks of logits.
    pub fn new(batch: usize, seq: usize) -> Self {
        Self { batch, seq, recompute_every: 0, loss_chunk: 0 }
    }
}

/// The keys PaLM's FLOPs count per token of a sequence of `seq` (T: twice the causal mean, the
/// key pairs of a full square), and where each query attends only its last `window` keys
/// (itself included) the same count of what it does attend: 2 k - 1 for k keys, averaged.
pub fn counted_keys(seq: usize, window: Option<usize>) -> f64 {
    let w = window.unwrap_or(seq).min(seq);
    // Queries 0..w attend t + 1 keys, the rest w: sum of 2k - 1 is w^2 + (seq - w)(2w - 1).
    (w * w + (seq - w) * (2 * w).saturating_sub(1)) as f64 / seq.max(1) as f64
}

/// The rotary tables of positions `0..seq` ([`Model::rope_table`]): the global layers', and
/// after it the sliding-window layers' where their theta is their own.
struct RopeTables<B: Backend> {
    buf: B::Buf,
    /// Where the sliding-window layers' table starts, if they have their own.
    local_start: Option<usize>,
}

impl<B: Backend> RopeTables<B> {
    fn new(be: &B, model: &Model, seq: usize) -> Self {
        let table = model.rope_table(seq);
        let local_start = (model.cfg.has_local_rope() && !table.is_empty()).then_some(table.len() / 2);
        Self { buf: be.upload_f32(&table), local_start }
    }

    /// The global and the sliding-window layers' tables from element `offset` of each on
    /// (a position's row is head_dim values). Without rotary positions the tables are empty
    /// views, never read.
    fn views_from<'a>(&'a self, be: &B, offset: usize) -> (B::Ref<'a>, B::Ref<'a>) {
        let len = be.len(&self.buf);
        let global_end = self.local_start.unwrap_or(len);
        let global = be.view(&self.buf, offset.min(global_end)..global_end);
        let local = self.local_start.map_or(global, |start| be.view(&self.buf, (start + offset).min(len)..len));
        (global, local)
    }
}

/// Where a workspace's tokens sit: the rotary table of its positions, where its documents
/// attend only within their own the first key each token attends (see
/// [`Workspace::set_first_keys`]), and in a model with sliding-window layers the first key
/// each token attends in those (its window's, or its document's where that is later).
struct PositionBufs<B: Backend> {
    rope: RopeTables<B>,
    first_keys: Option<B::Ids>,
    window: Option<(usize, B::Ids)>,
}

impl<B: Backend> PositionBufs<B> {
    fn of<'a>(&'a self, be: &B) -> Positions<'a, B> {
        let (rope, local_rope) = self.rope.views_from(be, 0);
        Positions {
            rope,
            local_rope,
            first_keys: self.first_keys.as_ref(),
            window_keys: self.window.as_ref().map(|(_, keys)| keys),
        }
    }
}

/// The activation buffers of one micro-batch shape, allocated once and reused each step, and
/// the scratch of its calls, which a rank's micro-batches in flight share (see
/// [`Workspace::without_scratch`]).
pub struct Workspace<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    /// Tokens of the micro-batch (`batch x seq`).
    rows: usize,
    /// Rows of logits made at a time (see [`Model::loss_chunk`]).
    loss_chunk: usize,
    /// The residual stream entering each block, and leaving the last (`blocks + 1`): this
    /// shard's tokens of it under sequence parallelism, all of them otherwise.
    res: Vec<B::Buf>,
    /// Saved activations per block; None for a block recomputed in backward.
    acts: Vec<Option<BlockActs<B>>>,
    /// The final norm's activations (last stage only).
    norm_f: Option<NormActs<B>>,
    /// The gradient of the residual stream: where a stage receives its output's gradient
    /// and leaves its input's.
    dres: B::Buf,
    /// The gradient of a norm's output; on the last stage, from the loss to backward, the
    /// head input's gradient (without sequence parallelism).
    dnorm: B::Buf,
    /// The gradient of a post-norm's input, a mixer's output (models with post-norms only).
    dpost: Option<B::Buf>,
    /// The gradient of a block's branch, muP's residual multiplier times `dres` (models with
    /// one other than 1 only).
    dbranch: Option<B::Buf>,
    /// Under sequence parallelism on the last stage, from the loss to backward, the head
    /// input's gradient for all the micro-batch's tokens, before the reduce-scatter.
    dhead: Option<B::Buf>,
    positions: PositionBufs<B>,
    /// None while another workspace holds it (see [`Workspace::without_scratch`]).
    scratch: Option<Scratch<B>>,
}

impl<B: Backend> Workspace<B> {
    /// Where a stage after the first receives its input activations.
    pub fn input_mut(&mut self) -> &mut B::Buf {
        &mut self.res[0]
    }

    /// A stage's output activations, to send to the next stage.
    pub fn output(&self) -> &B::Buf {
        self.res.last().expect("a residual stream")
    }

    /// Where a stage before the last receives the gradient of its output.
    pub fn output_grad_mut(&mut self) -> &mut B::Buf {
        &mut self.dres
    }

    /// After backward, the gradient of the stage's input, to send to the previous stage.
    pub fn input_grad(&self) -> &B::Buf {
        &self.dres
    }

    pub fn new(be: &B, model: &Model, batch: usize, seq: usize) -> Result<Self> {
        Self::with_options(be, model, MicroBatch::new(batch, seq))
    }

    /// Gives the workspace the scratch for its calls: one made for its model (among others)
    /// and micro-batch shape. Every call finishes with nothing left in the scratch, so only
    /// one call at a time must use it; on a GPU, calls queue on one stream and run in turn.
    pub fn give_scratch(&mut self, scratch: Scratch<B>) {
        debug_assert!(self.scratch.is_none(), "a workspace given a second scratch");
        self.scratch = Some(scratch);
    }

    /// Has the micro-batch's attention start each query's keys at `first_keys` (`[batch x
    /// seq]`, non-decreasing along each sequence, at most the token's position: what
    /// `ondol_core::backend::document_starts` gives for packed documents), or at 0 with None.
    /// Forward and backward (and its recomputation) read it until it is set again.
    pub fn set_first_keys(&mut self, be: &B, first_keys: Option<&[u32]>) {
        let p = &mut self.positions;
        if first_keys.is_none() && p.first_keys.is_none() {
            return; // (the windows' first keys are already their own)
        }
        if let Some((w, keys)) = &mut p.window {
            be.write_ids(keys, &window_first_keys(*w, self.seq, first_keys, self.rows));
        }
        match (first_keys, &mut p.first_keys) {
            (None, _) => p.first_keys = None,
            (Some(f), Some(buf)) => be.write_ids(buf, f),
            (Some(f), None) => p.first_keys = Some(be.upload_ids(f)),
        }
    }

    /// Takes the scratch back, if this workspace holds it.
    pub fn take_scratch(&mut self) -> Option<Scratch<B>> {
        self.scratch.take()
    }

    /// The scratch, which this workspace must hold for a call.
    fn scratch(scratch: &mut Option<Scratch<B>>) -> &mut Scratch<B> {
        scratch.as_mut().expect("the workspace at work holds the scratch (Workspace::give_scratch)")
    }

    /// The rows of each of the loss's chunks.
    fn loss_chunks(&self) -> Vec<Range<usize>> {
        (0..self.rows).step_by(self.loss_chunk).map(|r| r..(r + self.loss_chunk).min(self.rows)).collect()
    }

    /// A workspace for micro-batches of shape `mb`, with a scratch of its own.
    pub fn with_options(be: &B, model: &Model, mb: MicroBatch) -> Result<Self> {
        let mut ws = Self::without_scratch(be, model, mb)?;
        ws.give_scratch(Scratch::new(be, &[model], mb));
        Ok(ws)
    }

    /// A workspace with no [`Scratch`] of its own, for a rank whose workspaces (several
    /// micro-batches in flight, several model chunks) share one: the micro-batches hold
    /// their own activations but need the buffers of a call only one at a time. Before each
    /// call the workspace at work is given the scratch ([`Workspace::give_scratch`]).
    pub fn without_scratch(be: &B, model: &Model, mb: MicroBatch) -> Result<Self> {
        let MicroBatch { batch, seq, recompute_every, loss_chunk } = mb;
        let cfg = &model.cfg;
        if seq == 0 || seq > cfg.max_seq_len {
            return Err(ondol_core::Error::config(
                "training.seq_len",
                format!("{seq} must be between 1 and model.max_seq_len = {}", cfg.max_seq_len),
            ));
        }
        let (rows, d) = (batch * seq, cfg.d_model);
        let part = &model.part;
        if part.sequence_parallel && !rows.is_multiple_of(part.tp) {
            return Err(ondol_core::Error::config(
                "parallelism.sequence_parallel",
                format!(
                    "tp = {} must divide the tokens of a micro-batch ({batch} sequences x {seq} = {rows}); \
                     change the micro-batch size or seq_len, or turn sequence parallelism off",
                    part.tp
                ),
            ));
        }
        // Rows of the residual stream and the norms on this shard.
        let stream = part.stream_rows(rows).len();
        let blocks = &model.blocks;
        Ok(Self {
            batch,
            seq,
            rows,
            loss_chunk: model.loss_chunk(rows, loss_chunk),
            res: (0..=blocks.len()).map(|_| be.zeros(stream * d)).collect(),
            acts: (0..blocks.len())
                .map(|i| (!model.recomputed(i, recompute_every)).then(|| model.block_acts(be, &blocks[i], batch, seq)))
                .collect(),
            norm_f: model.head.is_some().then(|| NormActs::new(be, stream, d, model.layernorm())),
            dres: be.zeros(stream * d),
            dnorm: be.zeros(stream * d),
            dpost: model.has_post_norms().then(|| be.zeros(stream * d)),
            dbranch: model.scales_branches().then(|| be.zeros(stream * d)),
            dhead: (part.sequence_parallel && model.head.is_some()).then(|| be.zeros(rows * d)),
            positions: PositionBufs {
                rope: RopeTables::new(be, model, seq),
                first_keys: None,
                window: cfg.sliding_window.map(|w| (w, be.upload_ids(&window_first_keys(w, seq, None, rows)))),
            },
            scratch: None,
        })
    }
}
