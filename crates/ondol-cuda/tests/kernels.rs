//! Every kernel against the CPU reference, on random inputs of awkward sizes (not multiples
//! of a block), in fp32 storage (agreement to fp32 round-off) and bf16 storage (inputs
//! rounded to bf16 on both sides; the tolerance covers bf16 outputs). Each check prints its
//! worst error. Without a GPU every test prints why and passes, unless ONDOL_REQUIRE_GPU is
//! set, as the GPU bundle's run.sh (scripts/gpu-bundle.sh) sets it.

use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};
use ondol_core::backend::{AttnShape, rope_table};
use ondol_core::{Activation, AdamWParams, Backend, Rng};
use ondol_cpu::CpuBackend;
use ondol_cuda::Gpu;

fn gpu() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) if std::env::var_os("ONDOL_REQUIRE_GPU").is_some() => panic!("ONDOL_REQUIRE_GPU is set: {e}"),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// The storage type a kernel is instantiated for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Storage {
    F32,
    Bf16,
}

impl Storage {
    fn suffix(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::Bf16 => "bf16",
        }
    }
    /// Worst error allowed, relative to the largest reference value.
    fn tolerance(self) -> f32 {
        match self {
            Storage::F32 => 2e-5,
            Storage::Bf16 => 2e-2,
        }
    }
    /// `x` as this storage holds it.
    fn round(self, x: &[f32]) -> Vec<f32> {
        match self {
            Storage::F32 => x.to_vec(),
            Storage::Bf16 => x.iter().map(|&v| from_bf16(to_bf16(v))).collect(),
        }
    }
}

/// Round to nearest even, as the kernels' from_float<bf16> does.
fn to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// A device buffer in one storage type.
enum Buf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl Buf {
    fn arg<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        match self {
            Buf::F32(s) => b.arg(s),
            Buf::Bf16(s) => b.arg(s),
        };
    }
}

fn up(gpu: &Gpu, s: Storage, x: &[f32]) -> Buf {
    match s {
        Storage::F32 => Buf::F32(gpu.stream.clone_htod(x).unwrap()),
        Storage::Bf16 => Buf::Bf16(gpu.stream.clone_htod(&x.iter().map(|&v| to_bf16(v)).collect::<Vec<_>>()).unwrap()),
    }
}

fn down(gpu: &Gpu, b: &Buf) -> Vec<f32> {
    match b {
        Buf::F32(s) => gpu.stream.clone_dtoh(s).unwrap(),
        Buf::Bf16(s) => gpu.stream.clone_dtoh(s).unwrap().into_iter().map(from_bf16).collect(),
    }
}

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| scale * rng.normal() as f32).collect()
}

/// Asserts `got` matches `want` to `tol` relative to want's largest magnitude; prints the error.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
    eprintln!("{what:<40} max abs error {worst:.3e}  relative {:.3e}  (tolerance {tol:.0e})", worst / scale);
    assert!(worst <= tol * scale, "{what}: max error {worst} against largest value {scale}");
}

fn rows(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn flat(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256).min(1024) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

const STORAGES: [Storage; 2] = [Storage::F32, Storage::Bf16];

#[test]
fn norms_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let (n_rows, dim, eps) = (37usize, 1000usize, 1e-5f32);
    let cpu = CpuBackend;
    for s in STORAGES {
        let x = s.round(&random(n_rows * dim, 1, 1.0));
        let w = s.round(&random(dim, 2, 1.0));
        let b = s.round(&random(dim, 3, 0.5));
        let dy = s.round(&random(n_rows * dim, 4, 1.0));
        let dx0 = s.round(&random(n_rows * dim, 5, 0.1));
        let dw0 = random(dim, 6, 0.1);
        let t = s.suffix();
        let (ri, di) = (n_rows as i32, dim as i32);
        let backward_cfg = |parts: usize| LaunchConfig {
            grid_dim: (16, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (parts * dim * 4) as u32,
        };

        // RMSNorm.
        let (mut out, mut rstd) = (vec![0.0; n_rows * dim], vec![0.0; n_rows]);
        cpu.rmsnorm_forward(&x, &w, &mut out, &mut rstd, dim, eps);
        let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
        cpu.rmsnorm_backward(&dy, &x, &w, &rstd, &mut dx, &mut dw, dim);
        let (gx, gw, gdy) = (up(&gpu, s, &x), up(&gpu, s, &w), up(&gpu, s, &dy));
        let gout = up(&gpu, s, &vec![0.0; n_rows * dim]);
        let grstd = gpu.stream.alloc_zeros::<f32>(n_rows).unwrap();
        let f = gpu.function("norms", &format!("rmsnorm_forward_{t}")).unwrap();
        let mut l = gpu.stream.launch_builder(&f);
        gx.arg(&mut l);
        gw.arg(&mut l);
        gout.arg(&mut l);
        l.arg(&grstd).arg(&ri).arg(&di).arg(&eps);
        unsafe { l.launch(rows(n_rows)) }.unwrap();
        assert_close(&format!("rmsnorm forward {t}"), &down(&gpu, &gout), &s.round(&out), s.tolerance());
        assert_close(&format!("rmsnorm rstd {t}"), &gpu.stream.clone_dtoh(&grstd).unwrap(), &rstd, 2e-5);
        let (gdx, gdw) = (up(&gpu, s, &dx0), gpu.stream.clone_htod(&dw0).unwrap());
        let f = gpu.function("norms", &format!("rmsnorm_backward_{t}")).unwrap();
        let mut l = gpu.stream.launch_builder(&f);
        gdy.arg(&mut l);
        gx.arg(&mut l);
        gw.arg(&mut l);
        l.arg(&grstd);
        gdx.arg(&mut l);
        l.arg(&gdw).arg(&ri).arg(&di);
        unsafe { l.launch(backward_cfg(1)) }.unwrap();
        assert_close(&format!("rmsnorm backward dx {t}"), &down(&gpu, &gdx), &dx, s.tolerance());
        assert_close(&format!("rmsnorm backward dw {t}"), &gpu.stream.clone_dtoh(&gdw).unwrap(), &dw, 1e-4);

        // LayerNorm.
        let (mut out, mut mean, mut rstd) = (vec![0.0; n_rows * dim], vec![0.0; n_rows], vec![0.0; n_rows]);
        cpu.layernorm_forward(&x, &w, &b, &mut out, &mut mean, &mut rstd, dim, eps);
        let (mut dx, mut dw, mut db) = (dx0.clone(), dw0.clone(), dw0.clone());
        cpu.layernorm_backward(&dy, &x, &w, &mean, &rstd, &mut dx, &mut dw, &mut db, dim);
        let gb = up(&gpu, s, &b);
        let (gmean, grstd) =
            (gpu.stream.alloc_zeros::<f32>(n_rows).unwrap(), gpu.stream.alloc_zeros::<f32>(n_rows).unwrap());
        let f = gpu.function("norms", &format!("layernorm_forward_{t}")).unwrap();
        let mut l = gpu.stream.launch_builder(&f);
        gx.arg(&mut l);
        gw.arg(&mut l);
        gb.arg(&mut l);
        gout.arg(&mut l);
        l.arg(&gmean).arg(&grstd).arg(&ri).arg(&di).arg(&eps);
        unsafe { l.launch(rows(n_rows)) }.unwrap();
        assert_close(&format!("layernorm forward {t}"), &down(&gpu, &gout), &s.round(&out), s.tolerance());
        let (gdx, gdw, gdb) =
            (up(&gpu, s, &dx0), gpu.stream.clone_htod(&dw0).unwrap(), gpu.stream.clone_htod(&dw0).unwrap());
        let f = gpu.function("norms", &format!("layernorm_backward_{t}")).unwrap();
        let mut l = gpu.stream.launch_builder(&f);
        gdy.arg(&mut l);
        gx.arg(&mut l);
        gw.arg(&mut l);
        l.arg(&gmean).arg(&grstd);
        gdx.arg(&mut l);
        l.arg(&gdw).arg(&gdb).arg(&ri).arg(&di);
        unsafe { l.launch(backward_cfg(2)) }.unwrap();
        assert_close(&format!("layernorm backward dx {t}"), &down(&gpu, &gdx), &dx, s.tolerance());
        assert_close(&format!("layernorm backward dw {t}"), &gpu.stream.clone_dtoh(&gdw).unwrap(), &dw, 1e-4);
        assert_close(&format!("layernorm backward db {t}"), &gpu.stream.clone_dtoh(&gdb).unwrap(), &db, 1e-4);
    }
}

#[test]
fn activations_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = CpuBackend;
    let (n_rows, width) = (33usize, 250usize);
    let n = n_rows * width;
    for s in STORAGES {
        let t = s.suffix();
        let gate_up = s.round(&random(2 * n, 11, 2.0));
        let dy = s.round(&random(n, 12, 1.0));
        let mut out = vec![0.0; n];
        cpu.swiglu_forward(&gate_up, &mut out, width);
        let mut dgu = vec![0.0; 2 * n];
        cpu.swiglu_backward(&dy, &gate_up, &mut dgu, width);
        let (ggu, gdy, gout, gdgu) =
            (up(&gpu, s, &gate_up), up(&gpu, s, &dy), up(&gpu, s, &vec![0.0; n]), up(&gpu, s, &vec![0.0; 2 * n]));
        let (nn, wi) = (n as i64, width as i32);
        let f = gpu.function("activations", &format!("swiglu_forward_{t}")).unwrap();
        let mut l = gpu.stream.launch_builder(&f);
        ggu.arg(&mut l);
        gout.arg(&mut l);
        l.arg(&nn).arg(&wi);
        unsafe { l.launch(flat(n)) }.unwrap();
        assert_close(&format!("swiglu forward {t}"), &down(&gpu, &gout), &s.round(&out), s.tolerance());
        let f = gpu.function("activations", &format!("swiglu_backward_{t}")).unwrap();
        let mut l = gpu.stream.launch_builder(&f);
        gdy.arg(&mut l);
        ggu.arg(&mut l);
        gdgu.arg(&mut l);
        l.arg(&nn).arg(&wi);
        unsafe { l.launch(flat(n)) }.unwrap();
        assert_close(&format!("swiglu backward {t}"), &down(&gpu, &gdgu), &s.round(&dgu), s.tolerance());

        for (kind, act) in [(0i32, Activation::Gelu), (1, Activation::Relu2)] {
            let x = s.round(&random(n, 13, 2.0));
            let (mut y, mut dx) = (vec![0.0; n], vec![0.0; n]);
            cpu.activation_forward(act, &x, &mut y);
            cpu.activation_backward(act, &dy, &x, &mut dx);
            let (gx, gy, gdx) = (up(&gpu, s, &x), up(&gpu, s, &vec![0.0; n]), up(&gpu, s, &vec![0.0; n]));
            let f = gpu.function("activations", &format!("activation_forward_{t}")).unwrap();
            let mut l = gpu.stream.launch_builder(&f);
            l.arg(&kind);
            gx.arg(&mut l);
            gy.arg(&mut l);
            l.arg(&nn);
            unsafe { l.launch(flat(n)) }.unwrap();
            assert_close(&format!("{act:?} forward {t}"), &down(&gpu, &gy), &s.round(&y), s.tolerance());
            let f = gpu.function("activations", &format!("activation_backward_{t}")).unwrap();
            let mut l = gpu.stream.launch_builder(&f);
            l.arg(&kind);
            gdy.arg(&mut l);
            gx.arg(&mut l);
            gdx.arg(&mut l);
            l.arg(&nn);
            unsafe { l.launch(flat(n)) }.unwrap();
            assert_close(&format!("{act:?} backward {t}"), &down(&gpu, &gdx), &s.round(&dx), s.tolerance());
        }
    }
}

#[test]
fn embeddings_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = CpuBackend;
    // A shard of 40 table rows holding ids 10..50, looked up by ids 0..60 (some outside it).
    let (n_rows, dim, table_rows, first_id, seq) = (53usize, 70usize, 40usize, 10usize, 7usize);
    let mut rng = Rng::new(21);
    let ids: Vec<u32> = (0..n_rows).map(|_| rng.below(60) as u32).collect();
    for s in STORAGES {
        let t = s.suffix();
        let table = s.round(&random(table_rows * dim, 22, 1.0));
        let pos = s.round(&random(seq * dim, 23, 1.0));
        let dy = s.round(&random(n_rows * dim, 24, 1.0));
        let mut out = vec![0.0; n_rows * dim];
        cpu.embedding_forward(&ids, &table, first_id, Some((&pos, seq)), &mut out, dim);
        let (mut dtable, mut dpos) = (random(table_rows * dim, 25, 0.1), random(seq * dim, 26, 0.1));
        let (dtable0, dpos0) = (dtable.clone(), dpos.clone());
        cpu.embedding_backward(&ids, &dy, &mut dtable, first_id, dim);
        cpu.position_embedding_backward(&dy, &mut dpos, seq, dim);

        let gids = gpu.stream.clone_htod(&ids).unwrap();
        let (gtable, gpos, gdy, gout) =
            (up(&gpu, s, &table), up(&gpu, s, &pos), up(&gpu, s, &dy), up(&gpu, s, &vec![0.0; n_rows * dim]));
        let (tr, fi, sq, nr, di) = (table_rows as i32, first_id as i32, seq as i32, n_rows as i64, dim as i32);
        let f = gpu.function("embedding", &format!("embedding_forward_{t}")).unwrap();
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(&gids);
        gtable.arg(&mut l);
        l.arg(&tr).arg(&fi);
        gpos.arg(&mut l);
        l.arg(&sq);
        gout.arg(&mut l);
        l.arg(&nr).arg(&di);
        unsafe { l.launch(flat(n_rows * dim)) }.unwrap();
        assert_close(&format!("embedding forward {t}"), &down(&gpu, &gout), &s.round(&out), s.tolerance());

        let (gdtable, gdpos) = (gpu.stream.clone_htod(&dtable0).unwrap(), gpu.stream.clone_htod(&dpos0).unwrap());
        let f = gpu.function("embedding", &format!("embedding_backward_{t}")).unwrap();
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(&gids);
        gdy.arg(&mut l);
        l.arg(&gdtable).arg(&tr).arg(&fi).arg(&nr).arg(&di);
        unsafe { l.launch(flat(n_rows * dim)) }.unwrap();
        assert_close(&format!("embedding backward {t}"), &gpu.stream.clone_dtoh(&gdtable).unwrap(), &dtable, 1e-5);
        let f = gpu.function("embedding", &format!("position_embedding_backward_{t}")).unwrap();
        let mut l = gpu.stream.launch_builder(&f);
        gdy.arg(&mut l);
        l.arg(&gdpos).arg(&sq).arg(&nr).arg(&di);
        unsafe { l.launch(flat(n_rows * dim)) }.unwrap();
        assert_close(&format!("position embedding backward {t}"), &gpu.stream.clone_dtoh(&gdpos).unwrap(), &dpos, 1e-5);
    }
}

#[test]
fn cross_entropy_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = CpuBackend;
    let (n_rows, vocab, scale) = (29usize, 1001usize, 0.25f32);
    let mut rng = Rng::new(31);
    let targets: Vec<u32> = (0..n_rows).map(|_| rng.below(vocab as u64) as u32).collect();
    let gtargets = gpu.stream.clone_htod(&targets).unwrap();
    for s in STORAGES {
        let t = s.suffix();
        let logits = s.round(&random(n_rows * vocab, 32, 3.0));
        let (mut dlogits, mut losses) = (logits.clone(), vec![0.0; n_rows]);
        cpu.cross_entropy(&mut dlogits, &targets, &mut losses, vocab, Some(scale));
        let glogits = up(&gpu, s, &logits);
        let glosses = gpu.stream.alloc_zeros::<f32>(n_rows).unwrap();
        let (ri, vi) = (n_rows as i32, vocab as i32);
        let f = gpu.function("cross_entropy", &format!("cross_entropy_{t}")).unwrap();
        let mut l = gpu.stream.launch_builder(&f);
        glogits.arg(&mut l);
        l.arg(&gtargets).arg(&glosses).arg(&ri).arg(&vi).arg(&scale);
        unsafe { l.launch(rows(n_rows)) }.unwrap();
        assert_close(&format!("cross-entropy loss {t}"), &gpu.stream.clone_dtoh(&glosses).unwrap(), &losses, 1e-5);
        assert_close(&format!("cross-entropy dlogits {t}"), &down(&gpu, &glogits), &s.round(&dlogits), s.tolerance());

        // The vocab-parallel halves on a shard of ids 100..500.
        let (first_id, shard) = (100usize, 400usize);
        let part: Vec<f32> = logits.chunks(vocab).flat_map(|r| r[first_id..first_id + shard].to_vec()).collect();
        let mut stats = vec![0.0; 3 * n_rows];
        cpu.cross_entropy_stats(&part, &targets, &mut stats, first_id, shard);
        let lse: Vec<f32> = stats.chunks(3).map(|s| s[0] + s[1].ln()).collect();
        let mut grad = part.clone();
        cpu.cross_entropy_grad(&mut grad, &targets, &lse, first_id, shard, scale);
        let gpart = up(&gpu, s, &part);
        let gstats = gpu.stream.alloc_zeros::<f32>(3 * n_rows).unwrap();
        let (fi, si) = (first_id as i32, shard as i32);
        let f = gpu.function("cross_entropy", &format!("cross_entropy_stats_{t}")).unwrap();
        let mut l = gpu.stream.launch_builder(&f);
        gpart.arg(&mut l);
        l.arg(&gtargets).arg(&gstats).arg(&ri).arg(&fi).arg(&si);
        unsafe { l.launch(rows(n_rows)) }.unwrap();
        assert_close(&format!("cross-entropy shard stats {t}"), &gpu.stream.clone_dtoh(&gstats).unwrap(), &stats, 1e-5);
        let glse = gpu.stream.clone_htod(&lse).unwrap();
        let f = gpu.function("cross_entropy", &format!("cross_entropy_grad_{t}")).unwrap();
        let mut l = gpu.stream.launch_builder(&f);
        gpart.arg(&mut l);
        l.arg(&gtargets).arg(&glse).arg(&ri).arg(&fi).arg(&si).arg(&scale);
        unsafe { l.launch(rows(n_rows)) }.unwrap();
        assert_close(&format!("cross-entropy shard dlogits {t}"), &down(&gpu, &gpart), &s.round(&grad), s.tolerance());
    }
}

#[test]
fn adamw_and_the_gradient_norm_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = CpuBackend;
    let n = 10_007usize;
    let hp = AdamWParams { lr: 3e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 7, grad_scale: 0.5 };
    let (p0, g) = (random(n, 41, 1.0), random(n, 42, 1.0));
    let (m0, v0) = (random(n, 43, 0.1), random(n, 44, 0.1).iter().map(|v| v * v).collect::<Vec<_>>());
    let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
    cpu.adamw(&mut p, &g, &mut m, &mut v, hp, None);

    let (gp, gg) = (gpu.stream.clone_htod(&p0).unwrap(), gpu.stream.clone_htod(&g).unwrap());
    let (gm, gv) = (gpu.stream.clone_htod(&m0).unwrap(), gpu.stream.clone_htod(&v0).unwrap());
    let copy = gpu.stream.alloc_zeros::<u16>(n).unwrap();
    let bc1 = 1.0 - (hp.beta1 as f64).powi(hp.step as i32);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(hp.step as i32);
    let (step_size, inv_bc2_sqrt) = ((hp.lr as f64 / bc1) as f32, (1.0 / bc2.sqrt()) as f32);
    let (decay, nn) = (1.0 - hp.lr * hp.weight_decay, n as i64);
    let f = gpu.function("adamw", "adamw").unwrap();
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&gp).arg(&gg).arg(&gm).arg(&gv).arg(&copy).arg(&nn);
    l.arg(&hp.beta1).arg(&hp.beta2).arg(&hp.eps).arg(&step_size).arg(&inv_bc2_sqrt).arg(&decay).arg(&hp.grad_scale);
    unsafe { l.launch(flat(n)) }.unwrap();
    let got = gpu.stream.clone_dtoh(&gp).unwrap();
    assert_close("adamw params", &got, &p, 1e-6);
    assert_close("adamw m", &gpu.stream.clone_dtoh(&gm).unwrap(), &m, 1e-6);
    assert_close("adamw v", &gpu.stream.clone_dtoh(&gv).unwrap(), &v, 1e-6);
    let bf16: Vec<f32> = gpu.stream.clone_dtoh(&copy).unwrap().into_iter().map(from_bf16).collect();
    // The copy is the kernel's own new weights, rounded to bf16: exactly.
    assert_close("adamw bf16 copy", &bf16, &Storage::Bf16.round(&got), 0.0);

    let out = gpu.stream.alloc_zeros::<f64>(1).unwrap();
    let f = gpu.function("adamw", "sum_squares").unwrap();
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&gg).arg(&nn).arg(&out);
    unsafe { l.launch(flat(n)) }.unwrap();
    let (got, want) = (gpu.stream.clone_dtoh(&out).unwrap()[0], cpu.sum_squares(&g));
    eprintln!("sum of squares                           {got} vs {want}");
    assert!((got - want).abs() <= 1e-5 * want, "sum of squares {got} vs {want}");
}

#[test]
fn rope_and_attention_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = CpuBackend;
    // Four query heads sharing two kv heads, a sequence that is not a multiple of any block.
    let shape = AttnShape { batch: 2, seq: 37, n_heads: 4, n_kv_heads: 2, head_dim: 16 };
    let (n, width) = (shape.rows(), shape.qkv_width());
    let table = rope_table(shape.seq, shape.head_dim, 10_000.0);
    let gtable = gpu.stream.clone_htod(&table).unwrap();
    let (seq, h, hkv, d) = (shape.seq as i32, shape.n_heads as i32, shape.n_kv_heads as i32, shape.head_dim as i32);
    let rows_i64 = n as i64;
    for s in STORAGES {
        let t = s.suffix();
        let qkv = s.round(&random(n * width, 51, 1.0));
        for inverse in [0i32, 1] {
            let mut want = qkv.clone();
            cpu.rope(&mut want, &table, shape, inverse == 1);
            let g = up(&gpu, s, &qkv);
            let f = gpu.function("rope", &format!("rope_{t}")).unwrap();
            let mut l = gpu.stream.launch_builder(&f);
            g.arg(&mut l);
            l.arg(&gtable).arg(&rows_i64).arg(&seq).arg(&h).arg(&hkv).arg(&d).arg(&inverse);
            unsafe { l.launch(flat(n * (shape.n_heads + shape.n_kv_heads) * shape.head_dim / 2)) }.unwrap();
            assert_close(&format!("rope inverse={inverse} {t}"), &down(&gpu, &g), &s.round(&want), s.tolerance());
        }

        let (mut out, mut lse) = (vec![0.0; n * shape.q_width()], vec![0.0; shape.batch * shape.n_heads * shape.seq]);
        cpu.attention_forward(&qkv, &mut out, &mut lse, shape);
        let dout = s.round(&random(n * shape.q_width(), 52, 1.0));
        // The CPU's backward from the same (rounded) forward output the GPU will see.
        let out_seen = s.round(&out);
        let mut dqkv = vec![0.0; n * width];
        cpu.attention_backward(&dout, &qkv, &out_seen, &lse, &mut dqkv, shape);

        let (gqkv, gout) = (up(&gpu, s, &qkv), up(&gpu, s, &vec![0.0; out.len()]));
        let glse = gpu.stream.alloc_zeros::<f32>(lse.len()).unwrap();
        let smem = ((shape.seq + shape.head_dim) * 4) as u32;
        let grid = LaunchConfig {
            grid_dim: (shape.seq as u32, shape.n_heads as u32, shape.batch as u32),
            block_dim: (64, 1, 1),
            shared_mem_bytes: smem,
        };
        let f = gpu.function("attention", &format!("attention_forward_{t}")).unwrap();
        let mut l = gpu.stream.launch_builder(&f);
        gqkv.arg(&mut l);
        gout.arg(&mut l);
        l.arg(&glse).arg(&seq).arg(&h).arg(&hkv).arg(&d);
        unsafe { l.launch(grid) }.unwrap();
        assert_close(&format!("attention forward {t}"), &down(&gpu, &gout), &out_seen, s.tolerance());
        assert_close(&format!("attention lse {t}"), &gpu.stream.clone_dtoh(&glse).unwrap(), &lse, 1e-5);

        let (gdout, gout_seen) = (up(&gpu, s, &dout), up(&gpu, s, &out_seen));
        let gdqkv = gpu.stream.alloc_zeros::<f32>(n * width).unwrap();
        let f = gpu.function("attention", &format!("attention_backward_{t}")).unwrap();
        let mut l = gpu.stream.launch_builder(&f);
        gdout.arg(&mut l);
        gqkv.arg(&mut l);
        gout_seen.arg(&mut l);
        l.arg(&glse).arg(&gdqkv).arg(&seq).arg(&h).arg(&hkv).arg(&d);
        unsafe { l.launch(grid) }.unwrap();
        // dqkv is fp32 in both storages; bf16 inputs only add the rounding of the saved lse.
        assert_close(&format!("attention backward dqkv {t}"), &gpu.stream.clone_dtoh(&gdqkv).unwrap(), &dqkv, 1e-4);
    }
}
