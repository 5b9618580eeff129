//! Every CPU op against a plain reference (forward) and central finite differences
//! (backward). Shapes are deliberately awkward: odd widths, sequences longer than the
//! attention block and not a multiple of it, grouped-query heads.

use ondol_core::AdamWParams;
use ondol_core::backend::{Activation, AttnShape, Backend, Gemm, LogitColumns, rope_table};
use ondol_core::gradcheck::{check, dot, randn};
use ondol_cpu::CpuBackend;

const BE: CpuBackend = CpuBackend;

/// Tolerances for f32 forward passes differenced at step H.
const H: f32 = 1e-2;
const RTOL: f64 = 1e-2;
const ATOL: f64 = 1e-3;

fn naive_gemm(g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    for bi in 0..g.batch {
        for i in 0..g.m {
            for j in 0..g.n {
                let mut acc = 0.0f64;
                for p in 0..g.k {
                    let av =
                        if g.trans_a { a[bi * g.stride_a + p * g.m + i] } else { a[bi * g.stride_a + i * g.k + p] };
                    let bv =
                        if g.trans_b { b[bi * g.stride_b + j * g.k + p] } else { b[bi * g.stride_b + p * g.n + j] };
                    acc += av as f64 * bv as f64;
                }
                let c = &mut c[bi * g.stride_c + i * g.n + j];
                *c = (g.alpha as f64 * acc + g.beta as f64 * *c as f64) as f32;
            }
        }
    }
}

#[test]
fn gemm_matches_naive_for_every_transpose_batch_and_accumulate() {
    let (m, n, k, batch) = (37, 29, 45, 3);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        for beta in [0.0, 1.0, 0.5] {
            let mut g = Gemm::new(m, n, k, ta, tb);
            g.batch = batch;
            g.alpha = 0.7;
            g.beta = beta;
            let a = randn(batch * m * k, 1.0, 1);
            let b = randn(batch * k * n, 1.0, 2);
            let c0 = randn(batch * m * n, 1.0, 3);
            let (mut want, mut got) = (c0.clone(), c0.clone());
            naive_gemm(g, &a, &b, &mut want);
            BE.gemm(g, &a, &b, &mut got);
            for (w, x) in want.iter().zip(&got) {
                assert!((w - x).abs() < 1e-4 * (1.0 + w.abs()), "ta {ta} tb {tb} beta {beta}: {w} vs {x}");
            }
        }
    }
}

#[test]
fn bias_backward_is_the_column_sum() {
    let (rows, cols) = (131, 7);
    let dy = randn(rows * cols, 1.0, 4);
    let mut db = vec![0.5f32; cols];
    BE.bias_backward(&dy, &mut db, cols);
    for c in 0..cols {
        let want: f32 = 0.5 + (0..rows).map(|r| dy[r * cols + c]).sum::<f32>();
        assert!((db[c] - want).abs() < 1e-4, "column {c}");
    }
}

#[test]
fn embedding_backward_matches_finite_differences() {
    let (vocab, dim, seq) = (11, 6, 5);
    let ids: Vec<u32> = vec![3, 1, 3, 10, 0, 3, 7, 7, 2, 1];
    let w = randn(ids.len() * dim, 1.0, 5);
    let mut table = randn(vocab * dim, 1.0, 6);
    let mut pos = randn(seq * dim, 1.0, 7);
    let mut out = vec![0.0; ids.len() * dim];
    let (mut dtable, mut dpos) = (vec![0.0; table.len()], vec![0.0; pos.len()]);
    BE.embedding_backward(&ids, &w, &mut dtable, 0, dim);
    BE.position_embedding_backward(&w, &mut dpos, seq, dim);
    let p = pos.clone();
    check(
        &mut table,
        &dtable,
        |t| {
            BE.embedding_forward(&ids, t, 0, Some((&p, seq)), &mut out, dim);
            dot(&w, &out)
        },
        H,
        RTOL,
        ATOL,
        usize::MAX,
        0,
    )
    .assert_ok("embedding table");
    let t = table.clone();
    check(
        &mut pos,
        &dpos,
        |p| {
            BE.embedding_forward(&ids, &t, 0, Some((p, seq)), &mut out, dim);
            dot(&w, &out)
        },
        H,
        RTOL,
        ATOL,
        usize::MAX,
        0,
    )
    .assert_ok("position table");
}

#[test]
fn rmsnorm_backward_matches_finite_differences_and_accumulates() {
    let (rows, dim) = (9, 13);
    let mut x = randn(rows * dim, 1.0, 8);
    let mut w = randn(dim, 1.0, 9);
    let dout = randn(rows * dim, 1.0, 10);
    let (mut out, mut rstd) = (vec![0.0; x.len()], vec![0.0; rows]);
    BE.rmsnorm_forward(&x, &w, &mut out, &mut rstd, dim, 1e-5);
    // Pre-filled gradients: the op must add to them, not overwrite.
    let (dx0, dw0) = (randn(x.len(), 1.0, 11), randn(dim, 1.0, 12));
    let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
    BE.rmsnorm_backward(&dout, &x, &w, &rstd, &mut dx, &mut dw, dim);
    let dx: Vec<f32> = dx.iter().zip(&dx0).map(|(a, b)| a - b).collect();
    let dw: Vec<f32> = dw.iter().zip(&dw0).map(|(a, b)| a - b).collect();
    let w0 = w.clone();
    check(
        &mut x,
        &dx,
        |x| {
            BE.rmsnorm_forward(x, &w0, &mut out, &mut rstd, dim, 1e-5);
            dot(&dout, &out)
        },
        H,
        RTOL,
        ATOL,
        usize::MAX,
        0,
    )
    .assert_ok("rmsnorm dx");
    let x0 = x.clone();
    check(
        &mut w,
        &dw,
        |w| {
            BE.rmsnorm_forward(&x0, w, &mut out, &mut rstd, dim, 1e-5);
            dot(&dout, &out)
        },
        H,
        RTOL,
        ATOL,
        usize::MAX,
        0,
    )
    .assert_ok("rmsnorm dw");
}

/// Qwen3's q and k norms over a fused qkv buffer: d(qkv) in place (v's heads pass through) and
/// the two weights' gradients, which accumulate.
#[test]
fn qk_norm_backward_matches_finite_differences_and_accumulates() {
    let s = shape(2, 3, 4, 2, 6);
    let n = s.rows() * s.qkv_width();
    let mut x = randn(n, 1.0, 21);
    let mut w = randn(2 * s.head_dim, 1.0, 22);
    let dout = randn(n, 1.0, 23);
    let normed = s.rows() * (s.n_heads + s.n_kv_heads);
    let (mut out, mut rstd) = (vec![0.0; n], vec![0.0; normed]);
    BE.qk_norm_forward(&x, &w, &mut out, &mut rstd, s, 1e-5);
    let dw0 = randn(w.len(), 1.0, 24);
    let (mut dx, mut dw) = (dout.clone(), dw0.clone());
    BE.qk_norm_backward(&mut dx, &x, &w, &rstd, &mut dw, s);
    let dw: Vec<f32> = dw.iter().zip(&dw0).map(|(a, b)| a - b).collect();
    let loss = |x: &[f32], w: &[f32]| {
        let (mut out, mut rstd) = (vec![0.0; n], vec![0.0; normed]);
        BE.qk_norm_forward(x, w, &mut out, &mut rstd, s, 1e-5);
        dot(&dout, &out)
    };
    let w0 = w.clone();
    check(&mut x, &dx, |x| loss(x, &w0), H, RTOL, ATOL, usize::MAX, 0).assert_ok("qk_norm dqkv");
    let x0 = x.clone();
    check(&mut w, &dw, |w| loss(&x0, w), H, RTOL, ATOL, usize::MAX, 0).assert_ok("qk_norm dweight");
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    let (rows, dim) = (70, 11);
    let mut x = randn(rows * dim, 1.0, 13);
    let mut w = randn(dim, 1.0, 14);
    let mut b = randn(dim, 1.0, 15);
    let dout = randn(rows * dim, 1.0, 16);
    let (mut out, mut mean, mut rstd) = (vec![0.0; x.len()], vec![0.0; rows], vec![0.0; rows]);
    BE.layernorm_forward(&x, &w, &b, &mut out, &mut mean, &mut rstd, dim, 1e-5);
    let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; dim], vec![0.0; dim]);
    BE.layernorm_backward(&dout, &x, &w, &mean, &rstd, &mut dx, &mut dw, &mut db, dim);
    let (w0, b0) = (w.clone(), b.clone());
    check(
        &mut x,
        &dx,
        |x| {
            BE.layernorm_forward(x, &w0, &b0, &mut out, &mut mean, &mut rstd, dim, 1e-5);
            dot(&dout, &out)
        },
        H,
        RTOL,
        ATOL,
        200,
        1,
    )
    .assert_ok("layernorm dx");
    let x0 = x.clone();
    check(
        &mut w,
        &dw,
        |w| {
            BE.layernorm_forward(&x0, w, &b0, &mut out, &mut mean, &mut rstd, dim, 1e-5);
            dot(&dout, &out)
        },
        H,
        RTOL,
        ATOL,
        usize::MAX,
        0,
    )
    .assert_ok("layernorm dw");
    check(
        &mut b,
        &db,
        |b| {
            BE.layernorm_forward(&x0, &w0, b, &mut out, &mut mean, &mut rstd, dim, 1e-5);
            dot(&dout, &out)
        },
        H,
        RTOL,
        ATOL,
        usize::MAX,
        0,
    )
    .assert_ok("layernorm db");
}

fn shape(batch: usize, seq: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> AttnShape {
    AttnShape { batch, seq, n_heads, n_kv_heads, head_dim }
}

/// With q scaled too (muP's attention multiplier): the backward scales the same.
#[test]
fn rope_backward_is_the_inverse_rotation() {
    let s = shape(2, 7, 4, 2, 6);
    let table = rope_table(s.seq, s.head_dim, 10_000.0);
    let mut x = randn(s.rows() * s.qkv_width(), 1.0, 17);
    let w = randn(x.len(), 1.0, 18);
    let mut grad = w.clone();
    BE.rope(&mut grad, &table, s, true, 0.75);
    check(
        &mut x,
        &grad,
        |x| {
            let mut y = x.to_vec();
            BE.rope(&mut y, &table, s, false, 0.75);
            dot(&w, &y)
        },
        H,
        RTOL,
        ATOL,
        usize::MAX,
        0,
    )
    .assert_ok("rope");
    // v heads pass through untouched; k heads are not scaled (at position 0, not rotated either).
    let mut y = x.clone();
    BE.rope(&mut y, &table, s, false, 0.75);
    let (k0, q) = (s.n_heads * s.head_dim, &x[..s.n_heads * s.head_dim]);
    assert_eq!(&y[k0..k0 + s.n_kv_heads * s.head_dim], &x[k0..k0 + s.n_kv_heads * s.head_dim]);
    assert!(y[..k0].iter().zip(q).all(|(a, b)| *a == 0.75 * b));
    let v0 = (s.n_heads + s.n_kv_heads) * s.head_dim;
    for r in 0..s.rows() {
        let row = r * s.qkv_width();
        assert_eq!(&y[row + v0..row + s.qkv_width()], &x[row + v0..row + s.qkv_width()]);
    }
}

/// Attention computed the obvious way, in f64, for the forward check: query i over keys
/// `first_keys[b T + i]..=i` (0.. without).
fn naive_attention(qkv: &[f32], s: AttnShape, first_keys: Option<&[u32]>) -> Vec<f32> {
    let (t, d, w) = (s.seq, s.head_dim, s.qkv_width());
    let mut out = vec![0.0f32; s.rows() * s.q_width()];
    for b in 0..s.batch {
        for h in 0..s.n_heads {
            let g = h / (s.n_heads / s.n_kv_heads);
            let (qc, kc, vc) = (h * d, (s.n_heads + g) * d, (s.n_heads + s.n_kv_heads + g) * d);
            for i in 0..t {
                let qi = &qkv[(b * t + i) * w + qc..][..d];
                let first = first_keys.map_or(0, |f| f[b * t + i] as usize);
                let scores: Vec<f64> = (first..=i)
                    .map(|j| {
                        let kj = &qkv[(b * t + j) * w + kc..][..d];
                        qi.iter().zip(kj).map(|(a, c)| *a as f64 * *c as f64).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for e in 0..d {
                    let o: f64 = (first..=i)
                        .map(|j| (scores[j - first] - max).exp() / z * qkv[(b * t + j) * w + vc + e] as f64)
                        .sum();
                    out[(b * t + i) * s.q_width() + h * d + e] = o as f32;
                }
            }
        }
    }
    out
}

#[test]
fn attention_forward_matches_naive_and_backward_matches_finite_differences() {
    // seq 70 spans two query blocks of 64 and is not a multiple of either; 4 query heads
    // share 2 kv heads.
    let s = shape(2, 70, 4, 2, 8);
    let mut qkv = randn(s.rows() * s.qkv_width(), 1.0, 19);
    let (mut out, mut lse) = (vec![0.0; s.rows() * s.q_width()], vec![0.0; s.batch * s.n_heads * s.seq]);
    BE.attention_forward(&qkv, &mut out, &mut lse, s, None);
    let want = naive_attention(&qkv, s, None);
    for (i, (a, b)) in out.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 1e-5, "attention output {i}: {a} vs {b}");
    }
    let dout = randn(out.len(), 1.0, 20);
    let mut dqkv = vec![f32::NAN; qkv.len()]; // backward must overwrite every element
    BE.attention_backward(&dout, &qkv, &out, &lse, &mut dqkv, s, None);
    check(
        &mut qkv,
        &dqkv,
        |x| {
            BE.attention_forward(x, &mut out, &mut lse, s, None);
            dot(&dout, &out)
        },
        H,
        RTOL,
        ATOL,
        600,
        2,
    )
    .assert_ok("attention dqkv");
}

/// Documents packed into sequences: each query attends from its document's start, which
/// falls inside a block of queries, on a block's edge, at a sequence's start, or not at all.
#[test]
fn attention_within_documents_matches_naive_and_finite_differences() {
    const EOT: u32 = 9;
    let s = shape(2, 150, 4, 2, 8);
    let mut ids = vec![1u32; s.rows()];
    for at in [5, 63, 64, 100, 149, 150, 151, 290] {
        ids[at] = EOT;
    }
    let first_keys = ondol_core::backend::document_starts(&ids, s.seq, EOT);
    assert_eq!((first_keys[62], first_keys[63], first_keys[150], first_keys[152]), (5, 63, 0, 1));
    let f = Some(&first_keys);
    let mut qkv = randn(s.rows() * s.qkv_width(), 1.0, 23);
    let (mut out, mut lse) = (vec![0.0; s.rows() * s.q_width()], vec![0.0; s.batch * s.n_heads * s.seq]);
    BE.attention_forward(&qkv, &mut out, &mut lse, s, f);
    let want = naive_attention(&qkv, s, Some(&first_keys));
    for (i, (a, b)) in out.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 1e-5, "attention output {i}: {a} vs {b}");
    }
    let dout = randn(out.len(), 1.0, 24);
    let mut dqkv = vec![f32::NAN; qkv.len()];
    BE.attention_backward(&dout, &qkv, &out, &lse, &mut dqkv, s, f);
    check(
        &mut qkv,
        &dqkv,
        |x| {
            BE.attention_forward(x, &mut out, &mut lse, s, f);
            dot(&dout, &out)
        },
        H,
        RTOL,
        ATOL,
        600,
        3,
    )
    .assert_ok("attention within documents dqkv");
}

#[test]
fn multi_query_attention_backward_matches_finite_differences() {
    let s = shape(1, 9, 3, 1, 4);
    let mut qkv = randn(s.rows() * s.qkv_width(), 1.0, 21);
    let (mut out, mut lse) = (vec![0.0; s.rows() * s.q_width()], vec![0.0; s.n_heads * s.seq]);
    BE.attention_forward(&qkv, &mut out, &mut lse, s, None);
    let dout = randn(out.len(), 1.0, 22);
    let mut dqkv = vec![0.0; qkv.len()];
    BE.attention_backward(&dout, &qkv, &out, &lse, &mut dqkv, s, None);
    check(
        &mut qkv,
        &dqkv,
        |x| {
            BE.attention_forward(x, &mut out, &mut lse, s, None);
            dot(&dout, &out)
        },
        H,
        RTOL,
        ATOL,
        usize::MAX,
        0,
    )
    .assert_ok("mqa dqkv");
}

#[test]
fn glu_and_activation_backwards_match_finite_differences() {
    let (rows, width) = (5, 9);
    let dout = randn(rows * width, 1.0, 24);
    let mut out = vec![0.0; rows * width];
    for act in [Activation::Silu, Activation::Gelu] {
        let mut gu = randn(rows * 2 * width, 1.5, 23);
        let mut dgu = vec![0.0; gu.len()];
        BE.glu_backward(act, &dout, &gu, &mut dgu, width);
        check(
            &mut gu,
            &dgu,
            |x| {
                BE.glu_forward(act, x, &mut out, width);
                dot(&dout, &out)
            },
            H,
            RTOL,
            ATOL,
            usize::MAX,
            0,
        )
        .assert_ok(&format!("glu {act:?}"));
    }

    for act in [Activation::Gelu, Activation::Relu2, Activation::Silu] {
        let mut x = randn(rows * width, 2.0, 25);
        let mut dx = vec![0.0; x.len()];
        BE.activation_backward(act, &dout, &x, &mut dx);
        check(
            &mut x,
            &dx,
            |x| {
                BE.activation_forward(act, x, &mut out);
                dot(&dout, &out)
            },
            H,
            RTOL,
            ATOL,
            usize::MAX,
            0,
        )
        .assert_ok(&format!("{act:?}"));
    }
}

/// Shards of the vocabulary (rows `first..end` of the table each) sum to the whole lookup, and
/// their scatter-adds are the whole one's rows: the vocab-parallel embedding.
#[test]
fn vocab_shards_of_the_embedding_add_up_to_the_whole_table() {
    let (vocab, dim) = (11, 5);
    let ids: Vec<u32> = vec![3, 1, 3, 10, 0, 3, 7, 7, 2, 1, 5, 6];
    let table = randn(vocab * dim, 1.0, 8);
    let dout = randn(ids.len() * dim, 1.0, 9);
    let mut whole = vec![0.0; ids.len() * dim];
    BE.embedding_forward(&ids, &table, 0, None, &mut whole, dim);
    let mut dwhole = vec![0.0; table.len()];
    BE.embedding_backward(&ids, &dout, &mut dwhole, 0, dim);
    let mut sum = vec![0.0; whole.len()];
    for (first, end) in [(0, 4), (4, 8), (8, 11)] {
        let shard = &table[first * dim..end * dim];
        let mut out = vec![1.0; whole.len()];
        BE.embedding_forward(&ids, shard, first, None, &mut out, dim);
        sum.iter_mut().zip(&out).for_each(|(s, o)| *s += o);
        let mut dshard = vec![0.0; shard.len()];
        BE.embedding_backward(&ids, &dout, &mut dshard, first, dim);
        assert_eq!(dshard, dwhole[first * dim..end * dim], "rows {first}..{end}");
    }
    assert_eq!(sum, whole);
}

/// The vocab-parallel cross-entropy over `shards` (column ranges) of `logits` (rows `stride`
/// apart, `targets.len()` of them) gives the fused one's loss sum, `losses`, and its gradient,
/// `fused`, at `scale`.
fn assert_vocab_parallel_is_fused(
    logits: &[f32],
    stride: usize,
    targets: &[u32],
    shards: &[(usize, usize)],
    scale: f32,
    (fused, losses): (&[f32], &[f32]),
) {
    let targets = targets.to_vec();
    let column_shard =
        |(a, b): (usize, usize)| -> Vec<f32> { logits.chunks(stride).flat_map(|row| row[a..b].to_vec()).collect() };
    let stats: Vec<Vec<f32>> = shards
        .iter()
        .map(|&(a, b)| {
            let mut st = vec![1.0; 3 * targets.len()];
            BE.cross_entropy_stats(&column_shard((a, b)), &targets, 0, &mut st, a, LogitColumns::dense(b - a));
            st
        })
        .collect();
    let mut lse = vec![0.0; targets.len()];
    let loss = ondol_core::backend::combine_ce_stats(&stats.iter().map(Vec::as_slice).collect::<Vec<_>>(), &mut lse);
    let want: f64 = losses.iter().map(|&l| l as f64).sum();
    assert!((loss - want).abs() < 1e-5 * want, "loss {loss} vs fused {want}");
    for &(a, b) in shards {
        let mut grad = column_shard((a, b));
        BE.cross_entropy_grad(&mut grad, &targets, 0, &lse, a, LogitColumns::dense(b - a), scale);
        for (r, row) in grad.chunks(b - a).enumerate() {
            for (c, g) in row.iter().enumerate() {
                let want = fused[r * stride + a + c];
                assert!((g - want).abs() < 1e-6, "row {r} column {}: {g} vs {want}", a + c);
            }
        }
    }
}

/// Three uneven vocab shards' statistics, combined, give the fused loss, and their gradients
/// are the fused gradient's columns.
#[test]
fn vocab_parallel_cross_entropy_equals_the_fused_one() {
    let (rows, vocab) = (7, 37);
    let targets: Vec<u32> = vec![0, 36, 5, 5, 17, 30, 12];
    let logits = randn(rows * vocab, 3.0, 28);
    let (mut fused, mut losses) = (logits.clone(), vec![0.0; rows]);
    BE.cross_entropy(&mut fused, &targets, 0, &mut losses, LogitColumns::dense(vocab), Some(0.25));
    assert_vocab_parallel_is_fused(&logits, vocab, &targets, &[(0, 13), (13, 26), (26, 37)], 0.25, (&fused, &losses));
}

/// A row whose target is ignored has loss 0 and a zero gradient, fused and vocab-parallel,
/// and leaves the other rows as they were.
#[test]
fn ignored_targets_give_no_loss_and_no_gradient() {
    use ondol_core::IGNORED_TARGET;
    let (rows, vocab, stride, scale) = (5, 29, 32, 0.5);
    let columns = LogitColumns { vocab, stride };
    let logits = randn(rows * stride, 2.0, 31);
    let learned: Vec<u32> = vec![3, 28, 0, 11, 7];
    let mut targets = learned.clone();
    targets[1] = IGNORED_TARGET;
    targets[4] = IGNORED_TARGET;
    let fused = |targets: &[u32]| {
        let (mut grad, mut losses) = (logits.clone(), vec![0.0; rows]);
        BE.cross_entropy(&mut grad, &targets.to_vec(), 0, &mut losses, columns, Some(scale));
        (grad, losses)
    };
    let (grad, losses) = fused(&targets);
    let (all_grad, all_losses) = fused(&learned);
    for r in 0..rows {
        let row = &grad[r * stride..][..stride];
        if targets[r] == IGNORED_TARGET {
            assert_eq!(losses[r], 0.0, "row {r}");
            assert!(row.iter().all(|&g| g == 0.0), "row {r}: {row:?}");
        } else {
            assert_eq!(losses[r], all_losses[r], "row {r}");
            assert_eq!(row, &all_grad[r * stride..][..stride], "row {r}");
        }
    }
    assert_vocab_parallel_is_fused(&logits, stride, &targets, &[(0, 12), (12, vocab)], scale, (&grad, &losses));
}

/// Rows padded with columns that are no token's (a padded head's) give the losses, statistics
/// and gradients of the dense rows, and the gradient is zero in the padding: fused and
/// vocab-parallel alike.
#[test]
fn padded_logit_rows_are_the_dense_ones() {
    let (rows, vocab, stride) = (5, 37, 48);
    let targets: Vec<u32> = vec![0, 36, 5, 17, 30];
    let dense = randn(rows * vocab, 3.0, 30);
    let pad = |rows: &[f32], value: f32| -> Vec<f32> {
        rows.chunks(vocab).flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(value, stride - vocab))).collect()
    };
    // Large padding: read by mistake, it would swamp the softmax.
    let padded = pad(&dense, 50.0);
    let (dense_cols, padded_cols) = (LogitColumns::dense(vocab), LogitColumns { vocab, stride });

    let (mut want, mut want_losses) = (dense.clone(), vec![0.0; rows]);
    BE.cross_entropy(&mut want, &targets, 0, &mut want_losses, dense_cols, Some(0.5));
    let (mut got, mut losses) = (padded.clone(), vec![0.0; rows]);
    BE.cross_entropy(&mut got, &targets, 0, &mut losses, padded_cols, Some(0.5));
    assert_eq!(losses, want_losses);
    assert_eq!(got, pad(&want, 0.0));

    let (mut want_stats, mut stats) = (vec![0.0; 3 * rows], vec![0.0; 3 * rows]);
    BE.cross_entropy_stats(&dense, &targets, 0, &mut want_stats, 0, dense_cols);
    BE.cross_entropy_stats(&padded, &targets, 0, &mut stats, 0, padded_cols);
    assert_eq!(stats, want_stats);
    let lse: Vec<f32> =
        want_losses.iter().zip(&targets).enumerate().map(|(r, (l, &t))| l + dense[r * vocab + t as usize]).collect();
    let (mut want, mut got) = (dense.clone(), padded);
    BE.cross_entropy_grad(&mut want, &targets, 0, &lse, 0, dense_cols, 0.5);
    BE.cross_entropy_grad(&mut got, &targets, 0, &lse, 0, padded_cols, 0.5);
    assert_eq!(got, pad(&want, 0.0));
}

#[test]
fn cross_entropy_loss_and_gradient() {
    let (rows, vocab) = (6, 37);
    let targets: Vec<u32> = vec![0, 36, 5, 5, 17, 30];
    let mut logits = randn(rows * vocab, 3.0, 26);
    let mut losses = vec![0.0; rows];
    // Reference loss in f64.
    for r in 0..rows {
        let row = &logits[r * vocab..][..vocab];
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + row.iter().map(|v| (*v as f64 - max).exp()).sum::<f64>().ln();
        let mut l = logits.clone();
        BE.cross_entropy(&mut l, &targets, 0, &mut losses, LogitColumns::dense(vocab), None);
        assert!((losses[r] as f64 - (lse - row[targets[r] as usize] as f64)).abs() < 1e-5);
    }
    let mut grad = logits.clone();
    BE.cross_entropy(&mut grad, &targets, 0, &mut losses, LogitColumns::dense(vocab), Some(0.5));
    check(
        &mut logits,
        &grad,
        |x| {
            let mut l = x.to_vec();
            BE.cross_entropy(&mut l, &targets, 0, &mut losses, LogitColumns::dense(vocab), None);
            0.5 * losses.iter().map(|v| *v as f64).sum::<f64>()
        },
        H,
        RTOL,
        ATOL,
        usize::MAX,
        0,
    )
    .assert_ok("cross-entropy");
}

#[test]
fn adamw_matches_a_scalar_reference() {
    let n = 40_001; // more than one parallel chunk, not a multiple of it
    let mut p = randn(n, 1.0, 27);
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    // A compute copy (as a mixed-precision run passes one) must receive the updated params.
    let mut copy = vec![0.0f32; n];
    let (mut rp, mut rm, mut rv): (Vec<f64>, Vec<f64>, Vec<f64>) =
        (p.iter().map(|x| *x as f64).collect(), vec![0.0; n], vec![0.0; n]);
    for step in 1..=3u64 {
        let g = randn(n, 1.0, 100 + step);
        let hp = AdamWParams { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.5 };
        BE.adamw(&mut p, &g, &mut m, &mut v, hp, (step == 3).then_some(&mut copy[..]));
        for i in 0..n {
            let gi = g[i] as f64 * 0.5;
            rm[i] = 0.9 * rm[i] + 0.1 * gi;
            rv[i] = 0.95 * rv[i] + 0.05 * gi * gi;
            let mhat = rm[i] / (1.0 - 0.9f64.powi(step as i32));
            let vhat = rv[i] / (1.0 - 0.95f64.powi(step as i32));
            rp[i] = rp[i] * (1.0 - 1e-2 * 0.1) - 1e-2 * mhat / (vhat.sqrt() + 1e-8);
        }
    }
    for i in 0..n {
        assert!((p[i] as f64 - rp[i]).abs() < 1e-5, "param {i}: {} vs {}", p[i], rp[i]);
    }
    assert_eq!(copy, p, "the compute copy holds the updated parameters");
}

#[test]
fn reductions_are_deterministic_and_accurate() {
    let x = randn(100_003, 1.0, 28);
    let want: f64 = x.iter().map(|v| (*v as f64).powi(2)).sum();
    let a = BE.sum_squares(&x);
    assert!((a - want).abs() < 1e-9 * want);
    assert_eq!(a.to_bits(), BE.sum_squares(&x).to_bits());
}
