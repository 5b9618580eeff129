//! The CUDA backend: the backend contract on one GPU, with kernels from kernels/*.cu and
//! GEMMs from cuBLASLt.
//!
//! Every op is issued on the GPU's one stream and returns at once; only `download` and the
//! sums that return a number wait for the stream. An op on empty views launches nothing (its
//! grid is empty, see `Gpu::launch`). The compute type is bf16 (mixed precision:
//! fp32 master weights, gradients and statistics, see ondol_core::backend) or f32 (the same
//! numbers as the CPU reference to round-off, for checking).

use crate::CudaError;
use crate::device::{Arg, Device, bytes_of, bytes_of_mut};
use crate::emu::Emulator;
use crate::gpu::Gpu;
use crate::memory::{DevMut, DevRef, DeviceBuf, DeviceIds, Dtype};
use cudarc::driver::LaunchConfig;
use ondol_core::backend::{
    Activation, AttnShape, Backend, Gemm, ScanGrads, ScanInputs, ScanShape, SsdGrads, SsdInputs, SsdShape,
};
use ondol_core::{AdamWParams, bf16};
use std::ops::Range;

pub struct CudaBackend {
    dev: Box<dyn Device>,
    compute: Dtype,
}

/// Threads per block of the row-wise kernels (norms, cross-entropy, attention).
const ROW_THREADS: u32 = 256;

fn ptr(v: &DevRef) -> Arg {
    Arg::Ptr(v.ptr)
}

fn ptr_mut(v: &DevMut) -> Arg {
    Arg::Ptr(v.ptr)
}

fn same_type(what: &str, views: &[Dtype]) -> Dtype {
    assert!(views.windows(2).all(|w| w[0] == w[1]), "{what}: operands of different types {views:?}");
    views[0]
}

fn is_f32(what: &str, d: Dtype) {
    assert_eq!(d, Dtype::F32, "{what}: this operand is kept in f32");
}

/// Rows of a `[rows, cols]` view.
fn rows_of(len: usize, cols: usize) -> usize {
    assert!(cols > 0 && len.is_multiple_of(cols), "{len} values are not rows of {cols}");
    len / cols
}

impl CudaBackend {
    /// Opens GPU `ordinal`, computing in `compute` (bf16 for training, f32 for checking).
    pub fn open(ordinal: usize, compute: Dtype) -> Result<Self, CudaError> {
        Ok(Self { dev: Box::new(Gpu::open(ordinal)?), compute })
    }

    /// The backend on the SIMT emulator (src/emu.rs): the same kernels and launches on the CPU,
    /// for checking them without a GPU. `reverse` runs each block's threads in reverse order.
    pub fn emulated(compute: Dtype, reverse: bool) -> Self {
        Self { dev: Box::new(Emulator::new(reverse)), compute }
    }

    /// The device's name, as the driver reports it.
    pub fn device_name(&self) -> String {
        self.dev.name()
    }

    pub fn compute_type(&self) -> Dtype {
        self.compute
    }

    /// Waits for everything issued so far (for timing).
    pub fn synchronize(&self) {
        self.dev.synchronize();
    }

    /// Dense bf16 tensor-core peak in FLOP/s of the known data-centre GPUs (DESIGN.md section
    /// 7), or None for a device this table does not know.
    pub fn peak_flops(&self) -> Option<f64> {
        let name = self.dev.name();
        // The PCIe and NVL H100s clock lower than the SXM part; the first match counts.
        [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]
            .into_iter()
            .find(|(model, _)| name.contains(model))
            .map(|(_, peak)| peak)
    }

    /// The device's bf16 GEMM throughput in FLOP/s: the best of five 8192^3 products (1.1
    /// TFLOP each), for MFU on a device [`CudaBackend::peak_flops`] does not know.
    pub fn measure_gemm_peak(&self) -> f64 {
        let n = 8192;
        let (a, mut c) = (self.alloc(n * n, Dtype::Bf16), self.alloc(n * n, Dtype::Bf16));
        let g = Gemm::new(n, n, n, false, false);
        let mut best = f64::INFINITY;
        for _ in 0..6 {
            let start = std::time::Instant::now();
            self.dev.gemm(g, a.view(0..n * n), a.view(0..n * n), c.view_mut(0..n * n));
            self.synchronize();
            best = best.min(start.elapsed().as_secs_f64());
        }
        g.flops() as f64 / best
    }

    fn alloc(&self, len: usize, dtype: Dtype) -> DeviceBuf {
        DeviceBuf::zeros(self.dev.as_ref(), len, dtype)
            .unwrap_or_else(|e| panic!("cannot allocate {} MiB on the GPU: {e}", (len * dtype.bytes()) >> 20))
    }

    /// Writes f32 `data` to `dst`, converted on the host to `dtype`.
    fn copy_in(&self, dst: u64, dtype: Dtype, data: &[f32]) {
        match dtype {
            Dtype::F32 => self.dev.copy_in(dst, bytes_of(data)),
            Dtype::Bf16 => {
                let rounded: Vec<u16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                self.dev.copy_in(dst, bytes_of(&rounded))
            }
        }
    }

    /// Launches `name_{suffix}` of `family`, the kernel instantiated for `dtype`.
    fn run(&self, family: &str, name: &str, dtype: Dtype, cfg: LaunchConfig, args: &[Arg]) {
        self.dev.launch(family, &format!("{name}_{}", dtype.suffix()), cfg, args);
    }

    /// One block of ROW_THREADS per row, with `shared` bytes of dynamic shared memory.
    fn per_row(rows: usize, shared: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: shared as u32 }
    }

    /// At most two blocks per SM (the norms' backward, whose blocks each add their
    /// weight-gradient partials once).
    fn per_sm(&self, rows: usize, shared: usize) -> LaunchConfig {
        let blocks = rows.min(2 * self.dev.sms());
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: shared as u32,
        }
    }

    fn reduce(&self, x: DevRef, squares: bool) -> f64 {
        if x.len == 0 {
            return 0.0;
        }
        // One f64, as two f32 slots.
        let out = self.alloc(2, Dtype::F32);
        let out_ptr = out.view(0..2).ptr;
        let args = [ptr(&x), Arg::I64(x.len as i64), Arg::I32(squares as i32), Arg::Ptr(out_ptr)];
        self.run("elementwise", "sum", x.dtype, self.dev.flat(x.len), &args);
        let mut sum = [0f64];
        self.dev.copy_out(bytes_of_mut(&mut sum), out_ptr);
        sum[0]
    }

    fn unsupported(&self, op: &str) -> ! {
        panic!(
            "{op} has no CUDA kernel yet (Mamba layers on the GPU are issue 8); the trainer refuses such models \
             on \"cuda\" before reaching this"
        )
    }
}

impl Backend for CudaBackend {
    type Buf = DeviceBuf;
    type Ids = DeviceIds;
    type Ref<'a> = DevRef<'a>;
    type Mut<'a> = DevMut<'a>;

    fn name(&self) -> String {
        format!("{} (sm_{}, {:?} compute)", self.dev.name(), self.dev.arch(), self.compute)
    }

    fn device_memory(&self) -> Option<(u64, u64)> {
        self.dev.memory()
    }

    fn mixed_precision(&self) -> bool {
        self.compute != Dtype::F32
    }

    // ---- memory ---------------------------------------------------------------------------
    fn zeros(&self, len: usize) -> DeviceBuf {
        self.alloc(len, self.compute)
    }
    fn zeros_f32(&self, len: usize) -> DeviceBuf {
        self.alloc(len, Dtype::F32)
    }
    fn upload(&self, data: &[f32]) -> DeviceBuf {
        let mut buf = self.zeros(data.len());
        self.write(&mut buf, data);
        buf
    }
    fn upload_f32(&self, data: &[f32]) -> DeviceBuf {
        let mut buf = self.zeros_f32(data.len());
        self.write(&mut buf, data);
        buf
    }
    fn write(&self, buf: &mut DeviceBuf, data: &[f32]) {
        assert_eq!(buf.len(), data.len(), "write: buffer and data differ in length");
        if !data.is_empty() {
            let dtype = buf.dtype();
            self.copy_in(buf.view_mut(0..data.len()).ptr, dtype, data);
        }
    }
    fn download(&self, buf: &DeviceBuf) -> Vec<f32> {
        if buf.is_empty() {
            return Vec::new();
        }
        let src = buf.view(0..buf.len()).ptr;
        match buf.dtype() {
            Dtype::F32 => {
                let mut host = vec![0.0f32; buf.len()];
                self.dev.copy_out(bytes_of_mut(&mut host), src);
                host
            }
            Dtype::Bf16 => {
                let mut host = vec![0u16; buf.len()];
                self.dev.copy_out(bytes_of_mut(&mut host), src);
                host.into_iter().map(bf16::to_f32).collect()
            }
        }
    }
    fn upload_ids(&self, ids: &[u32]) -> DeviceIds {
        let mut buf = DeviceIds::zeros(self.dev.as_ref(), ids.len()).unwrap_or_else(|e| panic!("GPU allocation: {e}"));
        self.write_ids(&mut buf, ids);
        buf
    }
    fn write_ids(&self, ids: &mut DeviceIds, data: &[u32]) {
        assert_eq!(ids.len, data.len(), "write_ids: lengths differ");
        if !data.is_empty() {
            self.dev.copy_in(ids.ptr, bytes_of(data));
        }
    }
    fn len(&self, buf: &DeviceBuf) -> usize {
        buf.len()
    }
    fn view<'a>(&self, buf: &'a DeviceBuf, range: Range<usize>) -> DevRef<'a> {
        buf.view(range)
    }
    fn view_mut<'a>(&self, buf: &'a mut DeviceBuf, range: Range<usize>) -> DevMut<'a> {
        buf.view_mut(range)
    }
    fn views_mut<'a, const N: usize>(&self, buf: &'a mut DeviceBuf, ranges: [Range<usize>; N]) -> [DevMut<'a>; N] {
        buf.views_mut(ranges)
    }
    fn fill(&self, x: DevMut<'_>, value: f32) {
        let args = [ptr_mut(&x), Arg::I64(x.len as i64), Arg::F32(value)];
        self.run("elementwise", "fill", x.dtype, self.dev.flat(x.len), &args);
    }
    fn add_assign(&self, dst: DevMut<'_>, src: DevRef<'_>) {
        assert_eq!(dst.len, src.len, "add_assign: lengths differ");
        let dtype = same_type("add_assign", &[dst.dtype, src.dtype]);
        let args = [ptr_mut(&dst), ptr(&src), Arg::I64(dst.len as i64)];
        self.run("elementwise", "add_assign", dtype, self.dev.flat(dst.len), &args);
    }
    fn scale(&self, x: DevMut<'_>, factor: f32) {
        let args = [ptr_mut(&x), Arg::I64(x.len as i64), Arg::F32(factor)];
        self.run("elementwise", "scale", x.dtype, self.dev.flat(x.len), &args);
    }
    fn sum_squares(&self, x: DevRef<'_>) -> f64 {
        self.reduce(x, true)
    }
    fn sum(&self, x: DevRef<'_>) -> f64 {
        self.reduce(x, false)
    }

    // ---- dense ------------------------------------------------------------------------------
    fn gemm(&self, g: Gemm, a: DevRef<'_>, b: DevRef<'_>, c: DevMut<'_>) {
        if g.k == 0 {
            // An empty sum: C = beta C (a zero beta writes zeros, as cuBLAS would).
            if g.beta == 0.0 {
                self.fill(c, 0.0)
            } else {
                self.scale(c, g.beta)
            }
            return;
        }
        self.dev.gemm(g, a, b, c);
    }
    fn add_bias(&self, y: DevMut<'_>, bias: DevRef<'_>, cols: usize) {
        let dtype = same_type("add_bias", &[y.dtype, bias.dtype]);
        assert_eq!(bias.len, cols, "add_bias: bias length");
        rows_of(y.len, cols);
        let args = [ptr_mut(&y), ptr(&bias), Arg::I64(y.len as i64), Arg::I32(cols as i32)];
        self.run("elementwise", "add_bias", dtype, self.dev.flat(y.len), &args);
    }
    fn bias_backward(&self, dy: DevRef<'_>, dbias: DevMut<'_>, cols: usize) {
        is_f32("bias_backward dbias", dbias.dtype);
        assert_eq!(dbias.len, cols, "bias_backward: dbias length");
        let rows = rows_of(dy.len, cols);
        const ROWS_PER_CHUNK: usize = 64;
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(256) as u32, rows.div_ceil(ROWS_PER_CHUNK) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let args =
            [ptr(&dy), ptr_mut(&dbias), Arg::I64(rows as i64), Arg::I32(cols as i32), Arg::I64(ROWS_PER_CHUNK as i64)];
        self.run("elementwise", "bias_backward", dy.dtype, cfg, &args);
    }

    // ---- embeddings ---------------------------------------------------------------------------
    fn embedding_forward(
        &self,
        ids: &DeviceIds,
        table: DevRef<'_>,
        first_id: usize,
        positions: Option<(DevRef<'_>, usize)>,
        out: DevMut<'_>,
        dim: usize,
    ) {
        let rows = rows_of(out.len, dim);
        assert_eq!(ids.len, rows, "embedding_forward: one id per row");
        let (pos, seq) = match positions {
            Some((p, seq)) => {
                same_type("embedding_forward", &[p.dtype, out.dtype]);
                (p.ptr, seq)
            }
            None => (0, 1),
        };
        let dtype = same_type("embedding_forward", &[table.dtype, out.dtype]);
        let args = [
            Arg::Ptr(ids.ptr),
            ptr(&table),
            Arg::I32(rows_of(table.len, dim) as i32),
            Arg::I32(first_id as i32),
            Arg::Ptr(pos),
            Arg::I32(seq as i32),
            ptr_mut(&out),
            Arg::I64(rows as i64),
            Arg::I32(dim as i32),
        ];
        self.run("embedding", "embedding_forward", dtype, self.dev.flat(out.len), &args);
    }
    fn embedding_backward(&self, ids: &DeviceIds, dout: DevRef<'_>, dtable: DevMut<'_>, first_id: usize, dim: usize) {
        is_f32("embedding_backward dtable", dtable.dtype);
        let rows = rows_of(dout.len, dim);
        assert_eq!(ids.len, rows, "embedding_backward: one id per row");
        let args = [
            Arg::Ptr(ids.ptr),
            ptr(&dout),
            ptr_mut(&dtable),
            Arg::I32(rows_of(dtable.len, dim) as i32),
            Arg::I32(first_id as i32),
            Arg::I64(rows as i64),
            Arg::I32(dim as i32),
        ];
        self.run("embedding", "embedding_backward", dout.dtype, self.dev.flat(dout.len), &args);
    }
    fn position_embedding_backward(&self, dout: DevRef<'_>, dpos: DevMut<'_>, seq: usize, dim: usize) {
        is_f32("position_embedding_backward dpos", dpos.dtype);
        let rows = rows_of(dout.len, dim);
        let args = [ptr(&dout), ptr_mut(&dpos), Arg::I32(seq as i32), Arg::I64(rows as i64), Arg::I32(dim as i32)];
        self.run("embedding", "position_embedding_backward", dout.dtype, self.dev.flat(dout.len), &args);
    }

    // ---- norms ------------------------------------------------------------------------------
    fn rmsnorm_forward(
        &self,
        x: DevRef<'_>,
        weight: DevRef<'_>,
        out: DevMut<'_>,
        rstd: DevMut<'_>,
        dim: usize,
        eps: f32,
    ) {
        let dtype = same_type("rmsnorm_forward", &[x.dtype, weight.dtype, out.dtype]);
        is_f32("rmsnorm_forward rstd", rstd.dtype);
        let rows = rows_of(x.len, dim);
        assert!(weight.len == dim && out.len == x.len && rstd.len == rows, "rmsnorm_forward: lengths");
        let args = [
            ptr(&x),
            ptr(&weight),
            ptr_mut(&out),
            ptr_mut(&rstd),
            Arg::I32(rows as i32),
            Arg::I32(dim as i32),
            Arg::F32(eps),
        ];
        self.run("norms", "rmsnorm_forward", dtype, Self::per_row(rows, 0), &args);
    }
    fn rmsnorm_backward(
        &self,
        dout: DevRef<'_>,
        x: DevRef<'_>,
        weight: DevRef<'_>,
        rstd: DevRef<'_>,
        dx: DevMut<'_>,
        dweight: DevMut<'_>,
        dim: usize,
    ) {
        let dtype = same_type("rmsnorm_backward", &[dout.dtype, x.dtype, weight.dtype, dx.dtype]);
        is_f32("rmsnorm_backward rstd", rstd.dtype);
        is_f32("rmsnorm_backward dweight", dweight.dtype);
        let rows = rows_of(x.len, dim);
        assert!(weight.len == dim && dweight.len == dim && rstd.len == rows, "rmsnorm_backward: lengths");
        assert!(dout.len == x.len && dx.len == x.len, "rmsnorm_backward: lengths");
        let args = [
            ptr(&dout),
            ptr(&x),
            ptr(&weight),
            ptr(&rstd),
            ptr_mut(&dx),
            ptr_mut(&dweight),
            Arg::I32(rows as i32),
            Arg::I32(dim as i32),
        ];
        self.run("norms", "rmsnorm_backward", dtype, self.per_sm(rows, 4 * dim), &args);
    }
    fn layernorm_forward(
        &self,
        x: DevRef<'_>,
        weight: DevRef<'_>,
        bias: DevRef<'_>,
        out: DevMut<'_>,
        mean: DevMut<'_>,
        rstd: DevMut<'_>,
        dim: usize,
        eps: f32,
    ) {
        let dtype = same_type("layernorm_forward", &[x.dtype, weight.dtype, bias.dtype, out.dtype]);
        is_f32("layernorm_forward mean", mean.dtype);
        is_f32("layernorm_forward rstd", rstd.dtype);
        let rows = rows_of(x.len, dim);
        assert!(weight.len == dim && bias.len == dim && out.len == x.len, "layernorm_forward: lengths");
        assert!(mean.len == rows && rstd.len == rows, "layernorm_forward: one mean and rstd per row");
        let args = [
            ptr(&x),
            ptr(&weight),
            ptr(&bias),
            ptr_mut(&out),
            ptr_mut(&mean),
            ptr_mut(&rstd),
            Arg::I32(rows as i32),
            Arg::I32(dim as i32),
            Arg::F32(eps),
        ];
        self.run("norms", "layernorm_forward", dtype, Self::per_row(rows, 0), &args);
    }
    fn layernorm_backward(
        &self,
        dout: DevRef<'_>,
        x: DevRef<'_>,
        weight: DevRef<'_>,
        mean: DevRef<'_>,
        rstd: DevRef<'_>,
        dx: DevMut<'_>,
        dweight: DevMut<'_>,
        dbias: DevMut<'_>,
        dim: usize,
    ) {
        let dtype = same_type("layernorm_backward", &[dout.dtype, x.dtype, weight.dtype, dx.dtype]);
        for (what, d) in
            [("mean", mean.dtype), ("rstd", rstd.dtype), ("dweight", dweight.dtype), ("dbias", dbias.dtype)]
        {
            is_f32(&format!("layernorm_backward {what}"), d);
        }
        let rows = rows_of(x.len, dim);
        assert!(weight.len == dim && dweight.len == dim && dbias.len == dim, "layernorm_backward: lengths");
        assert!(
            mean.len == rows && rstd.len == rows && dout.len == x.len && dx.len == x.len,
            "layernorm_backward: lengths"
        );
        let args = [
            ptr(&dout),
            ptr(&x),
            ptr(&weight),
            ptr(&mean),
            ptr(&rstd),
            ptr_mut(&dx),
            ptr_mut(&dweight),
            ptr_mut(&dbias),
            Arg::I32(rows as i32),
            Arg::I32(dim as i32),
        ];
        self.run("norms", "layernorm_backward", dtype, self.per_sm(rows, 8 * dim), &args);
    }

    // ---- attention ----------------------------------------------------------------------------
    fn rope(&self, qkv: DevMut<'_>, cos_sin: DevRef<'_>, shape: AttnShape, inverse: bool) {
        is_f32("rope cos_sin", cos_sin.dtype);
        assert_eq!(qkv.len, shape.rows() * shape.qkv_width(), "rope: qkv length");
        assert!(
            cos_sin.len >= shape.seq * shape.head_dim,
            "rope: the table covers {} positions",
            cos_sin.len / shape.head_dim.max(1)
        );
        let pairs = shape.rows() * (shape.n_heads + shape.n_kv_heads) * shape.head_dim / 2;
        let args = [
            ptr_mut(&qkv),
            ptr(&cos_sin),
            Arg::I64(shape.rows() as i64),
            Arg::I32(shape.seq as i32),
            Arg::I32(shape.n_heads as i32),
            Arg::I32(shape.n_kv_heads as i32),
            Arg::I32(shape.head_dim as i32),
            Arg::I32(inverse as i32),
        ];
        self.run("rope", "rope", qkv.dtype, self.dev.flat(pairs), &args);
    }
    fn attention_forward(&self, qkv: DevRef<'_>, out: DevMut<'_>, lse: DevMut<'_>, shape: AttnShape) {
        let dtype = same_type("attention_forward", &[qkv.dtype, out.dtype]);
        is_f32("attention_forward lse", lse.dtype);
        assert_eq!(qkv.len, shape.rows() * shape.qkv_width(), "attention_forward: qkv length");
        assert_eq!(out.len, shape.rows() * shape.q_width(), "attention_forward: out length");
        assert_eq!(lse.len, shape.batch * shape.n_heads * shape.seq, "attention_forward: lse length");
        let cfg = LaunchConfig {
            grid_dim: (shape.seq as u32, shape.n_heads as u32, shape.batch as u32),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: (4 * (shape.seq + shape.head_dim)) as u32,
        };
        let args = [
            ptr(&qkv),
            ptr_mut(&out),
            ptr_mut(&lse),
            Arg::I32(shape.seq as i32),
            Arg::I32(shape.n_heads as i32),
            Arg::I32(shape.n_kv_heads as i32),
            Arg::I32(shape.head_dim as i32),
        ];
        self.run("attention", "attention_forward", dtype, cfg, &args);
    }
    fn attention_backward(
        &self,
        dout: DevRef<'_>,
        qkv: DevRef<'_>,
        out: DevRef<'_>,
        lse: DevRef<'_>,
        mut dqkv: DevMut<'_>,
        shape: AttnShape,
    ) {
        let dtype = same_type("attention_backward", &[dout.dtype, qkv.dtype, out.dtype, dqkv.dtype]);
        is_f32("attention_backward lse", lse.dtype);
        assert_eq!(dqkv.len, qkv.len, "attention_backward: dqkv length");
        assert_eq!(qkv.len, shape.rows() * shape.qkv_width(), "attention_backward: qkv length");
        assert!(dout.len == out.len && out.len == shape.rows() * shape.q_width(), "attention_backward: out length");
        assert_eq!(lse.len, shape.batch * shape.n_heads * shape.seq, "attention_backward: lse length");
        // The kernel accumulates dk and dv from every query with fp32 atomics: into dqkv
        // itself when it is f32, else into an f32 scratch converted afterwards.
        let mut scratch = (dtype != Dtype::F32).then(|| self.zeros_f32(dqkv.len));
        let target = match &mut scratch {
            Some(s) => s.view_mut(0..dqkv.len).ptr,
            None => {
                self.fill(dqkv.reborrow(), 0.0);
                dqkv.ptr
            }
        };
        let cfg = LaunchConfig {
            grid_dim: (shape.seq as u32, shape.n_heads as u32, shape.batch as u32),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: (4 * (shape.seq + shape.head_dim)) as u32,
        };
        let args = [
            ptr(&dout),
            ptr(&qkv),
            ptr(&out),
            ptr(&lse),
            Arg::Ptr(target),
            Arg::I32(shape.seq as i32),
            Arg::I32(shape.n_heads as i32),
            Arg::I32(shape.n_kv_heads as i32),
            Arg::I32(shape.head_dim as i32),
        ];
        self.run("attention", "attention_backward", dtype, cfg, &args);
        if scratch.is_some() {
            let args = [Arg::Ptr(target), ptr_mut(&dqkv), Arg::I64(dqkv.len as i64)];
            self.run("elementwise", "from_f32", dtype, self.dev.flat(dqkv.len), &args);
        }
    }
    fn attention_cached(
        &self,
        qkv: DevRef<'_>,
        k_cache: DevMut<'_>,
        v_cache: DevMut<'_>,
        out: DevMut<'_>,
        shape: AttnShape,
        pos: usize,
        max_seq: usize,
    ) {
        let dtype = same_type("attention_cached", &[qkv.dtype, k_cache.dtype, v_cache.dtype, out.dtype]);
        assert!(pos + shape.seq <= max_seq, "KV cache of {max_seq} positions cannot hold {} tokens", pos + shape.seq);
        let kv = shape.n_kv_heads * shape.head_dim;
        assert!(
            k_cache.len == shape.batch * max_seq * kv && v_cache.len == k_cache.len,
            "attention_cached: cache lengths"
        );
        assert_eq!(out.len, shape.rows() * shape.q_width(), "attention_cached: out length");
        let heads = [shape.n_heads, shape.n_kv_heads, shape.head_dim].map(|x| Arg::I32(x as i32));
        let mut args = vec![ptr(&qkv), ptr_mut(&k_cache), ptr_mut(&v_cache), Arg::I32(shape.seq as i32)];
        args.extend(heads);
        args.extend([Arg::I32(pos as i32), Arg::I32(max_seq as i32), Arg::I64(shape.rows() as i64)]);
        self.run("attention", "kv_append", dtype, self.dev.flat(shape.rows() * kv), &args);
        let cfg = LaunchConfig {
            grid_dim: (shape.seq as u32, shape.n_heads as u32, shape.batch as u32),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: (4 * (pos + shape.seq + shape.head_dim)) as u32,
        };
        let mut args =
            vec![ptr(&qkv), ptr(&k_cache.as_ref()), ptr(&v_cache.as_ref()), ptr_mut(&out), Arg::I32(shape.seq as i32)];
        args.extend(heads);
        args.extend([Arg::I32(pos as i32), Arg::I32(max_seq as i32)]);
        self.run("attention", "attention_cached", dtype, cfg, &args);
    }

    // ---- Mamba (issue 8) --------------------------------------------------------------------------
    fn conv1d_forward(&self, _: DevRef<'_>, _: DevRef<'_>, _: DevRef<'_>, _: DevMut<'_>, _: usize, _: usize) {
        self.unsupported("conv1d_forward")
    }
    fn conv1d_backward(
        &self,
        _: DevRef<'_>,
        _: DevRef<'_>,
        _: DevRef<'_>,
        _: DevRef<'_>,
        _: DevMut<'_>,
        _: DevMut<'_>,
        _: DevMut<'_>,
        _: usize,
        _: usize,
    ) {
        self.unsupported("conv1d_backward")
    }
    fn selective_scan_forward(&self, _: ScanInputs<DevRef<'_>>, _: DevMut<'_>, _: DevMut<'_>, _: ScanShape) {
        self.unsupported("selective_scan_forward")
    }
    fn selective_scan_backward(
        &self,
        _: DevRef<'_>,
        _: ScanInputs<DevRef<'_>>,
        _: DevRef<'_>,
        _: ScanGrads<DevMut<'_>>,
        _: ScanShape,
    ) {
        self.unsupported("selective_scan_backward")
    }
    fn ssd_forward(&self, _: SsdInputs<DevRef<'_>>, _: DevMut<'_>, _: DevMut<'_>, _: SsdShape) {
        self.unsupported("ssd_forward")
    }
    fn ssd_backward(
        &self,
        _: DevRef<'_>,
        _: SsdInputs<DevRef<'_>>,
        _: DevRef<'_>,
        _: SsdGrads<DevMut<'_>>,
        _: SsdShape,
    ) {
        self.unsupported("ssd_backward")
    }
    fn gated_rmsnorm_forward(
        &self,
        _: DevRef<'_>,
        _: DevRef<'_>,
        _: DevRef<'_>,
        _: DevMut<'_>,
        _: DevMut<'_>,
        _: usize,
        _: f32,
    ) {
        self.unsupported("gated_rmsnorm_forward")
    }
    fn gated_rmsnorm_backward(
        &self,
        _: DevRef<'_>,
        _: DevRef<'_>,
        _: DevRef<'_>,
        _: DevRef<'_>,
        _: DevRef<'_>,
        _: DevMut<'_>,
        _: DevMut<'_>,
        _: DevMut<'_>,
        _: usize,
    ) {
        self.unsupported("gated_rmsnorm_backward")
    }

    // ---- activations ----------------------------------------------------------------------------
    fn swiglu_forward(&self, gate_up: DevRef<'_>, out: DevMut<'_>, width: usize) {
        let dtype = same_type("swiglu_forward", &[gate_up.dtype, out.dtype]);
        assert_eq!(gate_up.len, 2 * out.len, "swiglu_forward: gate_up holds two halves per row");
        rows_of(out.len, width);
        let args = [ptr(&gate_up), ptr_mut(&out), Arg::I64(out.len as i64), Arg::I32(width as i32)];
        self.run("activations", "swiglu_forward", dtype, self.dev.flat(out.len), &args);
    }
    fn swiglu_backward(&self, dout: DevRef<'_>, gate_up: DevRef<'_>, dgate_up: DevMut<'_>, width: usize) {
        let dtype = same_type("swiglu_backward", &[dout.dtype, gate_up.dtype, dgate_up.dtype]);
        assert_eq!(gate_up.len, 2 * dout.len, "swiglu_backward: gate_up holds two halves per row");
        assert_eq!(dgate_up.len, gate_up.len, "swiglu_backward: dgate_up length");
        rows_of(dout.len, width);
        let args = [ptr(&dout), ptr(&gate_up), ptr_mut(&dgate_up), Arg::I64(dout.len as i64), Arg::I32(width as i32)];
        self.run("activations", "swiglu_backward", dtype, self.dev.flat(dout.len), &args);
    }
    fn activation_forward(&self, act: Activation, x: DevRef<'_>, out: DevMut<'_>) {
        let dtype = same_type("activation_forward", &[x.dtype, out.dtype]);
        assert_eq!(x.len, out.len, "activation_forward: lengths differ");
        let args = [Arg::I32(activation_kind(act)), ptr(&x), ptr_mut(&out), Arg::I64(x.len as i64)];
        self.run("activations", "activation_forward", dtype, self.dev.flat(x.len), &args);
    }
    fn activation_backward(&self, act: Activation, dout: DevRef<'_>, x: DevRef<'_>, dx: DevMut<'_>) {
        let dtype = same_type("activation_backward", &[dout.dtype, x.dtype, dx.dtype]);
        assert!(dout.len == x.len && x.len == dx.len, "activation_backward: lengths differ");
        let args = [Arg::I32(activation_kind(act)), ptr(&dout), ptr(&x), ptr_mut(&dx), Arg::I64(x.len as i64)];
        self.run("activations", "activation_backward", dtype, self.dev.flat(x.len), &args);
    }

    // ---- loss -------------------------------------------------------------------------------------
    fn cross_entropy(
        &self,
        logits: DevMut<'_>,
        targets: &DeviceIds,
        losses: DevMut<'_>,
        vocab: usize,
        grad_scale: Option<f32>,
    ) {
        is_f32("cross_entropy losses", losses.dtype);
        let rows = rows_of(logits.len, vocab);
        assert!(targets.len == rows && losses.len == rows, "cross_entropy: one target and loss per row");
        let args = [
            ptr_mut(&logits),
            Arg::Ptr(targets.ptr),
            ptr_mut(&losses),
            Arg::I32(rows as i32),
            Arg::I32(vocab as i32),
            Arg::I32(grad_scale.is_some() as i32),
            Arg::F32(grad_scale.unwrap_or(0.0)),
        ];
        self.run("cross_entropy", "cross_entropy", logits.dtype, Self::per_row(rows, 0), &args);
    }
    fn cross_entropy_stats(
        &self,
        logits: DevRef<'_>,
        targets: &DeviceIds,
        stats: DevMut<'_>,
        first_id: usize,
        vocab: usize,
    ) {
        is_f32("cross_entropy_stats stats", stats.dtype);
        let rows = rows_of(logits.len, vocab);
        assert!(targets.len == rows && stats.len == 3 * rows, "cross_entropy_stats: three stats per row");
        let args = [
            ptr(&logits),
            Arg::Ptr(targets.ptr),
            ptr_mut(&stats),
            Arg::I32(rows as i32),
            Arg::I32(first_id as i32),
            Arg::I32(vocab as i32),
        ];
        self.run("cross_entropy", "cross_entropy_stats", logits.dtype, Self::per_row(rows, 0), &args);
    }
    fn cross_entropy_grad(
        &self,
        logits: DevMut<'_>,
        targets: &DeviceIds,
        lse: DevRef<'_>,
        first_id: usize,
        vocab: usize,
        grad_scale: f32,
    ) {
        is_f32("cross_entropy_grad lse", lse.dtype);
        let rows = rows_of(logits.len, vocab);
        assert!(targets.len == rows && lse.len == rows, "cross_entropy_grad: one target and lse per row");
        let args = [
            ptr_mut(&logits),
            Arg::Ptr(targets.ptr),
            ptr(&lse),
            Arg::I32(rows as i32),
            Arg::I32(first_id as i32),
            Arg::I32(vocab as i32),
            Arg::F32(grad_scale),
        ];
        self.run("cross_entropy", "cross_entropy_grad", logits.dtype, Self::per_row(rows, 0), &args);
    }

    // ---- optimizer ------------------------------------------------------------------------------
    fn adamw(
        &self,
        params: DevMut<'_>,
        grads: DevRef<'_>,
        m: DevMut<'_>,
        v: DevMut<'_>,
        hp: AdamWParams,
        copy: Option<DevMut<'_>>,
    ) {
        for (what, d) in [("params", params.dtype), ("grads", grads.dtype), ("m", m.dtype), ("v", v.dtype)] {
            is_f32(&format!("adamw {what}"), d);
        }
        let n = params.len;
        assert!(grads.len == n && m.len == n && v.len == n, "adamw: lengths differ");
        let copy_ptr = match &copy {
            None => 0,
            Some(c) => {
                assert_eq!(c.dtype, Dtype::Bf16, "adamw: the compute copy of fp32 master weights is bf16");
                assert_eq!(c.len, n, "adamw: copy length");
                c.ptr
            }
        };
        // The bias corrections in f64, folded as the CPU reference folds them.
        let step = hp.step.max(1) as i32;
        let step_size = (hp.lr as f64 / (1.0 - (hp.beta1 as f64).powi(step))) as f32;
        let inv_bc2_sqrt = (1.0 / (1.0 - (hp.beta2 as f64).powi(step)).sqrt()) as f32;
        let decay = 1.0 - hp.lr * hp.weight_decay;
        let args = [
            ptr_mut(&params),
            ptr(&grads),
            ptr_mut(&m),
            ptr_mut(&v),
            Arg::Ptr(copy_ptr),
            Arg::I64(n as i64),
            Arg::F32(hp.beta1),
            Arg::F32(hp.beta2),
            Arg::F32(hp.eps),
            Arg::F32(step_size),
            Arg::F32(inv_bc2_sqrt),
            Arg::F32(decay),
            Arg::F32(hp.grad_scale),
        ];
        self.dev.launch("adamw", "adamw", self.dev.flat(n), &args);
    }
}

/// The `kind` argument of the activation kernels (the order of [`Activation`]).
fn activation_kind(act: Activation) -> i32 {
    match act {
        Activation::Gelu => 0,
        Activation::Relu2 => 1,
    }
}
