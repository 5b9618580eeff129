//! Every op of the CUDA backend against the CPU reference, through the backend contract, on
//! random inputs of awkward sizes (not multiples of a block or a tile), computing in f32
//! (agreement to f32 round-off) and in bf16 (inputs rounded to bf16 on both sides; the
//! tolerance covers bf16 outputs). Each check prints its worst error. Every test runs on the
//! SIMT emulator (the same kernels compiled for the CPU: f32 with each block's threads in
//! order, bf16 in reverse order), and on the GPU where there is one; without a GPU it says so,
//! and fails if ONDOL_REQUIRE_GPU is set, as the GPU bundle's run.sh sets it.

use ondol_core::backend::{AttnShape, Gemm, LogitColumns, document_starts, rope_table, window_first_keys};
use ondol_core::bf16;
use ondol_core::{Activation, AdamWParams, Backend, IGNORED_TARGET, Rng, ScanInputs, SsdInputs};
use ondol_cpu::CpuBackend;
use ondol_cuda::{CudaBackend, Dtype, SSD_MAX_CHUNK};

/// The shared memory a block of the GPUs with the least (sm_86, sm_89, sm_120: 99 KiB).
const SMALLEST_SHARED: u32 = 99 << 10;

/// Whether the GPU alone is tested: under ONDOL_REQUIRE_GPU (the GPU bundle), where CI has
/// already run the emulator and device time is scarce.
fn gpu_only() -> bool {
    std::env::var_os("ONDOL_REQUIRE_GPU").is_some()
}

/// GPU 0 computing in `dtype`, or None (said on stderr) where there is none; under
/// [`gpu_only`] no GPU is a failure.
fn gpu(dtype: Dtype) -> Option<CudaBackend> {
    match CudaBackend::open(0, dtype) {
        Ok(be) => Some(be),
        Err(e) if gpu_only() => panic!("ONDOL_REQUIRE_GPU is set: {e}"),
        Err(e) => {
            eprintln!("GPU skipped: {e}");
            None
        }
    }
}

/// The backend on the emulator (bf16 standing for a GPU with the least shared memory; not
/// under [`gpu_only`]), then on GPU 0 computing in f32 and in bf16 if there is one.
fn backends() -> Vec<CudaBackend> {
    let mut out = match gpu_only() {
        true => Vec::new(),
        false => vec![
            CudaBackend::emulated(Dtype::F32, false),
            CudaBackend::emulated_with_shared_memory(Dtype::Bf16, true, SMALLEST_SHARED),
        ],
    };
    if let Some(f32_gpu) = gpu(Dtype::F32) {
        out.push(f32_gpu);
        out.extend(gpu(Dtype::Bf16));
    }
    out
}

const CPU: CpuBackend = CpuBackend;

/// Worst error allowed, relative to the largest reference value.
fn tolerance(be: &CudaBackend) -> f32 {
    match be.compute_type() {
        Dtype::F32 => 2e-5,
        Dtype::Bf16 => 2e-2,
    }
}

/// `x` as the backend's compute type holds it.
fn round(be: &CudaBackend, x: &[f32]) -> Vec<f32> {
    match be.compute_type() {
        Dtype::F32 => x.to_vec(),
        Dtype::Bf16 => x.iter().map(|&v| bf16::to_f32(bf16::from_f32(v))).collect(),
    }
}

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| scale * rng.normal() as f32).collect()
}

/// Asserts `got` matches `want` to `tol` relative to want's largest magnitude; prints the error.
fn assert_close(what: &str, be: &CudaBackend, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let worst = ondol_core::gradcheck::max_abs_diff(got, want);
    let kind = format!("{what} ({:?}, {})", be.compute_type(), be.device_name());
    eprintln!("{kind:<72} max abs error {worst:.3e}  relative {:.3e}  (tolerance {tol:.0e})", worst / scale);
    assert!(worst <= tol * scale, "{kind}: max error {worst} against largest value {scale}");
}

/// Awkward shapes, and the degenerate ones (one row, one column, a sum of one) for which
/// cuBLASLt's heuristic has been seen to have no algorithm; through the GEMM library and
/// through gemm.cu's CUDA-core kernel, which runs where it has none.
#[test]
fn gemm_matches_the_cpu_for_every_transpose_batch_and_offset() {
    let shapes = [(37, 53, 71, 3), (1, 53, 71, 1), (37, 1, 71, 2), (37, 53, 1, 1)];
    let cuda_cores = backends().into_iter().map(|be| (be.without_blas_gemms(), "gemm.cu"));
    let all: Vec<_> = backends().into_iter().map(|be| (be, "library")).chain(cuda_cores).collect();
    for ((be, path), (m, n, k, batch)) in all.iter().flat_map(|be| shapes.map(|s| (be, s))) {
        // beta = 0 must not read C: it starts as NaN there.
        for (trans_a, trans_b, beta) in [(false, false, 0.3), (true, false, 0.3), (false, true, 0.3), (true, true, 0.0)]
        {
            let g = Gemm {
                alpha: 0.7,
                beta,
                batch,
                stride_a: m * k + 5,
                stride_b: k * n + 3,
                stride_c: m * n + 1,
                ..Gemm::new(m, n, k, trans_a, trans_b)
            };
            // Odd offsets into larger buffers: views of a flat buffer are rarely aligned.
            let a = round(be, &random(batch * g.stride_a + 1, 1, 1.0));
            let b = round(be, &random(batch * g.stride_b + 3, 2, 1.0));
            let mut c0 = round(be, &random(batch * g.stride_c + 7, 3, 1.0));
            let (ra, rb, rc) = (1..a.len(), 3..b.len(), 7..c0.len());
            if beta == 0.0 {
                for z in 0..batch {
                    let at = rc.start + z * g.stride_c;
                    c0[at..at + m * n].fill(f32::NAN);
                }
            }
            let mut want = c0.clone();
            CPU.gemm(g, &a[ra.clone()], &b[rb.clone()], &mut want[rc.clone()]);
            // The compute-type output, and (for bf16 inputs) the f32 output of weight gradients.
            for f32_out in [false, true] {
                let (da, db) = (be.upload(&a), be.upload(&b));
                let mut dc = if f32_out { be.upload_f32(&c0) } else { be.upload(&c0) };
                be.gemm(g, be.view(&da, ra.clone()), be.view(&db, rb.clone()), be.view_mut(&mut dc, rc.clone()));
                let tol = if f32_out || be.compute_type() == Dtype::F32 { 2e-5 } else { tolerance(be) };
                let what = format!("gemm ({path}) {m}x{n}x{k} x{batch} ta={trans_a} tb={trans_b} f32 out={f32_out}");
                // Values outside the view are untouched, so the whole buffer compares.
                assert_close(&what, be, &be.download(&dc), &want, tol);
            }
        }
    }
}

/// A linear layer's forward with its bias in the GEMM's epilogue (a 16-byte aligned bias) or
/// added after it (one at an odd offset), for both weight layouts, input at an odd offset.
#[test]
fn gemm_bias_matches_the_cpu() {
    for be in backends() {
        let (m, n, k) = (37, 53, 71);
        for (trans_b, bias_at) in [(false, 0), (true, 0), (false, 3)] {
            let g = Gemm::new(m, n, k, false, trans_b);
            let (a, w) = (round(&be, &random(m * k + 1, 1, 1.0)), round(&be, &random(k * n, 2, 1.0)));
            let bias = round(&be, &random(n + bias_at, 3, 1.0));
            let (ra, rb) = (1..a.len(), bias_at..bias.len());
            let mut want = vec![0.0; m * n];
            CPU.gemm_bias(g, &a[ra.clone()], &w, &bias[rb.clone()], &mut want);
            let (da, dw, db, mut dc) = (be.upload(&a), be.upload(&w), be.upload(&bias), be.zeros(m * n));
            be.gemm_bias(g, be.view(&da, ra), be.all(&dw), be.view(&db, rb), be.all_mut(&mut dc));
            let what = format!("gemm_bias tb={trans_b} bias at {bias_at}");
            assert_close(&what, &be, &be.download(&dc), &want, tolerance(&be));
        }
    }
}

/// A linear layer and its activation, forward and backward: GELU in the GEMM's epilogue
/// (rows of 64 values, aligned buffers) and as a pass of its own (rows of 53, a buffer at an
/// odd offset, squared ReLU), with and without a bias, for both weight layouts.
#[test]
fn gemm_activation_matches_the_cpu() {
    for be in backends() {
        let (m, k) = (37, 45);
        let cases = [
            (Activation::Gelu, 64, true, false, 0),
            (Activation::Gelu, 64, false, true, 0),
            (Activation::Gelu, 53, true, false, 0),
            (Activation::Gelu, 64, true, true, 1),
            (Activation::Relu2, 64, true, false, 0),
        ];
        for (act, n, with_bias, trans_b, offset) in cases {
            let what = format!("{act:?} n={n} bias={with_bias} tb={trans_b} offset={offset}");
            let g = Gemm::new(m, n, k, false, trans_b);
            let (x, w) = (round(&be, &random(m * k, 1, 1.0)), round(&be, &random(k * n, 2, 0.3)));
            let bias = round(&be, &random(n, 3, 1.0));
            let (mut want_pre, mut want_out) = (vec![0.0; m * n], vec![0.0; m * n]);
            CPU.gemm_activation(g, &x, &w, with_bias.then_some(&bias[..]), act, &mut want_pre, &mut want_out);
            let (dx, dw, db) = (be.upload(&x), be.upload(&w), be.upload(&bias));
            let (mut pre, mut out) = (be.zeros(m * n + offset), be.zeros(m * n));
            let bias_view = with_bias.then(|| be.all(&db));
            let pre_view = be.view_mut(&mut pre, offset..offset + m * n);
            be.gemm_activation(g, be.all(&dx), be.all(&dw), bias_view, act, pre_view, be.all_mut(&mut out));
            let pre = be.download(&pre)[offset..].to_vec();
            assert_close(&format!("gemm_activation pre {what}"), &be, &pre, &want_pre, tolerance(&be));
            assert_close(&format!("gemm_activation out {what}"), &be, &be.download(&out), &want_out, tolerance(&be));

            // Backward through the next layer's input: dy [m, k] x W2^T, W2 [n, k] (or [k, n]).
            let pre = round(&be, &want_pre);
            let gb = Gemm::new(m, n, k, false, !trans_b);
            let (dy, w2) = (round(&be, &random(m * k, 4, 1.0)), round(&be, &random(n * k, 5, 0.3)));
            let (mut want_dpre, mut scratch) = (vec![0.0; m * n], vec![0.0; m * n]);
            CPU.gemm_activation_backward(gb, &dy, &w2, act, &pre, &mut want_dpre, &mut scratch);
            let (ddy, dw2) = (be.upload(&dy), be.upload(&w2));
            let saved = be.upload(&[vec![0.0; offset], pre].concat());
            let (mut dpre, mut scratch) = (be.zeros(m * n), be.zeros(m * n));
            let (pre_view, dpre_view) = (be.view(&saved, offset..offset + m * n), be.all_mut(&mut dpre));
            be.gemm_activation_backward(
                gb,
                be.all(&ddy),
                be.all(&dw2),
                act,
                pre_view,
                dpre_view,
                be.all_mut(&mut scratch),
            );
            let what = format!("gemm_activation_backward {what}");
            assert_close(&what, &be, &be.download(&dpre), &want_dpre, tolerance(&be));
        }
    }
}

#[test]
fn elementwise_ops_match_the_cpu() {
    for be in backends() {
        let tol = tolerance(&be);
        let (rows, cols) = (29, 301);
        let x = round(&be, &random(rows * cols, 1, 1.0));
        let y = round(&be, &random(rows * cols, 2, 1.0));
        let bias = round(&be, &random(cols, 3, 1.0));

        let mut dx = be.upload(&x);
        be.add_assign(be.all_mut(&mut dx), be.all(&be.upload(&y)));
        be.scale(be.all_mut(&mut dx), -1.5);
        be.add_bias(be.all_mut(&mut dx), be.all(&be.upload(&bias)), cols);
        let mut want = x.clone();
        CPU.add_assign(&mut want, &y);
        CPU.scale(&mut want, -1.5);
        CPU.add_bias(&mut want, &bias, cols);
        assert_close("add_assign, scale, add_bias", &be, &be.download(&dx), &want, tol);

        let dbias0 = random(cols, 4, 1.0);
        let mut dbias = be.upload_f32(&dbias0);
        be.bias_backward(be.all(&be.upload(&y)), be.all_mut(&mut dbias), cols);
        let mut want = dbias0.clone();
        CPU.bias_backward(&y, &mut want, cols);
        assert_close("bias_backward", &be, &be.download(&dbias), &want, 2e-5);

        let mut filled = be.upload(&x);
        be.fill(be.view_mut(&mut filled, 5..rows * cols - 3), 0.25);
        let mut want = x.clone();
        CPU.fill(&mut want[5..rows * cols - 3], 0.25);
        assert_close("fill", &be, &be.download(&filled), &want, 0.0);

        let dy = be.upload(&y);
        let (sum, squares) = (be.sum(be.all(&dy)), be.sum_squares(be.all(&dy)));
        let (want_sum, want_squares) = (CPU.sum(&y), CPU.sum_squares(&y));
        eprintln!("sum {sum} vs {want_sum}; sum of squares {squares} vs {want_squares}");
        assert!((sum - want_sum).abs() <= 1e-4 * want_squares.sqrt(), "sum");
        assert!((squares - want_squares).abs() <= 1e-5 * want_squares, "sum of squares");
    }
}

#[test]
fn embeddings_match_the_cpu() {
    for be in backends() {
        let tol = tolerance(&be);
        let (vocab, dim, seq, rows, first_id) = (300usize, 77usize, 13usize, 39usize, 100usize);
        let ids: Vec<u32> = (0..rows).map(|r| ((r * 7919) % 450) as u32).collect();
        let table = round(&be, &random(vocab * dim, 1, 1.0));
        let pos = round(&be, &random(seq * dim, 2, 1.0));
        let dy = round(&be, &random(rows * dim, 3, 1.0));
        let gpu_ids = be.upload_ids(&ids);
        for with_pos in [false, true] {
            let mut out = be.zeros(rows * dim);
            let dpos_table = be.upload(&pos);
            let positions = with_pos.then(|| (be.all(&dpos_table), seq));
            be.embedding_forward(&gpu_ids, be.all(&be.upload(&table)), first_id, positions, be.all_mut(&mut out), dim);
            let mut want = vec![0.0; rows * dim];
            CPU.embedding_forward(&ids, &table, first_id, with_pos.then_some((&pos[..], seq)), &mut want, dim);
            assert_close(&format!("embedding_forward positions={with_pos}"), &be, &be.download(&out), &want, tol);
        }
        let dtable0 = random(vocab * dim, 4, 0.1);
        let mut dtable = be.upload_f32(&dtable0);
        be.embedding_backward(&gpu_ids, be.all(&be.upload(&dy)), be.all_mut(&mut dtable), first_id, dim);
        let mut want = dtable0.clone();
        CPU.embedding_backward(&ids, &dy, &mut want, first_id, dim);
        assert_close("embedding_backward", &be, &be.download(&dtable), &want, 2e-5);
        let mut dpos = be.zeros_f32(seq * dim);
        be.position_embedding_backward(be.all(&be.upload(&dy)), be.all_mut(&mut dpos), seq, dim);
        let mut want = vec![0.0; seq * dim];
        CPU.position_embedding_backward(&dy, &mut want, seq, dim);
        assert_close("position_embedding_backward", &be, &be.download(&dpos), &want, 2e-5);
    }
}

#[test]
fn norms_match_the_cpu() {
    for be in backends() {
        let tol = tolerance(&be);
        let (rows, dim, eps) = (37usize, 1000usize, 1e-5f32);
        let x = round(&be, &random(rows * dim, 1, 1.0));
        let w = round(&be, &random(dim, 2, 1.0));
        let b = round(&be, &random(dim, 3, 0.5));
        let dy = round(&be, &random(rows * dim, 4, 1.0));
        let dx0 = round(&be, &random(rows * dim, 5, 0.1));
        let dw0 = random(dim, 6, 0.1);
        let (gx, gw, gb, gdy) = (be.upload(&x), be.upload(&w), be.upload(&b), be.upload(&dy));

        let (mut out, mut rstd) = (be.zeros(rows * dim), be.zeros_f32(rows));
        be.rmsnorm_forward(be.all(&gx), be.all(&gw), be.all_mut(&mut out), be.all_mut(&mut rstd), dim, eps);
        let (mut want, mut want_rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
        CPU.rmsnorm_forward(&x, &w, &mut want, &mut want_rstd, dim, eps);
        assert_close("rmsnorm_forward", &be, &be.download(&out), &want, tol);
        assert_close("rmsnorm_forward rstd", &be, &be.download(&rstd), &want_rstd, 1e-5);
        let (mut dx, mut dw) = (be.upload(&dx0), be.upload_f32(&dw0));
        be.rmsnorm_backward(
            be.all(&gdy),
            be.all(&gx),
            be.all(&gw),
            be.all(&rstd),
            be.all_mut(&mut dx),
            be.all_mut(&mut dw),
            dim,
        );
        let (mut want_dx, mut want_dw) = (dx0.clone(), dw0.clone());
        CPU.rmsnorm_backward(&dy, &x, &w, &want_rstd, &mut want_dx, &mut want_dw, dim);
        assert_close("rmsnorm_backward dx", &be, &be.download(&dx), &want_dx, tol);
        assert_close("rmsnorm_backward dweight", &be, &be.download(&dw), &want_dw, 1e-4);

        let (mut out, mut mean, mut rstd) = (be.zeros(rows * dim), be.zeros_f32(rows), be.zeros_f32(rows));
        be.layernorm_forward(
            be.all(&gx),
            be.all(&gw),
            be.all(&gb),
            be.all_mut(&mut out),
            be.all_mut(&mut mean),
            be.all_mut(&mut rstd),
            dim,
            eps,
        );
        let (mut want, mut want_mean, mut want_rstd) = (vec![0.0; rows * dim], vec![0.0; rows], vec![0.0; rows]);
        CPU.layernorm_forward(&x, &w, &b, &mut want, &mut want_mean, &mut want_rstd, dim, eps);
        assert_close("layernorm_forward", &be, &be.download(&out), &want, tol);
        let (mut dx, mut dw, mut db) = (be.upload(&dx0), be.upload_f32(&dw0), be.upload_f32(&dw0));
        be.layernorm_backward(
            be.all(&gdy),
            be.all(&gx),
            be.all(&gw),
            be.all(&mean),
            be.all(&rstd),
            be.all_mut(&mut dx),
            be.all_mut(&mut dw),
            be.all_mut(&mut db),
            dim,
        );
        let (mut want_dx, mut want_dw, mut want_db) = (dx0.clone(), dw0.clone(), dw0.clone());
        CPU.layernorm_backward(&dy, &x, &w, &want_mean, &want_rstd, &mut want_dx, &mut want_dw, &mut want_db, dim);
        assert_close("layernorm_backward dx", &be, &be.download(&dx), &want_dx, tol);
        assert_close("layernorm_backward dweight", &be, &be.download(&dw), &want_dw, 1e-4);
        assert_close("layernorm_backward dbias", &be, &be.download(&db), &want_db, 1e-4);
    }
}

#[test]
fn activations_match_the_cpu() {
    for be in backends() {
        let tol = tolerance(&be);
        let (rows, width) = (23usize, 171usize);
        let gate_up = round(&be, &random(rows * 2 * width, 1, 2.0));
        let dy = round(&be, &random(rows * width, 2, 1.0));
        for act in [Activation::Silu, Activation::Gelu] {
            let mut out = be.zeros(rows * width);
            be.glu_forward(act, be.all(&be.upload(&gate_up)), be.all_mut(&mut out), width);
            let mut want = vec![0.0; rows * width];
            CPU.glu_forward(act, &gate_up, &mut want, width);
            assert_close(&format!("glu_forward {act:?}"), &be, &be.download(&out), &want, tol);
            let mut dgu = be.zeros(rows * 2 * width);
            let (dy_dev, gu_dev) = (be.upload(&dy), be.upload(&gate_up));
            be.glu_backward(act, be.all(&dy_dev), be.all(&gu_dev), be.all_mut(&mut dgu), width);
            let mut want = vec![0.0; rows * 2 * width];
            CPU.glu_backward(act, &dy, &gate_up, &mut want, width);
            assert_close(&format!("glu_backward {act:?}"), &be, &be.download(&dgu), &want, tol);
        }

        let x = round(&be, &random(rows * width, 3, 2.0));
        for act in [Activation::Gelu, Activation::Relu2, Activation::Silu] {
            let (mut y, mut dx) = (be.zeros(x.len()), be.zeros(x.len()));
            be.activation_forward(act, be.all(&be.upload(&x)), be.all_mut(&mut y));
            be.activation_backward(act, be.all(&be.upload(&dy)), be.all(&be.upload(&x)), be.all_mut(&mut dx));
            let (mut want_y, mut want_dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
            CPU.activation_forward(act, &x, &mut want_y);
            CPU.activation_backward(act, &dy, &x, &mut want_dx);
            assert_close(&format!("{act:?} forward"), &be, &be.download(&y), &want_y, tol);
            assert_close(&format!("{act:?} backward"), &be, &be.download(&dx), &want_dx, tol);
        }
    }
}

#[test]
fn cross_entropy_matches_the_cpu() {
    for be in backends() {
        let tol = tolerance(&be);
        let (rows, vocab, scale) = (19usize, 1003usize, 0.37f32);
        // Dense rows of a whole micro-batch, and rows 3.. of one (a chunk) padded by 21
        // columns of garbage (a padded head's): the losses must not see them and the gradient
        // must zero them.
        for (stride, first_row) in [(vocab, 0), (vocab + 21, 3)] {
            let columns = LogitColumns { vocab, stride };
            let logits = round(&be, &random(rows * stride, 1, 3.0));
            // Every fifth target is one not learned: its row has loss 0 and no gradient.
            let targets: Vec<u32> = (0..first_row + rows)
                .map(|r| if r % 5 == 2 { IGNORED_TARGET } else { ((r * 131) % vocab) as u32 })
                .collect();
            let gpu_targets = be.upload_ids(&targets);
            for grad in [None, Some(scale)] {
                let (mut dl, mut losses) = (be.upload(&logits), be.zeros_f32(rows));
                be.cross_entropy(be.all_mut(&mut dl), &gpu_targets, first_row, be.all_mut(&mut losses), columns, grad);
                let (mut want_dl, mut want_losses) = (logits.clone(), vec![0.0; rows]);
                CPU.cross_entropy(&mut want_dl, &targets, first_row, &mut want_losses, columns, grad);
                let what = format!("cross_entropy {columns:?} from row {first_row} grad={grad:?}");
                assert_close(&format!("{what} losses"), &be, &be.download(&losses), &want_losses, 1e-5);
                // Without a gradient the logits are scratch afterwards (the contract): only the
                // gradient is compared.
                if grad.is_some() {
                    assert_close(&format!("{what} gradient"), &be, &be.download(&dl), &want_dl, tol);
                }
            }
            // A vocabulary shard of 400 columns starting at id 300, in rows of 400 or 421.
            let (first_id, shard) = (300usize, LogitColumns { vocab: 400, stride: 400 + stride - vocab });
            let part: Vec<f32> = (0..rows)
                .flat_map(|r| {
                    let row = &logits[r * stride..][..stride];
                    row[first_id..][..shard.vocab].iter().chain(&row[vocab..]).copied().collect::<Vec<_>>()
                })
                .collect();
            let mut stats = be.zeros_f32(3 * rows);
            be.cross_entropy_stats(
                be.all(&be.upload(&part)),
                &gpu_targets,
                first_row,
                be.all_mut(&mut stats),
                first_id,
                shard,
            );
            let mut want_stats = vec![0.0; 3 * rows];
            CPU.cross_entropy_stats(&part, &targets, first_row, &mut want_stats, first_id, shard);
            assert_close(&format!("cross_entropy_stats {shard:?}"), &be, &be.download(&stats), &want_stats, 1e-5);
            let lse = random(rows, 5, 1.0).iter().map(|v| v + 7.0).collect::<Vec<_>>();
            let mut grad = be.upload(&part);
            let gpu_lse = be.upload_f32(&lse);
            be.cross_entropy_grad(
                be.all_mut(&mut grad),
                &gpu_targets,
                first_row,
                be.all(&gpu_lse),
                first_id,
                shard,
                scale,
            );
            let mut want = part.clone();
            CPU.cross_entropy_grad(&mut want, &targets, first_row, &lse, first_id, shard, scale);
            assert_close(&format!("cross_entropy_grad {shard:?}"), &be, &be.download(&grad), &want, tol);
        }
    }
}

#[test]
fn adamw_matches_the_cpu_with_and_without_a_compute_copy() {
    for be in backends() {
        let n = 100_003;
        let (p, g) = (random(n, 1, 1.0), random(n, 2, 0.1));
        let (m, v) = (random(n, 3, 0.01), random(n, 4, 0.01).iter().map(|x| x * x).collect::<Vec<_>>());
        let hp =
            AdamWParams { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 7, grad_scale: 0.5 };
        let (mut dp, dg, mut dm, mut dv) = (be.upload_f32(&p), be.upload_f32(&g), be.upload_f32(&m), be.upload_f32(&v));
        let mut copy = be.mixed_precision().then(|| be.zeros(n));
        be.adamw(
            be.all_mut(&mut dp),
            be.all(&dg),
            be.all_mut(&mut dm),
            be.all_mut(&mut dv),
            hp,
            copy.as_mut().map(|c| be.all_mut(c)),
        );
        let (mut wp, mut wm, mut wv) = (p.clone(), m.clone(), v.clone());
        CPU.adamw(&mut wp, &g, &mut wm, &mut wv, hp, None);
        assert_close("adamw params", &be, &be.download(&dp), &wp, 1e-6);
        assert_close("adamw m", &be, &be.download(&dm), &wm, 1e-6);
        assert_close("adamw v", &be, &be.download(&dv), &wv, 1e-6);
        if let Some(copy) = copy {
            // The compute copy is the master rounded to bf16 (half an ulp: 2^-9 relative).
            assert_close("adamw bf16 copy", &be, &be.download(&copy), &wp, 4e-3);
        }
    }
}

/// Qwen3's q_norm and k_norm: a head of 48 (lanes wrap unevenly over 32) and of 128, on
/// grouped-query heads over 37 rows.
#[test]
fn qk_norm_matches_the_cpu() {
    for be in backends() {
        let tol = tolerance(&be);
        for head_dim in [48, 128] {
            let shape = AttnShape { batch: 1, seq: 37, n_heads: 4, n_kv_heads: 2, head_dim };
            let (n, normed) = (shape.rows() * shape.qkv_width(), shape.rows() * (shape.n_heads + shape.n_kv_heads));
            let qkv = round(&be, &random(n, 1, 2.0));
            let w = round(&be, &random(2 * head_dim, 2, 1.0));
            let dy = round(&be, &random(n, 3, 1.0));
            let dw0 = random(2 * head_dim, 4, 0.1);
            let (gqkv, gw) = (be.upload(&qkv), be.upload(&w));
            let (mut out, mut rstd) = (be.zeros(n), be.zeros_f32(normed));
            be.qk_norm_forward(be.all(&gqkv), be.all(&gw), be.all_mut(&mut out), be.all_mut(&mut rstd), shape, 1e-6);
            let (mut want, mut want_rstd) = (vec![0.0; n], vec![0.0; normed]);
            CPU.qk_norm_forward(&qkv, &w, &mut want, &mut want_rstd, shape, 1e-6);
            assert_close(&format!("qk_norm_forward D={head_dim}"), &be, &be.download(&out), &want, tol);
            assert_close(&format!("qk_norm_forward rstd D={head_dim}"), &be, &be.download(&rstd), &want_rstd, 1e-5);

            let (mut dqkv, mut dw) = (be.upload(&dy), be.upload_f32(&dw0));
            be.qk_norm_backward(
                be.all_mut(&mut dqkv),
                be.all(&gqkv),
                be.all(&gw),
                be.all(&rstd),
                be.all_mut(&mut dw),
                shape,
            );
            let (mut want_dqkv, mut want_dw) = (dy.clone(), dw0.clone());
            CPU.qk_norm_backward(&mut want_dqkv, &qkv, &w, &want_rstd, &mut want_dw, shape);
            assert_close(&format!("qk_norm_backward dqkv D={head_dim}"), &be, &be.download(&dqkv), &want_dqkv, tol);
            assert_close(&format!("qk_norm_backward dweight D={head_dim}"), &be, &be.download(&dw), &want_dw, 1e-4);
        }
    }
}

#[test]
fn rope_and_attention_match_the_cpu() {
    for be in backends() {
        let tol = tolerance(&be);
        // seq 37 with 256 threads a block; GQA 4 query heads on 2 kv heads.
        let shape = AttnShape { batch: 2, seq: 37, n_heads: 4, n_kv_heads: 2, head_dim: 16 };
        let qkv = round(&be, &random(shape.rows() * shape.qkv_width(), 1, 1.0));
        let table = rope_table(shape.seq, shape.head_dim, 10000.0);
        let gpu_table = be.upload_f32(&table);
        for (inverse, q_scale) in [(false, 1.0), (true, 1.0), (false, 0.75), (true, 0.75)] {
            let mut got = be.upload(&qkv);
            be.rope(be.all_mut(&mut got), be.all(&gpu_table), shape, inverse, q_scale);
            let mut want = qkv.clone();
            CPU.rope(&mut want, &table, shape, inverse, q_scale);
            let what = format!("rope inverse={inverse} q_scale={q_scale}");
            assert_close(&what, &be, &be.download(&got), &want, tol);
        }
        // Inference over a cache: a prefill of 5 tokens, then one token at a time.
        check_attention(&be, shape, 12, &[5, 1, 1, 1]);
    }
}

/// The simple kernels take keys a tile of 256 (their block) at a time, the forward with the
/// online softmax: 600 keys are three tiles, the last partial, and the cache is filled across
/// a tile's end (511 keys, then 2 more). Decoding splits the keys into parts where the
/// queries' blocks are few (on the emulator's 2 SMs, fewer than 8: backend.rs's unit test of
/// cached_key_parts pins these shapes' parts): 2 queries in 2 parts of which the first query's
/// second is empty, then 3 parts; and over two sequences and two kv heads.
#[test]
fn simple_attention_spans_several_key_tiles() {
    for be in backends() {
        let shape = AttnShape { batch: 1, seq: 600, n_heads: 2, n_kv_heads: 1, head_dim: 8 };
        check_attention(&be, shape, 600, &[511, 2, 1]);
        for (batch, n_heads, n_kv_heads) in [(2, 2, 1), (1, 4, 2)] {
            let shape = AttnShape { batch, seq: 520, n_heads, n_kv_heads, head_dim: 8 };
            check_cached_attention(&be, shape, 520, &[513, 1], None);
            // A sliding window of 300 keys: the prefill's later queries and the decoding
            // step's start inside the first part of the keys.
            check_cached_attention(&be, shape, 520, &[513, 1], Some(300));
        }
    }
}

/// Attention's forward and backward on `shape` against the CPU, then the cached form over a
/// cache of `max_seq` positions filled by `steps` new tokens at a time.
fn check_attention(be: &CudaBackend, shape: AttnShape, max_seq: usize, steps: &[usize]) {
    let tol = tolerance(be);
    let what = |w: &str| format!("{w} (T={} D={})", shape.seq, shape.head_dim);
    let n = shape.rows() * shape.qkv_width();
    let qkv = round(be, &random(n, 1, 1.0));
    let dout = round(be, &random(shape.rows() * shape.q_width(), 2, 1.0));
    let (out, lse, dqkv) = run_attention(be, &qkv, &dout, shape, None);
    let (mut want_out, mut want_lse) =
        (vec![0.0; shape.rows() * shape.q_width()], vec![0.0; shape.batch * shape.n_heads * shape.seq]);
    CPU.attention_forward(&qkv, &mut want_out, &mut want_lse, shape, None);
    assert_close(&what("attention_forward out"), be, &out, &want_out, tol);
    assert_close(&what("attention_forward lse"), be, &lse, &want_lse, 1e-4);
    // Backward from the GPU's own forward outputs, as training runs it.
    let mut want = vec![0.0; n];
    CPU.attention_backward(&dout, &qkv, &out, &lse, &mut want, shape, None);
    assert_close(&what("attention_backward dqkv"), be, &dqkv, &want, tol);
    check_cached_attention(be, shape, max_seq, steps, None);
}

/// Attention's forward on `be`, then its backward from `dout` and that forward's outputs:
/// (out, lse, dqkv), downloaded.
fn run_attention(
    be: &CudaBackend,
    qkv: &[f32],
    dout: &[f32],
    shape: AttnShape,
    first_keys: Option<&[u32]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let gqkv = be.upload(qkv);
    let first_keys = first_keys.map(|f| be.upload_ids(f));
    let (mut out, mut lse) =
        (be.zeros(shape.rows() * shape.q_width()), be.zeros_f32(shape.batch * shape.n_heads * shape.seq));
    be.attention_forward(be.all(&gqkv), be.all_mut(&mut out), be.all_mut(&mut lse), shape, first_keys.as_ref());
    let mut dqkv = be.upload(&random(qkv.len(), 3, 1.0)); // overwritten, not accumulated
    be.attention_backward(
        be.all(&be.upload(dout)),
        be.all(&gqkv),
        be.all(&out),
        be.all(&lse),
        be.all_mut(&mut dqkv),
        shape,
        first_keys.as_ref(),
    );
    (be.download(&out), be.download(&lse), be.download(&dqkv))
}

/// Documents packed into sequences attend within their own. The first keys fall inside the
/// flash forward's 64-key tiles and on their edges, in its second 128-query block, after the
/// backward's first 128-key tile (whose later queries it then skips), and at a sequence's
/// start; a document of one token. Then sliding windows over those documents: of 40 keys
/// (within a 64-key tile) and of 150 (past a 128-query block). Both attention kernels against
/// the CPU: the simple on every compute type, flash at D = 64 and at D = 128 with one stage
/// and with two.
#[test]
fn attention_within_documents_matches_the_cpu() {
    const EOT: u32 = 1;
    let mut pairs = tensor_core_pairs().into_iter().flat_map(|(flash, simple)| [flash, simple]).collect();
    let mut all = backends();
    all.append(&mut pairs);
    for (head_dim, seq) in [(64, 300), (128, 200)] {
        let shape = AttnShape { batch: 2, seq, n_heads: 4, n_kv_heads: 2, head_dim };
        let mut ids = vec![2u32; shape.rows()];
        for at in [37, 64, 130, 131, 190, seq, seq + 150] {
            ids[at] = EOT;
        }
        let documents = document_starts(&ids, seq, EOT);
        for window in [None, Some(40), Some(150)] {
            let first_keys = match window {
                Some(w) => window_first_keys(w, seq, Some(&documents), shape.rows()),
                None => documents.clone(),
            };
            for be in &all {
                let tol = tolerance(be);
                let n = shape.rows() * shape.qkv_width();
                let qkv = round(be, &random(n, 4, 1.0));
                let dout = round(be, &random(shape.rows() * shape.q_width(), 5, 1.0));
                let (out, lse, dqkv) = run_attention(be, &qkv, &dout, shape, Some(&first_keys));
                let what = |w: &str| format!("attention within documents D={head_dim} T={seq} window {window:?} {w}");
                let (mut want_out, mut want_lse) = (vec![0.0; out.len()], vec![0.0; lse.len()]);
                CPU.attention_forward(&qkv, &mut want_out, &mut want_lse, shape, Some(&first_keys));
                assert_close(&what("out"), be, &out, &want_out, tol);
                assert_close(&what("lse"), be, &lse, &want_lse, 1e-3);
                let mut want_dqkv = vec![0.0; n];
                CPU.attention_backward(&dout, &qkv, &out, &lse, &mut want_dqkv, shape, Some(&first_keys));
                assert_close(&what("dqkv"), be, &dqkv, &want_dqkv, tol);
            }
        }
    }
}

/// Attention over a cache of `max_seq` positions against the CPU, the cache filled by `steps`
/// new tokens at a time.
fn check_cached_attention(be: &CudaBackend, shape: AttnShape, max_seq: usize, steps: &[usize], window: Option<usize>) {
    let tol = tolerance(be);
    let what = |w: &str| format!("{w} (T={} D={} window {window:?})", shape.seq, shape.head_dim);
    let kv = shape.batch * max_seq * shape.n_kv_heads * shape.head_dim;
    let (mut k_cache, mut v_cache) = (be.zeros(kv), be.zeros(kv));
    let (mut want_k, mut want_v) = (vec![0.0; kv], vec![0.0; kv]);
    let mut pos = 0;
    for &new in steps {
        let s = AttnShape { seq: new, ..shape };
        let rows_qkv = round(be, &random(s.rows() * s.qkv_width(), 10 + pos as u64, 1.0));
        let mut out = be.zeros(s.rows() * s.q_width());
        be.attention_cached(
            be.all(&be.upload(&rows_qkv)),
            be.all_mut(&mut k_cache),
            be.all_mut(&mut v_cache),
            be.all_mut(&mut out),
            s,
            pos,
            max_seq,
            window,
        );
        let mut want_out = vec![0.0; s.rows() * s.q_width()];
        CPU.attention_cached(&rows_qkv, &mut want_k, &mut want_v, &mut want_out, s, pos, max_seq, window);
        assert_close(&what(&format!("attention_cached at {pos} (+{new})")), be, &be.download(&out), &want_out, tol);
        pos += new;
    }
    assert_close(&what("attention_cached k cache"), be, &be.download(&k_cache), &want_k, 0.0);
}

#[test]
fn causal_conv1d_and_gated_rmsnorm_match_the_cpu() {
    for be in backends() {
        let tol = tolerance(&be);
        // 37 channels over 2 sequences of 11 tokens, 4 taps.
        let (batch, len, ch, k) = (2usize, 11usize, 37usize, 4usize);
        let x = round(&be, &random(batch * len * ch, 1, 1.0));
        let w = round(&be, &random(ch * k, 2, 0.5));
        let bias = round(&be, &random(ch, 3, 0.5));
        let dy = round(&be, &random(x.len(), 4, 1.0));
        let (gx, gw, gb) = (be.upload(&x), be.upload(&w), be.upload(&bias));
        let mut y = be.zeros(x.len());
        be.conv1d_forward(be.all(&gx), be.all(&gw), be.all(&gb), be.all_mut(&mut y), len, ch);
        let mut want = vec![0.0; x.len()];
        CPU.conv1d_forward(&x, &w, &bias, &mut want, len, ch);
        assert_close("conv1d_forward", &be, &be.download(&y), &want, tol);
        let (dw0, db0) = (random(w.len(), 5, 0.1), random(ch, 6, 0.1));
        let (mut dx, mut dw, mut db) = (be.upload(&random(x.len(), 7, 1.0)), be.upload_f32(&dw0), be.upload_f32(&db0));
        be.conv1d_backward(
            be.all(&be.upload(&dy)),
            be.all(&gx),
            be.all(&gw),
            be.all(&gb),
            be.all_mut(&mut dx),
            be.all_mut(&mut dw),
            be.all_mut(&mut db),
            len,
            ch,
        );
        let (mut want_dx, mut want_dw, mut want_db) = (vec![0.0; x.len()], dw0.clone(), db0.clone());
        CPU.conv1d_backward(&dy, &x, &w, &bias, &mut want_dx, &mut want_dw, &mut want_db, len, ch);
        assert_close("conv1d_backward dx", &be, &be.download(&dx), &want_dx, tol);
        assert_close("conv1d_backward dw", &be, &be.download(&dw), &want_dw, 1e-4);
        assert_close("conv1d_backward dbias", &be, &be.download(&db), &want_db, 1e-4);

        // Gated RMSNorm: 13 rows of 3 groups of 100.
        let (rows, group, width, eps) = (13usize, 100usize, 300usize, 1e-5f32);
        let x = round(&be, &random(rows * width, 8, 1.0));
        let z = round(&be, &random(rows * width, 9, 1.0));
        let w = round(&be, &random(width, 10, 1.0));
        let dy = round(&be, &random(rows * width, 11, 1.0));
        let (gx, gz, gw) = (be.upload(&x), be.upload(&z), be.upload(&w));
        let (mut out, mut rstd) = (be.zeros(x.len()), be.zeros_f32(rows * width / group));
        be.gated_rmsnorm_forward(
            be.all(&gx),
            be.all(&gz),
            be.all(&gw),
            be.all_mut(&mut out),
            be.all_mut(&mut rstd),
            group,
            eps,
        );
        let (mut want, mut want_rstd) = (vec![0.0; x.len()], vec![0.0; rows * width / group]);
        CPU.gated_rmsnorm_forward(&x, &z, &w, &mut want, &mut want_rstd, group, eps);
        assert_close("gated_rmsnorm_forward", &be, &be.download(&out), &want, tol);
        assert_close("gated_rmsnorm_forward rstd", &be, &be.download(&rstd), &want_rstd, 1e-5);
        let dw0 = random(width, 12, 0.1);
        let (mut dx, mut dz, mut dw) = (be.zeros(x.len()), be.zeros(x.len()), be.upload_f32(&dw0));
        be.gated_rmsnorm_backward(
            be.all(&be.upload(&dy)),
            be.all(&gx),
            be.all(&gz),
            be.all(&gw),
            be.all(&rstd),
            be.all_mut(&mut dx),
            be.all_mut(&mut dz),
            be.all_mut(&mut dw),
            group,
        );
        let (mut want_dx, mut want_dz, mut want_dw) = (vec![0.0; x.len()], vec![0.0; x.len()], dw0.clone());
        CPU.gated_rmsnorm_backward(&dy, &x, &z, &w, &want_rstd, &mut want_dx, &mut want_dz, &mut want_dw, group);
        assert_close("gated_rmsnorm_backward dx", &be, &be.download(&dx), &want_dx, tol);
        assert_close("gated_rmsnorm_backward dz", &be, &be.download(&dz), &want_dz, tol);
        assert_close("gated_rmsnorm_backward dweight", &be, &be.download(&dw), &want_dw, 1e-4);
    }
}

/// A selective scan's inputs from views of its fields, in order (u, delta, delta_bias,
/// a_log, B, C, D, z).
fn scan_inputs<R>([u, delta, delta_bias, a_log, b, c, d, z]: [R; 8]) -> ScanInputs<R> {
    ScanInputs { u, delta, delta_bias, a_log, b, c, d, z }
}

/// An SSD's inputs from views of its fields, in order (xbc, dt, dt_bias, a_log, D).
fn ssd_inputs<R>([xbc, dt, dt_bias, a_log, d]: [R; 5]) -> SsdInputs<R> {
    SsdInputs { xbc, dt, dt_bias, a_log, d }
}

/// The fields of a scan's inputs in order, uploaded; returns the host copies too.
fn uploads(be: &CudaBackend, fields: &[(usize, u64, f32)]) -> (Vec<Vec<f32>>, Vec<ondol_cuda::DeviceBuf>) {
    let host: Vec<Vec<f32>> = fields.iter().map(|&(n, seed, scale)| round(be, &random(n, seed, scale))).collect();
    let dev = host.iter().map(|h| be.upload(h)).collect();
    (host, dev)
}

#[test]
fn selective_scan_matches_the_cpu() {
    use ondol_core::{ScanGrads, ScanShape};
    for be in backends() {
        let tol = tolerance(&be);
        // 2 sequences of 45 tokens, 37 channels (a partial block), 16 states, chunks of 20
        // (which neither divide the sequence nor are a multiple of the 8-token recompute).
        let s = ScanShape { batch: 2, len: 45, channels: 37, state: 16, chunk: 20 };
        let (rows, ch, n) = (s.batch * s.len, s.channels, s.state);
        let (h, d) = uploads(
            &be,
            &[
                (rows * ch, 1, 1.0),
                (rows * ch, 2, 1.0),
                (ch, 3, 0.5),
                (ch * n, 4, 0.5),
                (rows * n, 5, 1.0),
                (rows * n, 6, 1.0),
                (ch, 7, 1.0),
                (rows * ch, 8, 1.0),
            ],
        );
        let cpu_inputs = scan_inputs(std::array::from_fn(|i| &h[i][..]));
        let dev_inputs = || scan_inputs(std::array::from_fn(|i| be.all(&d[i])));
        let states_len = s.batch * s.saved() * ch * n;
        let (mut y, mut states) = (be.zeros(rows * ch), be.zeros_f32(states_len));
        be.selective_scan_forward(dev_inputs(), be.all_mut(&mut y), be.all_mut(&mut states), s);
        let (mut want_y, mut want_states) = (vec![0.0; rows * ch], vec![0.0; states_len]);
        CPU.selective_scan_forward(cpu_inputs, &mut want_y, &mut want_states, s);
        assert_close("selective_scan_forward y", &be, &be.download(&y), &want_y, tol);
        assert_close("selective_scan_forward states", &be, &be.download(&states), &want_states, tol.max(1e-4));

        let dy = round(&be, &random(rows * ch, 9, 1.0));
        let acc0 = [random(ch, 10, 0.1), random(ch * n, 11, 0.1), random(ch, 12, 0.1)];
        let lens = [rows * ch, rows * ch, rows * n, rows * n, rows * ch];
        let mut g = lens.map(|len| be.zeros(len));
        let mut acc = acc0.each_ref().map(|a| be.upload_f32(a));
        {
            let [du, ddelta, db, dc, dz] = g.each_mut().map(|b| be.all_mut(b));
            let [ddelta_bias, da_log, dd] = acc.each_mut().map(|b| be.all_mut(b));
            let grads = ScanGrads { du, ddelta, ddelta_bias, da_log, db, dc, dd, dz };
            // The backward from the GPU's own saved states, as training runs it.
            be.selective_scan_backward(be.all(&be.upload(&dy)), dev_inputs(), be.all(&states), grads, s);
        }
        let mut want = lens.map(|len| vec![0.0f32; len]);
        let mut want_acc = acc0.clone();
        {
            let [du, ddelta, db, dc, dz] = want.each_mut().map(|b| &mut b[..]);
            let [ddelta_bias, da_log, dd] = want_acc.each_mut().map(|b| &mut b[..]);
            let grads = ScanGrads { du, ddelta, ddelta_bias, da_log, db, dc, dd, dz };
            CPU.selective_scan_backward(&dy, cpu_inputs, &want_states, grads, s);
        }
        for (name, (got, want)) in ["du", "ddelta", "dB", "dC", "dz"].iter().zip(g.iter().zip(&want)) {
            assert_close(&format!("selective_scan_backward {name}"), &be, &be.download(got), want, tol);
        }
        for (name, (got, want)) in ["ddelta_bias", "da_log", "dD"].iter().zip(acc.iter().zip(&want_acc)) {
            assert_close(&format!("selective_scan_backward {name}"), &be, &be.download(got), want, tol.max(1e-4));
        }
    }
}

#[test]
fn ssd_scan_matches_the_cpu() {
    use ondol_core::{SsdGrads, SsdShape};
    for be in backends() {
        let tol = tolerance(&be);
        // 2 sequences of 37 tokens in chunks of 16 (the last one partial, and one more query
        // row pass than fits), 4 heads of 8 channels in 2 groups of 12 states; and the longest
        // chunk the kernels take, whose shared memory must fit every GPU's.
        let short = SsdShape { batch: 2, len: 37, heads: 4, head_dim: 8, groups: 2, state: 12, chunk: 16 };
        let long = SsdShape {
            batch: 1,
            len: SSD_MAX_CHUNK + 9,
            heads: 2,
            head_dim: 4,
            groups: 1,
            state: 4,
            chunk: SSD_MAX_CHUNK,
        };
        for s in [short, long] {
            let what = format!("chunk={}", s.chunk);
            let rows = s.rows();
            let (h, d) = uploads(
                &be,
                &[
                    (rows * s.xbc_width(), 1, 1.0),
                    (rows * s.heads, 2, 1.0),
                    (s.heads, 3, 0.5),
                    (s.heads, 4, 0.5),
                    (s.heads, 5, 1.0),
                ],
            );
            let cpu_inputs = ssd_inputs(std::array::from_fn(|i| &h[i][..]));
            let dev_inputs = || ssd_inputs(std::array::from_fn(|i| be.all(&d[i])));
            let (mut y, mut states) = (be.zeros(rows * s.inner()), be.zeros_f32(s.states_len()));
            be.ssd_forward(dev_inputs(), be.all_mut(&mut y), be.all_mut(&mut states), s);
            let (mut want_y, mut want_states) = (vec![0.0; rows * s.inner()], vec![0.0; s.states_len()]);
            CPU.ssd_forward(cpu_inputs, &mut want_y, &mut want_states, s);
            assert_close(&format!("ssd_forward y {what}"), &be, &be.download(&y), &want_y, tol);
            assert_close(
                &format!("ssd_forward states {what}"),
                &be,
                &be.download(&states),
                &want_states,
                tol.max(1e-4),
            );

            let dy = round(&be, &random(rows * s.inner(), 6, 1.0));
            let acc0 = [random(s.heads, 7, 0.1), random(s.heads, 8, 0.1), random(s.heads, 9, 0.1)];
            let (mut dxbc, mut ddt) = (be.zeros(rows * s.xbc_width()), be.zeros(rows * s.heads));
            let mut acc = acc0.each_ref().map(|a| be.upload_f32(a));
            {
                let [ddt_bias, da_log, dd] = acc.each_mut().map(|b| be.all_mut(b));
                let grads = SsdGrads { dxbc: be.all_mut(&mut dxbc), ddt: be.all_mut(&mut ddt), ddt_bias, da_log, dd };
                be.ssd_backward(be.all(&be.upload(&dy)), dev_inputs(), be.all(&states), grads, s);
            }
            let (mut want_dxbc, mut want_ddt) = (vec![0.0; rows * s.xbc_width()], vec![0.0; rows * s.heads]);
            let mut want_acc = acc0.clone();
            {
                let [ddt_bias, da_log, dd] = want_acc.each_mut().map(|b| &mut b[..]);
                let grads = SsdGrads { dxbc: &mut want_dxbc[..], ddt: &mut want_ddt[..], ddt_bias, da_log, dd };
                CPU.ssd_backward(&dy, cpu_inputs, &want_states, grads, s);
            }
            assert_close(&format!("ssd_backward dxbc {what}"), &be, &be.download(&dxbc), &want_dxbc, tol);
            assert_close(&format!("ssd_backward ddt {what}"), &be, &be.download(&ddt), &want_ddt, tol);
            // Sums of a share from every row, with much cancelling: their f32 round-off grows
            // with the rows, 74 and 265 here (on the CPU, a one-ulp change of dt moved da_log by
            // 1e-4 relative at 521 rows, as did another chunk size).
            let sums = tol.max(2e-6 * rows as f32);
            for (name, (got, want)) in ["ddt_bias", "da_log", "dD"].iter().zip(acc.iter().zip(&want_acc)) {
                assert_close(&format!("ssd_backward {name} {what}"), &be, &be.download(got), want, sums);
            }
        }
    }
}

/// Inference's recurrent forms of the convolution and both scans, continuing from random
/// carried states: 3 tokens of 2 sequences, then 1 token (decoding).
#[test]
fn recurrent_forms_match_the_cpu() {
    use ondol_core::{ScanShape, SsdShape};
    for be in backends() {
        let tol = tolerance(&be);
        for len in [3, 1] {
            let (batch, ch, k) = (2, 37, 4);
            let (h, d) = uploads(
                &be,
                &[(batch * len * ch, 1, 1.0), (ch * k, 2, 0.5), (ch, 3, 0.5), (batch * (k - 1) * ch, 4, 1.0)],
            );
            let (mut y, mut carry) = (be.zeros(batch * len * ch), be.upload(&h[3]));
            be.conv1d_recurrent(
                be.all(&d[0]),
                be.all(&d[1]),
                be.all(&d[2]),
                be.all_mut(&mut carry),
                be.all_mut(&mut y),
                len,
                ch,
            );
            let (mut want, mut want_carry) = (vec![0.0; batch * len * ch], h[3].clone());
            CPU.conv1d_recurrent(&h[0], &h[1], &h[2], &mut want_carry, &mut want, len, ch);
            assert_close(&format!("conv1d_recurrent y len={len}"), &be, &be.download(&y), &want, tol);
            assert_close(&format!("conv1d_recurrent carry len={len}"), &be, &be.download(&carry), &want_carry, tol);

            let s = ScanShape { batch, len, channels: ch, state: 16, chunk: 1 };
            let rows = batch * len;
            let fields =
                [(rows * ch, 5, 1.0), (rows * ch, 6, 1.0), (ch, 7, 0.5), (ch * 16, 8, 0.5), (rows * 16, 9, 1.0)];
            let (h, d) =
                uploads(&be, &[&fields[..], &[(rows * 16, 10, 1.0), (ch, 11, 1.0), (rows * ch, 12, 1.0)]].concat());
            let carry0 = random(batch * ch * 16, 13, 1.0);
            let (mut y, mut carry) = (be.zeros(rows * ch), be.upload_f32(&carry0));
            let inputs = scan_inputs(std::array::from_fn(|i| be.all(&d[i])));
            be.selective_scan_recurrent(inputs, be.all_mut(&mut y), be.all_mut(&mut carry), s);
            let (mut want, mut want_carry) = (vec![0.0; rows * ch], carry0.clone());
            let inputs = scan_inputs(std::array::from_fn(|i| &h[i][..]));
            CPU.selective_scan_recurrent(inputs, &mut want, &mut want_carry, s);
            assert_close(&format!("selective_scan_recurrent y len={len}"), &be, &be.download(&y), &want, tol);
            let carry = be.download(&carry);
            assert_close(&format!("selective_scan_recurrent state len={len}"), &be, &carry, &want_carry, tol.max(1e-4));

            let s = SsdShape { batch, len, heads: 4, head_dim: 8, groups: 2, state: 12, chunk: 1 };
            let fields =
                [(rows * s.xbc_width(), 14, 1.0), (rows * s.heads, 15, 1.0), (4, 16, 0.5), (4, 17, 0.5), (4, 18, 1.0)];
            let (h, d) = uploads(&be, &fields);
            let carry0 = random(batch * s.inner() * s.state, 19, 1.0);
            let (mut y, mut carry) = (be.zeros(rows * s.inner()), be.upload_f32(&carry0));
            let inputs = ssd_inputs(std::array::from_fn(|i| be.all(&d[i])));
            be.ssd_recurrent(inputs, be.all_mut(&mut y), be.all_mut(&mut carry), s);
            let (mut want, mut want_carry) = (vec![0.0; rows * s.inner()], carry0.clone());
            let inputs = ssd_inputs(std::array::from_fn(|i| &h[i][..]));
            CPU.ssd_recurrent(inputs, &mut want, &mut want_carry, s);
            assert_close(&format!("ssd_recurrent y len={len}"), &be, &be.download(&y), &want, tol);
            let carry = be.download(&carry);
            assert_close(&format!("ssd_recurrent state len={len}"), &be, &carry, &want_carry, tol.max(1e-4));
        }
    }
}

/// The bf16 backend with its tensor-core kernels and the same without, on the emulator
/// (threads in reverse order; not under [`gpu_only`]) and on the GPU if there is one.
fn tensor_core_pairs() -> Vec<(CudaBackend, CudaBackend)> {
    let mut out = Vec::new();
    if !gpu_only() {
        out.push((
            CudaBackend::emulated(Dtype::Bf16, true),
            CudaBackend::emulated(Dtype::Bf16, false).without_tensor_cores(),
        ));
    }
    if let (Some(a), Some(b)) = (gpu(Dtype::Bf16), gpu(Dtype::Bf16)) {
        out.push((a, b.without_tensor_cores()));
    }
    out
}

#[test]
fn flash_attention_matches_the_cpu_and_the_simple_kernel() {
    for (flash, simple) in tensor_core_pairs() {
        let tol = tolerance(&flash);
        // Every head dim with an instance. 100 and 200 tokens: multiples of neither the
        // 128-query forward blocks, the 64-key tiles nor the 32-query backward steps; 200 has
        // two forward blocks, the second with tiles below its diagonal.
        for (head_dim, seq) in [(64, 100), (128, 100), (64, 200), (32, 100), (80, 100), (96, 100)] {
            let shape = AttnShape { batch: 2, seq, n_heads: 4, n_kv_heads: 2, head_dim };
            let n = shape.rows() * shape.qkv_width();
            let qkv = round(&flash, &random(n, 1, 1.0));
            let dout = round(&flash, &random(shape.rows() * shape.q_width(), 2, 1.0));
            let run = |be: &CudaBackend| run_attention(be, &qkv, &dout, shape, None);
            let (out, lse, dqkv) = run(&flash);
            let what = |w: &str| format!("flash attention D={head_dim} T={seq} {w}");
            // At D = 128 two stages of the backward's query tiles exceed 99 KiB of shared
            // memory: there it runs one, whose sums are the same, bit for bit (on the
            // emulator, which adds dQ's atomics in one order; a GPU adds them in any).
            if head_dim == 128 && flash.stream().is_none() {
                let small = CudaBackend::emulated_with_shared_memory(Dtype::Bf16, true, SMALLEST_SHARED);
                assert_eq!(run(&small).2, dqkv, "{}", what("dqkv with one stage"));
            }
            let (want_out, want_lse) =
                (vec![0.0; shape.rows() * shape.q_width()], vec![0.0; shape.batch * shape.n_heads * shape.seq]);
            let (mut want_out, mut want_lse) = (want_out, want_lse);
            CPU.attention_forward(&qkv, &mut want_out, &mut want_lse, shape, None);
            assert_close(&what("out vs cpu"), &flash, &out, &want_out, tol);
            assert_close(&what("lse vs cpu"), &flash, &lse, &want_lse, 1e-3);
            let mut want_dqkv = vec![0.0; n];
            CPU.attention_backward(&dout, &qkv, &out, &lse, &mut want_dqkv, shape, None);
            assert_close(&what("dqkv vs cpu"), &flash, &dqkv, &want_dqkv, tol);
            let (s_out, s_lse, s_dqkv) = run(&simple);
            assert_close(&what("out vs the simple kernel"), &flash, &out, &s_out, tol);
            assert_close(&what("lse vs the simple kernel"), &flash, &lse, &s_lse, 1e-3);
            assert_close(&what("dqkv vs the simple kernel"), &flash, &dqkv, &s_dqkv, tol);
            // A prefill runs flash attention (the same bits) and fills the cache; a decoding
            // step reads it.
            let kv = shape.rows() * shape.n_kv_heads * head_dim;
            let (mut k, mut v, mut prefill) = (flash.zeros(kv), flash.zeros(kv), flash.zeros(out.len()));
            flash.attention_cached(
                flash.all(&flash.upload(&qkv)),
                flash.all_mut(&mut k),
                flash.all_mut(&mut v),
                flash.all_mut(&mut prefill),
                shape,
                0,
                seq,
                None,
            );
            assert_eq!(flash.download(&prefill), out, "{}", what("prefill through the cache"));
            check_cached_attention(&flash, shape, seq + 1, &[seq, 1], None);
            // With a window, the prefill runs flash attention with the window's first keys.
            check_cached_attention(&flash, shape, seq + 1, &[seq, 1], Some(37));
        }
    }
}

/// The SSD's products on tensor cores (bf16 operands rounded where they are made), forward
/// and backward, against the CPU and the CUDA-core kernels: a chunk of 80 tokens is two
/// 64-row tiles, the second partial, and the second chunk of 100 tokens is short.
#[test]
fn ssd_on_tensor_cores_matches_the_cpu_and_the_cuda_core_kernels() {
    use ondol_core::{SsdGrads, SsdShape};
    for (tc, simple) in tensor_core_pairs() {
        let tol = tolerance(&tc);
        // And the largest pair in chunks of 256 (four tiles, two passes of the chunk state,
        // over 48 KiB of shared memory) with two groups, the last chunk short.
        for (head_dim, state, chunk, len, groups) in
            [(32, 32, 80, 100, 1), (64, 64, 80, 100, 1), (64, 128, 80, 100, 1), (128, 128, 256, 300, 2)]
        {
            let (batch, heads) = (if chunk == 80 { 2 } else { 1 }, 2);
            let s = SsdShape { batch, len, heads, head_dim, groups, state, chunk };
            let rows = s.rows();
            let fields = [
                (rows * s.xbc_width(), 1, 1.0),
                (rows * s.heads, 2, 1.0),
                (s.heads, 3, 0.5),
                (s.heads, 4, 0.5),
                (s.heads, 5, 1.0),
                (rows * s.inner(), 6, 1.0),
            ];
            // y, states, dxbc, ddt, ddt_bias, da_log, dD.
            let run = |be: &CudaBackend| -> Vec<Vec<f32>> {
                let (_, d) = uploads(be, &fields);
                let x = || ssd_inputs(std::array::from_fn(|i| be.all(&d[i])));
                let (mut y, mut states) = (be.zeros(rows * s.inner()), be.zeros_f32(s.states_len()));
                be.ssd_forward(x(), be.all_mut(&mut y), be.all_mut(&mut states), s);
                let (mut dxbc, mut ddt) = (be.zeros(rows * s.xbc_width()), be.zeros(rows * s.heads));
                let mut acc = [0; 3].map(|_| be.zeros_f32(s.heads));
                {
                    let [ddt_bias, da_log, dd] = acc.each_mut().map(|b| be.all_mut(b));
                    let grads =
                        SsdGrads { dxbc: be.all_mut(&mut dxbc), ddt: be.all_mut(&mut ddt), ddt_bias, da_log, dd };
                    be.ssd_backward(be.all(&d[5]), x(), be.all(&states), grads, s);
                }
                [&y, &states, &dxbc, &ddt].into_iter().chain(&acc).map(|b| be.download(b)).collect()
            };
            let (h, _) = uploads(&tc, &fields);
            let x = ssd_inputs(std::array::from_fn(|i| &h[i][..]));
            let mut want: Vec<Vec<f32>> =
                [rows * s.inner(), s.states_len(), rows * s.xbc_width(), rows * s.heads, s.heads, s.heads, s.heads]
                    .map(|n| vec![0.0; n])
                    .into();
            {
                let [y, states, dxbc, ddt, ddt_bias, da_log, dd] = &mut want[..] else { unreachable!() };
                CPU.ssd_forward(x, y, states, s);
                let grads = SsdGrads { dxbc: &mut dxbc[..], ddt: &mut ddt[..], ddt_bias, da_log, dd };
                CPU.ssd_backward(&h[5], x, &states[..], grads, s);
            }
            let (got, cuda_cores) = (run(&tc), run(&simple));
            let names = ["y", "states", "dxbc", "ddt", "ddt_bias", "da_log", "dD"];
            for (k, name) in names.iter().enumerate() {
                let what = |w: &str| format!("ssd tensor cores P={head_dim} N={state} {name} vs {w}");
                assert_close(&what("cpu"), &tc, &got[k], &want[k], tol);
                assert_close(&what("cuda cores"), &tc, &got[k], &cuda_cores[k], tol);
            }
        }
    }
}
