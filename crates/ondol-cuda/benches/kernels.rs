//! Kernel throughput on GPU 0, bf16: flash attention forward and backward at T = 1024 to
//! 8192 (head dim 128, 16 heads, 16384 tokens a call), against the simple attention kernel at
//! the shortest length; the SSD and the selective scan at Mamba-2 130M's and Mamba 130M's
//! layer shapes. Prints TFLOP/s (attention: the causal half of 4 T^2 D per head forward, 2.5x
//! that backward, FlashAttention's convention) and GB/s of the bytes each op must move, with
//! the device's bf16 peak and the bandwidth of a device-to-device copy (the memory-bound
//! scan's ceiling); GPT-2 124M's MLP GEMMs with GELU in cuBLASLt's epilogue against
//! the GEMM and a GELU pass of its own; its output head's GEMMs at the vocabulary of 50257
//! and padded to 50304, as training runs them; a decoding step of attention over a long KV cache;
//! and Qwen3's q/k head norms and the rotation after them, memory-bound, at a Qwen3 0.6B layer's shape.
//! `benches/kernels-vs-pytorch.py` times PyTorch's peers on the same shapes and, given this
//! bench's output, prints the ratios; `run.sh bench` runs both. Needs a GPU (says so and exits
//! without one).

use ondol_core::backend::{
    Activation, AttnShape, Backend, Gemm, ScanGrads, ScanInputs, ScanShape, SsdGrads, SsdInputs, SsdShape,
};
use ondol_cuda::{CudaBackend, Dtype};
use std::time::Instant;

/// Seconds per call of `f`: one warm-up call, then the best of `reps`.
fn time(be: &CudaBackend, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    be.synchronize();
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let start = Instant::now();
        f();
        be.synchronize();
        best = best.min(start.elapsed().as_secs_f64());
    }
    best
}

/// Attention's forward and backward over sequences of `seq` tokens; with `documents`, packed
/// with documents of that many tokens that attend only within their own (FLOPs counted for
/// the keys attended).
fn attention(be: &CudaBackend, seq: usize, documents: Option<usize>, label: &str) {
    let (heads, d, tokens) = (16, 128, 16384);
    let shape = AttnShape { batch: tokens / seq, seq, n_heads: heads, n_kv_heads: heads, head_dim: d };
    let doc = documents.unwrap_or(seq);
    let first_keys =
        documents.map(|n| be.upload_ids(&(0..tokens).map(|r| (r % seq / n * n) as u32).collect::<Vec<_>>()));
    let first_keys = first_keys.as_ref();
    let qkv = be.upload(&vec![0.01; shape.rows() * shape.qkv_width()]);
    let (mut out, mut lse) = (be.zeros(shape.rows() * shape.q_width()), be.zeros_f32(shape.batch * heads * seq));
    let dout = be.upload(&vec![0.01; shape.rows() * shape.q_width()]);
    let mut dqkv = be.zeros(shape.rows() * shape.qkv_width());
    let fwd = time(be, 5, || {
        be.attention_forward(be.all(&qkv), be.all_mut(&mut out), be.all_mut(&mut lse), shape, first_keys)
    });
    let bwd = time(be, 5, || {
        let (dout, qkv, out, lse) = (be.all(&dout), be.all(&qkv), be.all(&out), be.all(&lse));
        be.attention_backward(dout, qkv, out, lse, be.all_mut(&mut dqkv), shape, first_keys)
    });
    let flops = 2.0 * (tokens / doc * heads * doc * doc * d) as f64;
    println!(
        "{label:<22} T {seq:>5}  documents {doc:>5}  forward {:>7.3} ms {:>6.1} TFLOP/s   backward {:>7.3} ms {:>6.1} TFLOP/s",
        fwd * 1e3,
        flops / fwd / 1e12,
        bwd * 1e3,
        2.5 * flops / bwd / 1e12
    );
}

fn main() {
    let be = match CudaBackend::open(0, Dtype::Bf16) {
        Ok(be) => be,
        Err(e) if std::env::var_os("ONDOL_REQUIRE_GPU").is_some() => {
            eprintln!("ONDOL_REQUIRE_GPU is set, but there is no GPU to measure: {e}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    println!("{}; bf16 dense peak {:?} TFLOP/s", be.name(), be.peak_flops().map(|p| p / 1e12));
    let copy = copy_bandwidth(&be);
    println!("device-to-device copy {copy:.0} GB/s");
    for seq in [1024, 2048, 4096, 8192] {
        attention(&be, seq, None, "flash attention");
    }
    // Documents of 1024 tokens packed into 8192: the tiles outside each document are skipped,
    // so the time should be about T = 1024's.
    attention(&be, 8192, Some(1024), "flash attention");
    attention(
        &CudaBackend::open(0, Dtype::Bf16).expect("opened above").without_tensor_cores(),
        1024,
        None,
        "simple attention",
    );

    decode(&be);
    gelu_mlp(&be);
    for vocab in [50257, 50304] {
        logits_gemms(&be, vocab);
    }
    head_norms_and_rope(&be, copy);
    ssd(&be, "ssd (mamba2-130m layer, tensor cores)");
    ssd(&CudaBackend::open(0, Dtype::Bf16).expect("opened above").without_tensor_cores(), "ssd (cuda cores)");

    // The selective scan of one Mamba 130M layer: 8 x 2048 tokens, 1536 channels, 16 states.
    let sc = ScanShape { batch: 8, len: 2048, channels: 1536, state: 16, chunk: 256 };
    let (rows, ch, n) = (sc.batch * sc.len, sc.channels, sc.state);
    let act = be.upload(&vec![0.01; rows * ch]);
    let bc = be.upload(&vec![0.01; rows * n]);
    let (per_ch, a_log) = (be.upload(&vec![0.1; ch]), be.upload(&vec![0.1; ch * n]));
    let inputs = || ScanInputs {
        u: be.all(&act),
        delta: be.all(&act),
        delta_bias: be.all(&per_ch),
        a_log: be.all(&a_log),
        b: be.all(&bc),
        c: be.all(&bc),
        d: be.all(&per_ch),
        z: be.all(&act),
    };
    let (mut y, mut states) = (be.zeros(rows * ch), be.zeros_f32(sc.batch * sc.saved() * ch * n));
    let fwd = time(&be, 3, || be.selective_scan_forward(inputs(), be.all_mut(&mut y), be.all_mut(&mut states), sc));
    let mut g = [rows * ch, rows * ch, rows * n, rows * n, rows * ch].map(|len| be.zeros(len));
    let mut acc = [ch, ch * n, ch].map(|len| be.zeros_f32(len));
    let bwd = time(&be, 3, || {
        let [du, ddelta, db, dc, dz] = g.each_mut().map(|b| be.all_mut(b));
        let [ddelta_bias, da_log, dd] = acc.each_mut().map(|b| be.all_mut(b));
        let grads = ScanGrads { du, ddelta, ddelta_bias, da_log, db, dc, dd, dz };
        be.selective_scan_backward(be.all(&y), inputs(), be.all(&states), grads, sc)
    });
    // Reads u, delta, z and writes y (bf16); B and C are read once per channel block.
    let bytes = 2.0 * (4 * rows * ch) as f64;
    let bwd_bytes = 2.0 * (8 * rows * ch) as f64;
    let (fwd_gbs, bwd_gbs) = (bytes / fwd / 1e9, bwd_bytes / bwd / 1e9);
    println!(
        "selective scan (mamba-130m layer) forward {:.3} ms {fwd_gbs:.0} GB/s   backward {:.3} ms {bwd_gbs:.0} GB/s   \
         ({:.0} % and {:.0} % of the copy's)",
        fwd * 1e3,
        bwd * 1e3,
        100.0 * fwd_gbs / copy,
        100.0 * bwd_gbs / copy
    );
}

/// GB/s of a device-to-device copy of 1 GiB, bytes read plus bytes written: about what a
/// memory-bound kernel can reach at most (H100 SXM: about 3000).
fn copy_bandwidth(be: &CudaBackend) -> f64 {
    let n = 1 << 28;
    let (src, dst) = (be.zeros_f32(n), be.zeros_f32(n));
    let ptr = |buf| be.device_slice(be.all(buf)).expect("a GPU buffer").ptr;
    let (from, to) = (ptr(&src), ptr(&dst));
    let stream = be.stream().expect("a GPU backend has a stream");
    stream.context().bind_to_thread().expect("the GPU's context");
    let secs = time(be, 5, || {
        // SAFETY: both buffers hold `n` f32 and live until the copies are waited for.
        unsafe { cudarc::driver::result::memcpy_dtod_async(to, from, 4 * n, stream.cu_stream()) }
            .expect("a device-to-device copy")
    });
    2.0 * (4 * n) as f64 / secs / 1e9
}

/// Qwen3's q_norm and k_norm forward and backward, and the rotary embedding, over the fused qkv
/// of one Qwen3 0.6B layer: 8 x 2048 tokens, 16 query heads and 8 kv heads of 128. GB/s of
/// the bytes each must move (bf16): the norm's forward reads qkv and writes all of it, its
/// backward reads the q and k heads' gradient and input and writes their gradient, the
/// rotation reads and writes the q and k heads.
fn head_norms_and_rope(be: &CudaBackend, copy: f64) {
    let shape = AttnShape { batch: 8, seq: 2048, n_heads: 16, n_kv_heads: 8, head_dim: 128 };
    let (n, normed) = (shape.rows() * shape.qkv_width(), shape.rows() * (shape.n_heads + shape.n_kv_heads));
    let (x, w) = (be.upload(&vec![0.01; n]), be.upload(&vec![1.0; 2 * shape.head_dim]));
    let (mut out, mut rstd, mut dw) = (be.zeros(n), be.zeros_f32(normed), be.zeros_f32(2 * shape.head_dim));
    let table = be.upload_f32(&ondol_core::backend::rope_table(shape.seq, shape.head_dim, 1e6));
    let fwd = time(be, 5, || {
        be.qk_norm_forward(be.all(&x), be.all(&w), be.all_mut(&mut out), be.all_mut(&mut rstd), shape, 1e-6)
    });
    let bwd = time(be, 5, || {
        be.qk_norm_backward(be.all_mut(&mut out), be.all(&x), be.all(&w), be.all(&rstd), be.all_mut(&mut dw), shape)
    });
    let rope = time(be, 5, || be.rope(be.all_mut(&mut out), be.all(&table), shape, false, 1.0));
    let qk = normed * shape.head_dim;
    let rates = [(fwd, 2 * n), (bwd, 3 * qk), (rope, 2 * qk)].map(|(secs, values)| 2.0 * values as f64 / secs / 1e9);
    println!(
        "qk norm (qwen3-0.6b layer) forward {:.3} ms {:.0} GB/s   backward {:.3} ms {:.0} GB/s   rope {:.3} ms {:.0} GB/s   \
         ({:.0} %, {:.0} % and {:.0} % of the copy's)",
        fwd * 1e3,
        rates[0],
        bwd * 1e3,
        rates[1],
        rope * 1e3,
        rates[2],
        100.0 * rates[0] / copy,
        100.0 * rates[1] / copy,
        100.0 * rates[2] / copy
    );
}

/// The SSD of one Mamba-2 130M layer: 8 x 2048 tokens, 24 heads of 64, N 128, chunks of 256.
fn ssd(be: &CudaBackend, label: &str) {
    let s = SsdShape { batch: 8, len: 2048, heads: 24, head_dim: 64, groups: 1, state: 128, chunk: 256 };
    let xbc = be.upload(&vec![0.01; s.rows() * s.xbc_width()]);
    let dt = be.upload(&vec![0.01; s.rows() * s.heads]);
    let per_head = be.upload(&vec![0.1; s.heads]);
    let inputs = || SsdInputs {
        xbc: be.all(&xbc),
        dt: be.all(&dt),
        dt_bias: be.all(&per_head),
        a_log: be.all(&per_head),
        d: be.all(&per_head),
    };
    let (mut y, mut states) = (be.zeros(s.rows() * s.inner()), be.zeros_f32(s.states_len()));
    let fwd = time(be, 3, || be.ssd_forward(inputs(), be.all_mut(&mut y), be.all_mut(&mut states), s));
    let (mut dxbc, mut ddt) = (be.zeros(s.rows() * s.xbc_width()), be.zeros(s.rows() * s.heads));
    let mut acc = [0; 3].map(|_| be.zeros_f32(s.heads));
    let bwd = time(be, 3, || {
        let [ddt_bias, da_log, dd] = acc.each_mut().map(|b| be.all_mut(b));
        let grads = SsdGrads { dxbc: be.all_mut(&mut dxbc), ddt: be.all_mut(&mut ddt), ddt_bias, da_log, dd };
        be.ssd_backward(be.all(&y), inputs(), be.all(&states), grads, s)
    });
    // Useful multiply-adds forward, per (token, head): the causal quadratic form, C B^T and
    // W X over Q / 2 keys on average, the carried state's readout C H0^T and the chunk
    // state's share (w x)^T B, P N each.
    let macs = (s.rows() * s.heads * (s.chunk / 2 * (s.state + s.head_dim) + 2 * s.head_dim * s.state)) as f64;
    let bytes = 2.0 * (s.rows() * (s.xbc_width() + s.inner())) as f64 + 4.0 * s.states_len() as f64;
    println!(
        "{label:<38} forward {:.3} ms {:.1} TFLOP/s {:.0} GB/s   backward {:.3} ms",
        fwd * 1e3,
        2.0 * macs / fwd / 1e12,
        bytes / fwd / 1e9,
        bwd * 1e3
    );
}

/// One token of Llama-3 8B's attention (32 query heads on 8 kv heads of 128) over a KV cache
/// of 4096 and 32768 positions at batch 1: GB/s of the cache it must read (memory-bound).
fn decode(be: &CudaBackend) {
    let shape = AttnShape { batch: 1, seq: 1, n_heads: 32, n_kv_heads: 8, head_dim: 128 };
    let qkv = be.upload(&vec![0.01; shape.qkv_width()]);
    let mut out = be.zeros(shape.q_width());
    for max_seq in [4096, 32_768] {
        let kv = max_seq * shape.n_kv_heads * shape.head_dim;
        let (mut k, mut v) = (be.upload(&vec![0.01; kv]), be.upload(&vec![0.01; kv]));
        let pos = max_seq - 1;
        let t = time(be, 10, || {
            be.attention_cached(
                be.all(&qkv),
                be.all_mut(&mut k),
                be.all_mut(&mut v),
                be.all_mut(&mut out),
                shape,
                pos,
                max_seq,
                None,
            )
        });
        println!(
            "decode (llama-3 8b layer) over {max_seq:>5} cached  {:.3} ms {:.0} GB/s",
            t * 1e3,
            2.0 * 2.0 * kv as f64 / t / 1e9
        );
    }
}

/// GPT-2 124M's output head at 16 x 1024 tokens: the logits, the input's gradient and the
/// embedding's (f32), at GPT-2's vocabulary of 50257 and padded to 50304. Rows of 50257
/// bf16 are 2-byte aligned only, which leaves cuBLASLt fewer (slower) algorithms; training
/// pads the head to 50304 rows (`HEAD_ROW_ALIGN`), and the pair says what that gains.
fn logits_gemms(be: &CudaBackend, vocab: usize) {
    let (rows, d) = (16 * 1024, 768);
    let (x, wte) = (be.upload(&vec![0.01; rows * d]), be.upload(&vec![0.01; vocab * d]));
    let (mut logits, mut dx, mut dwte) = (be.zeros(rows * vocab), be.zeros(rows * d), be.zeros_f32(vocab * d));
    let forward = Gemm::new(rows, vocab, d, false, true);
    let input_grad = Gemm::new(rows, d, vocab, false, false);
    let weight_grad = Gemm::new(vocab, d, rows, true, false);
    let t = [
        time(be, 5, || be.gemm(forward, be.all(&x), be.all(&wte), be.all_mut(&mut logits))),
        time(be, 5, || be.gemm(input_grad, be.all(&logits), be.all(&wte), be.all_mut(&mut dx))),
        time(be, 5, || be.gemm(weight_grad, be.all(&logits), be.all(&x), be.all_mut(&mut dwte))),
    ];
    let tflops = |t: f64| 2.0 * (rows * d * vocab) as f64 / t / 1e12;
    println!(
        "gpt2-124m head, vocab {vocab}  logits {:.3} ms {:.0} TFLOP/s   dx {:.3} ms {:.0} TFLOP/s   dW {:.3} ms {:.0} TFLOP/s",
        t[0] * 1e3,
        tflops(t[0]),
        t[1] * 1e3,
        tflops(t[1]),
        t[2] * 1e3,
        tflops(t[2])
    );
}

/// GPT-2 124M's c_fc with GELU (8 x 1024 tokens, 768 -> 3072) and the backward through it
/// from c_proj's output gradient: in the GEMMs' epilogues, and as the GEMM and a GELU pass.
fn gelu_mlp(be: &CudaBackend) {
    let (rows, d, hidden) = (8 * 1024, 768, 3072);
    let (x, w, bias) =
        (be.upload(&vec![0.01; rows * d]), be.upload(&vec![0.01; d * hidden]), be.upload(&vec![0.1; hidden]));
    let [mut pre, mut act, mut dpre, mut scratch] = [0; 4].map(|_| be.zeros(rows * hidden));
    let (fwd, bwd) = (Gemm::new(rows, hidden, d, false, false), Gemm::new(rows, hidden, d, false, true));
    let fused = time(be, 5, || {
        be.gemm_activation(
            fwd,
            be.all(&x),
            be.all(&w),
            Some(be.all(&bias)),
            Activation::Gelu,
            be.all_mut(&mut pre),
            be.all_mut(&mut act),
        )
    });
    let fused_bwd = time(be, 5, || {
        let (pre, dpre) = (be.all(&pre), be.all_mut(&mut dpre));
        be.gemm_activation_backward(bwd, be.all(&x), be.all(&w), Activation::Gelu, pre, dpre, be.all_mut(&mut scratch))
    });
    let apart = time(be, 5, || {
        be.gemm_bias(fwd, be.all(&x), be.all(&w), be.all(&bias), be.all_mut(&mut pre));
        be.activation_forward(Activation::Gelu, be.all(&pre), be.all_mut(&mut act))
    });
    let apart_bwd = time(be, 5, || {
        be.gemm(bwd, be.all(&x), be.all(&w), be.all_mut(&mut scratch));
        be.activation_backward(Activation::Gelu, be.all(&scratch), be.all(&pre), be.all_mut(&mut dpre))
    });
    let flops = 2.0 * (rows * d * hidden) as f64;
    let tflops = |t: f64| flops / t / 1e12;
    println!(
        "gpt2-124m c_fc + GELU  forward: epilogue {:.3} ms {:.0} TFLOP/s, apart {:.3} ms {:.0} TFLOP/s   \
         backward: epilogue {:.3} ms {:.0} TFLOP/s, apart {:.3} ms {:.0} TFLOP/s",
        fused * 1e3,
        tflops(fused),
        apart * 1e3,
        tflops(apart),
        fused_bwd * 1e3,
        tflops(fused_bwd),
        apart_bwd * 1e3,
        tflops(apart_bwd)
    );
}
