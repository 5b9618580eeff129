//! The CUDA backend: the backend contract on one GPU, with kernels from kernels/*.cu and
//! GEMMs from cuBLASLt.
//!
//! Every op is issued on the GPU's one stream and returns at once; only `download` and the
//! sums that return a number wait for the stream. An op on empty views launches nothing (its
//! grid is empty, see `Gpu::launch`). The compute type is bf16 (mixed precision:
//! fp32 master weights, gradients and statistics, see ondol_core::backend) or f32 (the same
//! numbers as the CPU reference to round-off, for checking).

use crate::CudaError;
use crate::device::{Arg, Device, Epilogue, bytes_of, bytes_of_mut, check_gemm_operands};
use crate::emu::Emulator;
use crate::gpu::Gpu;
use crate::memory::{DevMut, DevRef, DeviceBuf, DeviceIds, Dtype};
use cudarc::driver::LaunchConfig;
use ondol_core::backend::{
    Activation, AttnShape, Backend, Gemm, LogitColumns, ScanGrads, ScanInputs, ScanShape, SsdGrads, SsdInputs,
    SsdShape, window_first_keys,
};
use ondol_core::{AdamWParams, DeviceSlice, bf16};
use std::ops::Range;

pub struct CudaBackend {
    dev: Box<dyn Device>,
    compute: Dtype,
    /// Whether bf16 ops run their tensor-core kernels where they have one for the shape:
    /// flash attention (the head dims of [`FLASH_HEAD_DIMS`]) and the SSD's products, forward
    /// and backward (else the CUDA-core kernels, as fp32 and other shapes always do).
    tensor_cores: bool,
    /// Whether plain GEMMs go to the device's GEMM library (cuBLASLt, or the emulator's loop)
    /// before gemm.cu's CUDA-core kernel, which runs where the library has no algorithm.
    blas_gemms: bool,
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

/// [`is_f32`] for each named operand of `op`.
fn all_f32(op: &str, operands: &[(&str, Dtype)]) {
    for (what, d) in operands {
        is_f32(&format!("{op} {what}"), *d);
    }
}

/// Rows of a `[rows, cols]` view.
fn rows_of(len: usize, cols: usize) -> usize {
    assert!(cols > 0 && len.is_multiple_of(cols), "{len} values are not rows of {cols}");
    len / cols
}

/// The device address of `targets[first_row..first_row + rows]`, the targets of a chunk of
/// logit rows.
fn target_rows(targets: &DeviceIds, first_row: usize, rows: usize) -> u64 {
    assert!(first_row + rows <= targets.len, "targets of rows {first_row}..{} of {}", first_row + rows, targets.len);
    targets.ptr + 4 * first_row as u64
}

/// Rows of a logit matrix of `len` values: rows of `columns.stride`, holding `columns.vocab`.
fn logit_rows(len: usize, columns: LogitColumns) -> usize {
    assert!(columns.vocab <= columns.stride, "{columns:?}: the vocabulary is wider than the rows");
    rows_of(len, columns.stride)
}

impl CudaBackend {
    /// Opens GPU `ordinal`, computing in `compute` (bf16 for training, f32 for checking).
    pub fn open(ordinal: usize, compute: Dtype) -> Result<Self, CudaError> {
        Ok(Self { dev: Box::new(Gpu::open(ordinal)?), compute, tensor_cores: true, blas_gemms: true })
    }

    /// The backend on the SIMT emulator (src/emu.rs): the same kernels and launches on the CPU,
    /// for checking them without a GPU. `reverse` runs each block's threads in reverse order,
    /// and the blocks from the last.
    pub fn emulated(compute: Dtype, reverse: bool) -> Self {
        Self::emulated_with_shared_memory(compute, reverse, A100_SHARED_BYTES)
    }

    /// [`Self::emulated`] with `bytes` of shared memory a block (what a GPU allows with the
    /// opt-in: 99 KiB on sm_86, sm_89 and sm_120, 163 KiB on sm_80, 227 KiB on sm_90), for
    /// the kernels' forms that fit GPUs with less than an A100.
    pub fn emulated_with_shared_memory(compute: Dtype, reverse: bool, bytes: u32) -> Self {
        Self { dev: Box::new(Emulator::new(reverse, bytes)), compute, tensor_cores: true, blas_gemms: true }
    }

    /// Bytes of the device buffers allocated and not yet freed, where the device counts them
    /// exactly (the emulator).
    pub fn allocated_bytes(&self) -> Option<u64> {
        self.dev.allocated_bytes()
    }

    /// The same backend with the CUDA-core kernels everywhere: the simple attention of
    /// attention.cu and the SSD's CUDA-core forms (to check the tensor-core ones against).
    pub fn without_tensor_cores(mut self) -> Self {
        self.tensor_cores = false;
        self
    }

    /// The same backend with every plain GEMM on gemm.cu's CUDA-core kernel, the one that
    /// runs where cuBLASLt has no algorithm (to check it against the CPU).
    pub fn without_blas_gemms(mut self) -> Self {
        self.blas_gemms = false;
        self
    }

    /// Whether attention of `shape` over these buffers runs the flash kernels: bf16 storage,
    /// a head dim of [`FLASH_HEAD_DIMS`], and 16-byte aligned buffers (they copy rows to
    /// shared memory in 16-byte pieces).
    fn uses_flash(&self, shape: AttnShape, ptrs: &[u64]) -> bool {
        self.tensor_cores
            && self.compute == Dtype::Bf16
            && FLASH_HEAD_DIMS.contains(&shape.head_dim)
            && ptrs.iter().all(|p| p.is_multiple_of(16))
    }

    /// Whether the SSD of `shape` over these buffers runs its products on tensor cores: bf16,
    /// a (head dim, state) pair of [`SSD_TC_SHAPES`], and 16-byte aligned xbc and y (forward)
    /// or dy (backward): rows are copied to shared memory in 16-byte pieces.
    fn uses_tensor_core_ssd(&self, x: &SsdInputs<DevRef<'_>>, shape: SsdShape, y: u64) -> bool {
        self.tensor_cores
            && x.xbc.dtype == Dtype::Bf16
            && SSD_TC_SHAPES.contains(&(shape.head_dim, shape.state))
            && [x.xbc.ptr, y].iter().all(|p| p.is_multiple_of(16))
    }

    /// Whether a GEMM of `g` can apply `act` (or its backward) in its epilogue, with GELU's
    /// input `pre` beside its output: GELU (cuBLASLt has its tanh form) in bf16 (f32 is for
    /// checking against the CPU, and cuBLASLt's tanh may be the GPU's approximate one, as
    /// CUTLASS's is), the output's type and shape, and rows of a multiple of 8 values,
    /// 16-byte aligned (cuBLASLt's rule for that matrix).
    fn fuses_gelu(act: Activation, g: Gemm, pre: DevRef, out: DevRef) -> bool {
        act == Activation::Gelu
            && out.dtype == Dtype::Bf16
            && g.k > 0
            && (pre.dtype, pre.len, out.len) == (out.dtype, g.m * g.n, g.m * g.n)
            && g.n.is_multiple_of(8)
            && pre.ptr.is_multiple_of(16)
    }

    /// The device's name, as the driver reports it.
    pub fn device_name(&self) -> String {
        self.dev.name()
    }

    /// The stream every op runs on: communicators that work on device memory (NCCL) issue
    /// their collectives on it, in order with the kernels. None on the emulator.
    pub fn stream(&self) -> Option<std::sync::Arc<cudarc::driver::CudaStream>> {
        self.dev.cuda_stream()
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
            self.dev.gemm(g, a.view(0..n * n), a.view(0..n * n), Epilogue::None, c.view_mut(0..n * n));
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

    /// gemm.cu's kernel: `c = alpha op(a) op(b) + beta c` on CUDA cores, for shapes the GEMM
    /// library refuses.
    fn gemm_on_cuda_cores(&self, g: Gemm, a: DevRef<'_>, b: DevRef<'_>, c: DevMut<'_>) {
        check_gemm_operands(&g, &a, &b, &c);
        let name = match (a.dtype, c.dtype) {
            (Dtype::F32, _) => "gemm_f32",
            (Dtype::Bf16, Dtype::Bf16) => "gemm_bf16",
            (Dtype::Bf16, Dtype::F32) => "gemm_bf16_f32",
        };
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return;
        }
        let cfg = LaunchConfig {
            grid_dim: (g.n.div_ceil(16) as u32, g.m.div_ceil(16).min(65535) as u32, g.batch.min(65535) as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = vec![ptr(&a), ptr(&b), ptr_mut(&c)];
        args.extend([g.m, g.n, g.k].map(|x| Arg::I32(x as i32)));
        args.extend([g.trans_a, g.trans_b].map(|t| Arg::I32(t as i32)));
        args.extend([g.stride_a, g.stride_b, g.stride_c].map(|s| Arg::I64(s as i64)));
        args.extend([Arg::I32(g.batch as i32), Arg::F32(g.alpha), Arg::F32(g.beta)]);
        self.dev.launch("gemm", name, cfg, &args);
    }

    /// The buffers of the query tiles flash attention's backward at head dim `d` runs with:
    /// two where they fit the GPU's shared memory, else one where that form exists (head dim
    /// 128, for GPUs with 99 KiB) and fits; None where neither does.
    fn flash_backward_stages(&self, d: usize) -> Option<usize> {
        let fits = |stages| flash_backward_shared(d, stages) <= self.dev.max_shared_bytes();
        [2, 1].into_iter().find(|&stages| fits(stages) && (stages == 2 || d == 128))
    }

    /// Flash attention's forward (kernels/flash_attention.cu) into `out` and the log-sum-exp
    /// at `lse` (fp32, [B, H, T]).
    fn flash_forward(&self, qkv: DevRef<'_>, out: DevMut<'_>, lse: u64, shape: AttnShape, first_keys: u64) {
        let mut args = vec![ptr(&qkv), ptr_mut(&out), Arg::Ptr(lse), Arg::Ptr(first_keys)];
        args.extend([shape.seq, shape.n_heads, shape.n_kv_heads].map(|x| Arg::I32(x as i32)));
        let name = format!("flash_forward_d{}", shape.head_dim);
        let smem = 2 * 2 * 64 * (shape.head_dim + 8); // K and V tiles of 64 rows of D + 8 bf16
        self.dev.launch("flash_attention", &name, flash_grid(shape, shape.n_heads, FLASH_FORWARD, smem), &args);
    }

    /// Flash attention's backward (kernels/flash_attention.cu): delta = rowsum(dO out), the
    /// key-tile kernel (dK and dV written, dQ added into an fp32 accumulator), then dQ into
    /// dqkv's q columns.
    #[allow(clippy::too_many_arguments)]
    fn flash_backward(
        &self,
        dout: DevRef<'_>,
        qkv: DevRef<'_>,
        out: DevRef<'_>,
        lse: DevRef<'_>,
        dqkv: DevMut<'_>,
        shape: AttnShape,
        first_keys: u64,
    ) {
        let (rows, d) = (shape.rows(), shape.head_dim);
        let mut delta = self.zeros_f32(shape.batch * shape.n_heads * shape.seq);
        let mut dq = self.zeros_f32(rows * shape.q_width());
        let (delta_ptr, dq_ptr) = (delta.view_mut(0..delta.len()).ptr, dq.view_mut(0..dq.len()).ptr);
        let warps = rows * shape.n_heads;
        let cfg = LaunchConfig {
            grid_dim: ((32 * warps).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            ptr(&dout),
            ptr(&out),
            Arg::Ptr(delta_ptr),
            Arg::I32(shape.seq as i32),
            Arg::I32(shape.n_heads as i32),
            Arg::I32(d as i32),
            Arg::I64(rows as i64),
        ];
        self.dev.launch("flash_attention", "flash_backward_dot", cfg, &args);
        let mut args = vec![ptr(&dout), ptr(&qkv), ptr(&lse), Arg::Ptr(delta_ptr), Arg::Ptr(dq_ptr), ptr_mut(&dqkv)];
        args.push(Arg::Ptr(first_keys));
        args.extend([shape.seq, shape.n_heads, shape.n_kv_heads].map(|x| Arg::I32(x as i32)));
        let stages = self.flash_backward_stages(d).expect("attention_backward checked that a form fits");
        let cfg = flash_grid(shape, shape.n_kv_heads, FLASH_BACKWARD, flash_backward_shared(d, stages) as usize);
        self.dev.launch("flash_attention", &format!("flash_backward_d{d}_s{stages}"), cfg, &args);
        let args = [
            Arg::Ptr(dq_ptr),
            ptr_mut(&dqkv),
            Arg::I32(shape.n_heads as i32),
            Arg::I32(shape.n_kv_heads as i32),
            Arg::I32(d as i32),
            Arg::I64(rows as i64),
        ];
        self.dev.launch("flash_attention", "flash_backward_dq", self.dev.flat(rows * shape.q_width()), &args);
    }

    /// `out` (of the compute type) = the f32 values of `src` (an fp32 accumulator).
    fn convert_from_f32(&self, src: DevRef<'_>, out: DevMut<'_>) {
        assert_eq!(src.len, out.len, "from_f32: lengths");
        let args = [ptr(&src), ptr_mut(&out), Arg::I64(out.len as i64)];
        self.run("elementwise", "from_f32", out.dtype, self.dev.flat(out.len), &args);
    }

    /// Launches `name_{suffix}` of `family`, the kernel instantiated for `dtype`.
    fn run(&self, family: &str, name: &str, dtype: Dtype, cfg: LaunchConfig, args: &[Arg]) {
        self.dev.launch(family, &format!("{name}_{}", dtype.suffix()), cfg, args);
    }

    /// One block of ROW_THREADS per row, with `shared` bytes of dynamic shared memory.
    fn per_row(rows: usize, shared: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: shared as u32 }
    }

    /// The rows, heads and head dim of a fused qkv buffer, as the head-wise kernels take them.
    fn head_args(shape: AttnShape) -> [Arg; 4] {
        [
            Arg::I64(shape.rows() as i64),
            Arg::I32(shape.n_heads as i32),
            Arg::I32(shape.n_kv_heads as i32),
            Arg::I32(shape.head_dim as i32),
        ]
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

    fn compute_bytes(&self) -> usize {
        self.compute.bytes()
    }

    fn device_slice(&self, view: DevRef<'_>) -> Option<DeviceSlice> {
        Some(DeviceSlice {
            ptr: view.ptr,
            len: view.len,
            bf16: view.dtype == Dtype::Bf16,
            host: self.dev.host_memory(),
        })
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
        let len = buf.len();
        self.write_view(buf.view_mut(0..len), data);
    }
    fn download(&self, buf: &DeviceBuf) -> Vec<f32> {
        self.download_view(buf.view(0..buf.len()))
    }
    fn download_view(&self, view: DevRef<'_>) -> Vec<f32> {
        if view.len == 0 {
            return Vec::new();
        }
        match view.dtype {
            Dtype::F32 => {
                let mut host = vec![0.0f32; view.len];
                self.dev.copy_out(bytes_of_mut(&mut host), view.ptr);
                host
            }
            Dtype::Bf16 => {
                let mut host = vec![0u16; view.len];
                self.dev.copy_out(bytes_of_mut(&mut host), view.ptr);
                host.into_iter().map(bf16::to_f32).collect()
            }
        }
    }
    fn write_view(&self, view: DevMut<'_>, data: &[f32]) {
        assert_eq!(view.len, data.len(), "write_view: view and data differ in length");
        if !data.is_empty() {
            self.copy_in(view.ptr, view.dtype, data);
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
    fn gemm(&self, g: Gemm, a: DevRef<'_>, b: DevRef<'_>, mut c: DevMut<'_>) {
        if g.k == 0 {
            // An empty sum: C = beta C (a zero beta writes zeros, as cuBLAS would).
            if g.beta == 0.0 {
                self.fill(c, 0.0)
            } else {
                self.scale(c, g.beta)
            }
            return;
        }
        if !(self.blas_gemms && self.dev.gemm(g, a, b, Epilogue::None, c.reborrow())) {
            self.gemm_on_cuda_cores(g, a, b, c);
        }
    }
    fn gemm_bias(&self, g: Gemm, a: DevRef<'_>, b: DevRef<'_>, bias: DevRef<'_>, mut c: DevMut<'_>) {
        assert!(g.batch == 1 && g.beta == 0.0, "gemm_bias: one batch, beta 0");
        assert_eq!(bias.len, g.n, "gemm_bias: bias length");
        assert_eq!(bias.dtype, c.dtype, "gemm_bias: the bias has the output's type");
        // cuBLASLt's bias epilogue fails on biases not 16-byte aligned (seen by others on
        // A100); those are added by a pass of their own.
        if g.k == 0 || !bias.ptr.is_multiple_of(16) || !self.dev.gemm(g, a, b, Epilogue::Bias(bias), c.reborrow()) {
            self.gemm(g, a, b, c.reborrow());
            self.add_bias(c, bias, g.n);
        }
    }
    fn gemm_activation(
        &self,
        g: Gemm,
        a: DevRef<'_>,
        b: DevRef<'_>,
        bias: Option<DevRef<'_>>,
        act: Activation,
        mut pre: DevMut<'_>,
        mut out: DevMut<'_>,
    ) {
        assert!(g.batch == 1 && g.beta == 0.0, "gemm_activation: one batch, beta 0");
        let aligned = bias.is_none_or(|b| b.ptr.is_multiple_of(16));
        if aligned && Self::fuses_gelu(act, g, pre.as_ref(), out.as_ref()) {
            let epilogue = Epilogue::Gelu { bias, pre: pre.reborrow() };
            if self.dev.gemm(g, a, b, epilogue, out.reborrow()) {
                return;
            }
        }
        match bias {
            Some(bias) => self.gemm_bias(g, a, b, bias, pre.reborrow()),
            None => self.gemm(g, a, b, pre.reborrow()),
        }
        self.activation_forward(act, pre.as_ref(), out);
    }
    fn gemm_activation_backward(
        &self,
        g: Gemm,
        a: DevRef<'_>,
        b: DevRef<'_>,
        act: Activation,
        pre: DevRef<'_>,
        mut dpre: DevMut<'_>,
        mut scratch: DevMut<'_>,
    ) {
        assert!(g.batch == 1 && g.beta == 0.0, "gemm_activation_backward: one batch, beta 0");
        if Self::fuses_gelu(act, g, pre, dpre.as_ref())
            && self.dev.gemm(g, a, b, Epilogue::GeluBackward { pre }, dpre.reborrow())
        {
            return;
        }
        self.gemm(g, a, b, scratch.reborrow());
        self.activation_backward(act, scratch.as_ref(), pre, dpre);
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
        let (per_chunk, chunks) = row_chunks(rows);
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(256) as u32, chunks, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let args =
            [ptr(&dy), ptr_mut(&dbias), Arg::I64(rows as i64), Arg::I32(cols as i32), Arg::I64(per_chunk as i64)];
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
        all_f32(
            "layernorm_backward",
            &[("mean", mean.dtype), ("rstd", rstd.dtype), ("dweight", dweight.dtype), ("dbias", dbias.dtype)],
        );
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
    fn rope(&self, qkv: DevMut<'_>, cos_sin: DevRef<'_>, shape: AttnShape, inverse: bool, q_scale: f32) {
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
            Arg::F32(q_scale),
        ];
        self.run("rope", "rope", qkv.dtype, self.dev.flat(pairs), &args);
    }
    fn qk_norm_forward(
        &self,
        qkv: DevRef<'_>,
        weight: DevRef<'_>,
        out: DevMut<'_>,
        rstd: DevMut<'_>,
        shape: AttnShape,
        eps: f32,
    ) {
        let dtype = same_type("qk_norm_forward", &[qkv.dtype, weight.dtype, out.dtype]);
        is_f32("qk_norm_forward rstd", rstd.dtype);
        let (rows, heads) = (shape.rows(), shape.n_heads + 2 * shape.n_kv_heads);
        assert!(qkv.len == rows * shape.qkv_width() && out.len == qkv.len, "qk_norm_forward: qkv length");
        assert!(weight.len == 2 * shape.head_dim, "qk_norm_forward: weight is [2 head_dim]");
        assert_eq!(rstd.len, rows * (shape.n_heads + shape.n_kv_heads), "qk_norm_forward: rstd length");
        let mut args = vec![ptr(&qkv), ptr(&weight), ptr_mut(&out), ptr_mut(&rstd)];
        args.extend(Self::head_args(shape));
        args.push(Arg::F32(eps));
        // One warp per head.
        self.run("norms", "qk_norm_forward", dtype, self.dev.flat(rows * heads * 32), &args);
    }
    fn qk_norm_backward(
        &self,
        dqkv: DevMut<'_>,
        qkv: DevRef<'_>,
        weight: DevRef<'_>,
        rstd: DevRef<'_>,
        dweight: DevMut<'_>,
        shape: AttnShape,
    ) {
        let dtype = same_type("qk_norm_backward", &[dqkv.dtype, qkv.dtype, weight.dtype]);
        is_f32("qk_norm_backward rstd", rstd.dtype);
        is_f32("qk_norm_backward dweight", dweight.dtype);
        let (rows, normed) = (shape.rows(), shape.n_heads + shape.n_kv_heads);
        assert!(qkv.len == rows * shape.qkv_width() && dqkv.len == qkv.len, "qk_norm_backward: qkv length");
        assert!(weight.len == 2 * shape.head_dim && dweight.len == weight.len, "qk_norm_backward: weight length");
        assert_eq!(rstd.len, rows * normed, "qk_norm_backward: rstd length");
        assert!(shape.head_dim <= QK_NORM_MAX_HEAD_DIM, "qk_norm_backward: heads wider than {QK_NORM_MAX_HEAD_DIM}");
        let mut args = vec![ptr_mut(&dqkv), ptr(&qkv), ptr(&weight), ptr(&rstd), ptr_mut(&dweight)];
        args.extend(Self::head_args(shape));
        // One warp per head, each with its own dw partial (2 D floats) in shared memory.
        let warps = (ROW_THREADS / 32) as usize;
        let cfg = self.per_sm((rows * normed).div_ceil(warps), warps * 2 * shape.head_dim * 4);
        self.run("norms", "qk_norm_backward", dtype, cfg, &args);
    }
    fn attention_forward(
        &self,
        qkv: DevRef<'_>,
        out: DevMut<'_>,
        lse: DevMut<'_>,
        shape: AttnShape,
        first_keys: Option<&DeviceIds>,
    ) {
        let dtype = same_type("attention_forward", &[qkv.dtype, out.dtype]);
        is_f32("attention_forward lse", lse.dtype);
        assert_eq!(qkv.len, shape.rows() * shape.qkv_width(), "attention_forward: qkv length");
        assert_eq!(out.len, shape.rows() * shape.q_width(), "attention_forward: out length");
        assert_eq!(lse.len, shape.batch * shape.n_heads * shape.seq, "attention_forward: lse length");
        let first_keys = first_keys_ptr(first_keys, shape);
        if self.uses_flash(shape, &[qkv.ptr, out.ptr]) {
            self.flash_forward(qkv, out, lse.ptr, shape, first_keys);
            return;
        }
        let cfg = simple_attention_grid(shape);
        let mut args = vec![ptr(&qkv), ptr_mut(&out), ptr_mut(&lse), Arg::Ptr(first_keys)];
        args.extend([shape.seq, shape.n_heads, shape.n_kv_heads, shape.head_dim].map(|x| Arg::I32(x as i32)));
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
        first_keys: Option<&DeviceIds>,
    ) {
        let dtype = same_type("attention_backward", &[dout.dtype, qkv.dtype, out.dtype, dqkv.dtype]);
        is_f32("attention_backward lse", lse.dtype);
        assert_eq!(dqkv.len, qkv.len, "attention_backward: dqkv length");
        assert_eq!(qkv.len, shape.rows() * shape.qkv_width(), "attention_backward: qkv length");
        assert!(dout.len == out.len && out.len == shape.rows() * shape.q_width(), "attention_backward: out length");
        assert_eq!(lse.len, shape.batch * shape.n_heads * shape.seq, "attention_backward: lse length");
        let first_keys = first_keys_ptr(first_keys, shape);
        if self.uses_flash(shape, &[dout.ptr, qkv.ptr, out.ptr, dqkv.ptr])
            && self.flash_backward_stages(shape.head_dim).is_some()
        {
            self.flash_backward(dout, qkv, out, lse, dqkv, shape, first_keys);
            return;
        }
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
        let cfg = simple_attention_grid(shape);
        let args = [
            ptr(&dout),
            ptr(&qkv),
            ptr(&out),
            ptr(&lse),
            Arg::Ptr(target),
            Arg::Ptr(first_keys),
            Arg::I32(shape.seq as i32),
            Arg::I32(shape.n_heads as i32),
            Arg::I32(shape.n_kv_heads as i32),
            Arg::I32(shape.head_dim as i32),
        ];
        self.run("attention", "attention_backward", dtype, cfg, &args);
        if let Some(scratch) = &scratch {
            self.convert_from_f32(scratch.view(0..dqkv.len), dqkv);
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
        window: Option<usize>,
    ) {
        let dtype = same_type("attention_cached", &[qkv.dtype, k_cache.dtype, v_cache.dtype, out.dtype]);
        // (A window past the cache is none; the kernels take it as a 32-bit int.)
        let window = window.filter(|&w| w < max_seq);
        assert!(pos + shape.seq <= max_seq, "KV cache of {max_seq} positions cannot hold {} tokens", pos + shape.seq);
        let kv = shape.n_kv_heads * shape.head_dim;
        assert!(
            k_cache.len == shape.batch * max_seq * kv && v_cache.len == k_cache.len,
            "attention_cached: cache lengths"
        );
        assert_eq!(out.len, shape.rows() * shape.q_width(), "attention_cached: out length");
        if shape.rows() == 0 {
            return;
        }
        let heads = [shape.n_heads, shape.n_kv_heads, shape.head_dim].map(|x| Arg::I32(x as i32));
        let mut args = vec![ptr(&qkv), ptr_mut(&k_cache), ptr_mut(&v_cache), Arg::I32(shape.seq as i32)];
        args.extend(heads);
        args.extend([Arg::I32(pos as i32), Arg::I32(max_seq as i32), Arg::I64(shape.rows() as i64)]);
        self.run("attention", "kv_append", dtype, self.dev.flat(shape.rows() * kv), &args);
        // A prefill (an empty cache) is causal attention over the new rows alone: flash
        // attention where it applies, rather than reading the cache once per query; in a
        // sliding-window layer with each row's first key, its window's.
        if pos == 0 && self.uses_flash(shape, &[qkv.ptr, out.ptr]) {
            let mut lse = self.zeros_f32(shape.batch * shape.n_heads * shape.seq);
            let first_keys = window.map(|w| self.upload_ids(&window_first_keys(w, shape.seq, None, shape.rows())));
            let first_keys = first_keys.as_ref().map_or(0, |f| f.ptr);
            self.flash_forward(qkv, out, lse.view_mut(0..lse.len()).ptr, shape, first_keys);
            return;
        }
        let (parts, span) = cached_key_parts(shape, pos + shape.seq, self.dev.sms());
        let mut cfg = simple_attention_grid(shape);
        if parts == 1 {
            let mut args = vec![
                ptr(&qkv),
                ptr(&k_cache.as_ref()),
                ptr(&v_cache.as_ref()),
                ptr_mut(&out),
                Arg::I32(shape.seq as i32),
            ];
            args.extend(heads);
            args.extend([pos, max_seq, window.unwrap_or(0)].map(|x| Arg::I32(x as i32)));
            self.run("attention", "attention_cached", dtype, cfg, &args);
            return;
        }
        // Decoding: each query's keys in parts on blocks of their own, then merged.
        let mut part = self.zeros_f32(shape.rows() * shape.n_heads * parts * (shape.head_dim + 2));
        let part_ptr = part.view_mut(0..part.len()).ptr;
        cfg.grid_dim.2 *= parts as u32;
        let mut args = vec![
            ptr(&qkv),
            ptr(&k_cache.as_ref()),
            ptr(&v_cache.as_ref()),
            Arg::Ptr(part_ptr),
            Arg::I32(shape.seq as i32),
        ];
        args.extend(heads);
        args.extend([pos, max_seq, window.unwrap_or(0), parts, span].map(|x| Arg::I32(x as i32)));
        self.run("attention", "attention_cached_part", dtype, cfg, &args);
        let mut args = vec![Arg::Ptr(part_ptr), ptr_mut(&out), Arg::I64(shape.rows() as i64)];
        args.extend([shape.n_heads, shape.head_dim, parts].map(|x| Arg::I32(x as i32)));
        self.run("attention", "attention_combine", dtype, self.dev.flat(out.len), &args);
    }

    // ---- Mamba ------------------------------------------------------------------------------------
    fn conv1d_forward(
        &self,
        x: DevRef<'_>,
        w: DevRef<'_>,
        bias: DevRef<'_>,
        y: DevMut<'_>,
        len: usize,
        channels: usize,
    ) {
        let dtype = same_type("conv1d_forward", &[x.dtype, w.dtype, bias.dtype, y.dtype]);
        let k = conv_taps("conv1d_forward", x.len, w.len, bias.len, y.len, len, channels);
        let rows = x.len / channels;
        let args = [
            ptr(&x),
            ptr(&w),
            ptr(&bias),
            ptr_mut(&y),
            Arg::I64(rows as i64),
            Arg::I32(len as i32),
            Arg::I32(channels as i32),
            Arg::I32(k as i32),
        ];
        self.run("conv1d", "conv1d_forward", dtype, self.dev.flat(x.len), &args);
    }
    fn conv1d_recurrent(
        &self,
        x: DevRef<'_>,
        w: DevRef<'_>,
        bias: DevRef<'_>,
        state: DevMut<'_>,
        y: DevMut<'_>,
        len: usize,
        channels: usize,
    ) {
        let dtype = same_type("conv1d_recurrent", &[x.dtype, w.dtype, bias.dtype, state.dtype, y.dtype]);
        let k = conv_taps("conv1d_recurrent", x.len, w.len, bias.len, y.len, len, channels);
        let (rows, carry) = (x.len / channels, Arg::Ptr(state.ptr));
        let batch = rows / len.max(1);
        assert_eq!(state.len, batch * (k - 1) * channels, "conv1d_recurrent: state length");
        let (x_arg, size) = (ptr(&x), [Arg::I32(len as i32), Arg::I32(channels as i32), Arg::I32(k as i32)]);
        let mut args = vec![x_arg, ptr(&w), ptr(&bias), carry, ptr_mut(&y), Arg::I64(rows as i64)];
        args.extend(size);
        self.run("conv1d", "conv1d_recurrent", dtype, self.dev.flat(x.len), &args);
        // Then the carry moves on, once the convolution has read it.
        let mut args = vec![x_arg, carry, Arg::I64(batch as i64)];
        args.extend(size);
        self.run("conv1d", "conv1d_keep", dtype, self.dev.flat(batch * channels), &args);
    }
    fn conv1d_backward(
        &self,
        dy: DevRef<'_>,
        x: DevRef<'_>,
        w: DevRef<'_>,
        bias: DevRef<'_>,
        dx: DevMut<'_>,
        dw: DevMut<'_>,
        dbias: DevMut<'_>,
        len: usize,
        channels: usize,
    ) {
        let dtype = same_type("conv1d_backward", &[dy.dtype, x.dtype, w.dtype, bias.dtype, dx.dtype]);
        is_f32("conv1d_backward dw", dw.dtype);
        is_f32("conv1d_backward dbias", dbias.dtype);
        let k = conv_taps("conv1d_backward", x.len, w.len, bias.len, dx.len, len, channels);
        assert!(dy.len == x.len && dw.len == w.len && dbias.len == channels, "conv1d_backward: lengths");
        let rows = x.len / channels;
        let geometry = [Arg::I64(rows as i64), Arg::I32(len as i32), Arg::I32(channels as i32), Arg::I32(k as i32)];
        let mut args = vec![ptr(&dy), ptr(&x), ptr(&w), ptr(&bias), ptr_mut(&dx)];
        args.extend(geometry);
        self.run("conv1d", "conv1d_backward_dx", dtype, self.dev.flat(x.len), &args);
        let (per_chunk, chunks) = row_chunks(rows);
        let cfg = LaunchConfig {
            grid_dim: (channels.div_ceil(256) as u32, chunks, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = vec![ptr(&dy), ptr(&x), ptr(&w), ptr(&bias), ptr_mut(&dw), ptr_mut(&dbias)];
        args.extend(geometry);
        args.push(Arg::I64(per_chunk as i64));
        self.run("conv1d", "conv1d_backward_dw", dtype, cfg, &args);
    }
    fn selective_scan_forward(&self, x: ScanInputs<DevRef<'_>>, y: DevMut<'_>, states: DevMut<'_>, shape: ScanShape) {
        let dtype = scan_type("selective_scan_forward", &x, shape);
        assert_eq!(y.dtype, dtype, "selective_scan_forward: y type");
        is_f32("selective_scan_forward states", states.dtype);
        assert_eq!(states.len, shape.batch * shape.saved() * shape.channels * shape.state, "selective_scan states");
        let mut args = scan_args(&x);
        args.extend([ptr_mut(&y), ptr_mut(&states), Arg::Ptr(0)]);
        args.extend(scan_geometry(shape));
        self.run("selective_scan", "selective_scan_forward", dtype, scan_grid(shape), &args);
    }
    fn selective_scan_recurrent(&self, x: ScanInputs<DevRef<'_>>, y: DevMut<'_>, state: DevMut<'_>, shape: ScanShape) {
        let dtype = scan_type("selective_scan_recurrent", &x, shape);
        assert_eq!(y.dtype, dtype, "selective_scan_recurrent: y type");
        is_f32("selective_scan_recurrent state", state.dtype);
        assert_eq!(state.len, shape.batch * shape.channels * shape.state, "selective_scan_recurrent: state length");
        // The forward kernel with a carried state in place of the saved ones.
        let mut args = scan_args(&x);
        args.extend([ptr_mut(&y), Arg::Ptr(0), ptr_mut(&state)]);
        args.extend(scan_geometry(ScanShape { chunk: shape.len.max(1), ..shape }));
        self.run("selective_scan", "selective_scan_forward", dtype, scan_grid(shape), &args);
    }
    fn selective_scan_backward(
        &self,
        dy: DevRef<'_>,
        x: ScanInputs<DevRef<'_>>,
        states: DevRef<'_>,
        g: ScanGrads<DevMut<'_>>,
        shape: ScanShape,
    ) {
        let dtype = scan_type("selective_scan_backward", &x, shape);
        assert_eq!(dy.dtype, dtype, "selective_scan_backward: dy type");
        all_f32(
            "selective_scan_backward",
            &[
                ("states", states.dtype),
                ("ddelta_bias", g.ddelta_bias.dtype),
                ("da_log", g.da_log.dtype),
                ("dd", g.dd.dtype),
            ],
        );
        // dB and dC sum over channels into fp32 accumulators; the recompute keeps the state
        // every SCAN_SUB tokens of a chunk.
        let rows_n = shape.batch * shape.len * shape.state;
        let (mut db_acc, mut dc_acc) = (self.zeros_f32(rows_n), self.zeros_f32(rows_n));
        let sub = self.zeros_f32(shape.batch * shape.chunk.div_ceil(SCAN_SUB) * SCAN_MAX_STATE * shape.channels);
        let mut args = vec![ptr(&dy)];
        args.extend(scan_args(&x));
        args.extend([
            ptr(&states),
            ptr_mut(&g.du),
            ptr_mut(&g.ddelta),
            ptr_mut(&g.ddelta_bias),
            ptr_mut(&g.da_log),
            Arg::Ptr(db_acc.view_mut(0..rows_n).ptr),
            Arg::Ptr(dc_acc.view_mut(0..rows_n).ptr),
            ptr_mut(&g.dd),
            ptr_mut(&g.dz),
            Arg::Ptr(sub.view(0..sub.len()).ptr),
        ]);
        args.extend(scan_geometry(shape));
        self.run("selective_scan", "selective_scan_backward", dtype, scan_grid(shape), &args);
        for (acc, out) in [(&db_acc, g.db), (&dc_acc, g.dc)] {
            assert_eq!(out.len, rows_n, "selective_scan_backward: dB and dC are [rows, state]");
            self.convert_from_f32(acc.view(0..rows_n), out);
        }
    }
    fn ssd_forward(&self, x: SsdInputs<DevRef<'_>>, y: DevMut<'_>, mut states: DevMut<'_>, shape: SsdShape) {
        let dtype = ssd_type("ssd_forward", &x, shape);
        assert_eq!(y.dtype, dtype, "ssd_forward: y type");
        assert_eq!(y.len, shape.rows() * shape.inner(), "ssd_forward: y length");
        is_f32("ssd_forward states", states.dtype);
        assert_eq!(states.len, shape.states_len(), "ssd_forward: states length");
        let chunks = shape.len.div_ceil(shape.chunk);
        let mut decay = self.zeros_f32(shape.batch * shape.heads * chunks);
        let decay_ptr = decay.view_mut(0..decay.len()).ptr;
        let tensor_cores = self.uses_tensor_core_ssd(&x, shape, y.ptr);
        let suffix = format!("_tc_p{}_n{}", shape.head_dim, shape.state);
        let mut args = ssd_inputs(&x, false);
        args.extend([ptr_mut(&states), Arg::Ptr(decay_ptr)]);
        args.extend(ssd_geometry(shape));
        if tensor_cores {
            let cfg = ssd_tc_grid(shape, 1, 3, 64 * (shape.head_dim + shape.state + 16));
            self.dev.launch("ssd", &format!("ssd_chunk_state{suffix}"), cfg, &args);
        } else {
            self.run("ssd", "ssd_chunk_state", dtype, ssd_chunk_grid(shape, 2), &args);
        }
        let mut args = vec![ptr_mut(&states.reborrow()), Arg::Ptr(decay_ptr)];
        args.extend(ssd_geometry(shape));
        self.dev.launch("ssd", "ssd_state_passing", ssd_passing_grid(shape), &args);
        let mut args = ssd_inputs(&x, true);
        args.extend([ptr(&states.as_ref()), ptr_mut(&y)]);
        args.extend(ssd_geometry(shape));
        if tensor_cores {
            let (p, n) = (shape.head_dim, shape.state);
            let cfg = ssd_tc_grid(shape, shape.chunk.div_ceil(64), 2, p.max(64) * (n + 8) + 64 * (p + 8));
            self.dev.launch("ssd", &format!("ssd_chunk_scan{suffix}"), cfg, &args);
        } else {
            self.run("ssd", "ssd_chunk_scan", dtype, ssd_chunk_grid(shape, 2 + SSD_ROWS), &args);
        }
    }
    fn ssd_recurrent(&self, x: SsdInputs<DevRef<'_>>, y: DevMut<'_>, state: DevMut<'_>, shape: SsdShape) {
        let dtype = ssd_type("ssd_recurrent", &x, shape);
        assert_eq!(y.dtype, dtype, "ssd_recurrent: y type");
        assert_eq!(y.len, shape.rows() * shape.inner(), "ssd_recurrent: y length");
        is_f32("ssd_recurrent state", state.dtype);
        assert_eq!(state.len, shape.batch * shape.inner() * shape.state, "ssd_recurrent: state length");
        let mut args = ssd_inputs(&x, true);
        args.extend([ptr_mut(&state), ptr_mut(&y), Arg::I64(shape.batch as i64)]);
        args.extend(ssd_geometry(shape));
        self.run("ssd", "ssd_recurrent", dtype, self.dev.flat(shape.batch * shape.inner()), &args);
    }
    fn ssd_backward(
        &self,
        dy: DevRef<'_>,
        x: SsdInputs<DevRef<'_>>,
        states: DevRef<'_>,
        g: SsdGrads<DevMut<'_>>,
        shape: SsdShape,
    ) {
        let dtype = ssd_type("ssd_backward", &x, shape);
        assert_eq!(dy.dtype, dtype, "ssd_backward: dy type");
        all_f32(
            "ssd_backward",
            &[("states", states.dtype), ("ddt_bias", g.ddt_bias.dtype), ("da_log", g.da_log.dtype), ("dd", g.dd.dtype)],
        );
        assert!(g.dxbc.len == x.xbc.len && g.ddt.len == x.dt.len, "ssd_backward: gradient lengths");
        let chunks = shape.len.div_ceil(shape.chunk);
        // exp(L_last) per chunk, dL/dH per chunk boundary, and the fp32 dxbc accumulator.
        let mut decay = self.zeros_f32(shape.batch * shape.heads * chunks);
        let mut dstates = self.zeros_f32(shape.states_len());
        let mut dxbc = self.zeros_f32(g.dxbc.len);
        let (decay_ptr, dstates_ptr) = (decay.view_mut(0..decay.len()).ptr, dstates.view_mut(0..dstates.len()).ptr);
        let mut args = vec![ptr(&dy)];
        args.extend(ssd_inputs(&x, false));
        args.extend([Arg::Ptr(dstates_ptr), Arg::Ptr(decay_ptr)]);
        args.extend(ssd_geometry(shape));
        self.run("ssd", "ssd_chunk_dstate", dtype, ssd_chunk_grid(shape, 2), &args);
        let mut args = vec![Arg::Ptr(dstates_ptr), Arg::Ptr(decay_ptr)];
        args.extend(ssd_geometry(shape));
        self.dev.launch("ssd", "ssd_dstate_passing", ssd_passing_grid(shape), &args);
        // With tensor cores, the quadratic form's share first: dx, dB and dC into dxbc, and
        // per token its (ddecay, dsteps), which the chunk kernel starts from.
        let tensor_cores = self.uses_tensor_core_ssd(&x, shape, dy.ptr);
        let mut qform = self.zeros_f32(if tensor_cores { 2 * shape.rows() * shape.heads } else { 0 });
        let (qform_ptr, dxbc_ptr) = (qform.view_mut(0..qform.len()).ptr, dxbc.view_mut(0..g.dxbc.len).ptr);
        if tensor_cores {
            let (p, n) = (shape.head_dim, shape.state);
            let cfg = ssd_tc_grid(shape, shape.chunk.div_ceil(64), 2, 64 * (p + n + 16));
            for (kernel, with_qform) in [("ssd_bwd_dx_tc", true), ("ssd_bwd_db_tc", false), ("ssd_bwd_dc_tc", true)] {
                let mut args = vec![ptr(&dy)];
                args.extend(ssd_inputs(&x, false));
                args.push(Arg::Ptr(dxbc_ptr));
                if with_qform {
                    args.push(Arg::Ptr(qform_ptr));
                }
                args.extend(ssd_geometry(shape));
                self.dev.launch("ssd", &format!("{kernel}_p{p}_n{n}"), cfg, &args);
            }
        }
        let mut args = vec![ptr(&dy)];
        args.extend(ssd_inputs(&x, true));
        args.extend([
            ptr(&states),
            Arg::Ptr(dstates_ptr),
            Arg::Ptr(dxbc_ptr),
            ptr_mut(&g.ddt),
            ptr_mut(&g.ddt_bias),
            ptr_mut(&g.da_log),
            ptr_mut(&g.dd),
            Arg::Ptr(qform_ptr),
        ]);
        args.extend(ssd_geometry(shape));
        let q_floats = if tensor_cores { 4 } else { 4 + 3 * SSD_ROWS };
        self.run("ssd", "ssd_chunk_backward", dtype, ssd_chunk_grid(shape, q_floats), &args);
        self.convert_from_f32(dxbc.view(0..g.dxbc.len), g.dxbc);
    }
    fn gated_rmsnorm_forward(
        &self,
        x: DevRef<'_>,
        z: DevRef<'_>,
        weight: DevRef<'_>,
        out: DevMut<'_>,
        rstd: DevMut<'_>,
        group: usize,
        eps: f32,
    ) {
        let dtype = same_type("gated_rmsnorm_forward", &[x.dtype, z.dtype, weight.dtype, out.dtype]);
        is_f32("gated_rmsnorm_forward rstd", rstd.dtype);
        let width = weight.len;
        let rows = gated_rows("gated_rmsnorm_forward", x.len, width, group);
        assert!(
            z.len == x.len && out.len == x.len && rstd.len == rows * width / group,
            "gated_rmsnorm_forward: lengths"
        );
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, (width / group) as u32, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            ptr(&x),
            ptr(&z),
            ptr(&weight),
            ptr_mut(&out),
            ptr_mut(&rstd),
            Arg::I32(rows as i32),
            Arg::I32(width as i32),
            Arg::I32(group as i32),
            Arg::F32(eps),
        ];
        self.run("norms", "gated_rmsnorm_forward", dtype, cfg, &args);
    }
    fn gated_rmsnorm_backward(
        &self,
        dout: DevRef<'_>,
        x: DevRef<'_>,
        z: DevRef<'_>,
        weight: DevRef<'_>,
        rstd: DevRef<'_>,
        dx: DevMut<'_>,
        dz: DevMut<'_>,
        dweight: DevMut<'_>,
        group: usize,
    ) {
        let dtype =
            same_type("gated_rmsnorm_backward", &[dout.dtype, x.dtype, z.dtype, weight.dtype, dx.dtype, dz.dtype]);
        is_f32("gated_rmsnorm_backward rstd", rstd.dtype);
        is_f32("gated_rmsnorm_backward dweight", dweight.dtype);
        let width = weight.len;
        let rows = gated_rows("gated_rmsnorm_backward", x.len, width, group);
        assert!(
            dout.len == x.len && z.len == x.len && dx.len == x.len && dz.len == x.len && dweight.len == width,
            "gated_rmsnorm_backward: lengths"
        );
        let cfg = LaunchConfig {
            grid_dim: (rows.min(2 * self.dev.sms()) as u32, (width / group) as u32, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: (4 * group) as u32,
        };
        let args = [
            ptr(&dout),
            ptr(&x),
            ptr(&z),
            ptr(&weight),
            ptr(&rstd),
            ptr_mut(&dx),
            ptr_mut(&dz),
            ptr_mut(&dweight),
            Arg::I32(rows as i32),
            Arg::I32(width as i32),
            Arg::I32(group as i32),
        ];
        self.run("norms", "gated_rmsnorm_backward", dtype, cfg, &args);
    }

    // ---- activations ----------------------------------------------------------------------------
    fn glu_forward(&self, act: Activation, gate_up: DevRef<'_>, out: DevMut<'_>, width: usize) {
        let dtype = same_type("glu_forward", &[gate_up.dtype, out.dtype]);
        assert_eq!(gate_up.len, 2 * out.len, "glu_forward: gate_up holds two halves per row");
        rows_of(out.len, width);
        let kind = Arg::I32(activation_kind(act));
        let args = [kind, ptr(&gate_up), ptr_mut(&out), Arg::I64(out.len as i64), Arg::I32(width as i32)];
        self.run("activations", "glu_forward", dtype, self.dev.flat(out.len), &args);
    }
    fn glu_backward(&self, act: Activation, dout: DevRef<'_>, gate_up: DevRef<'_>, dgate_up: DevMut<'_>, width: usize) {
        let dtype = same_type("glu_backward", &[dout.dtype, gate_up.dtype, dgate_up.dtype]);
        assert_eq!(gate_up.len, 2 * dout.len, "glu_backward: gate_up holds two halves per row");
        assert_eq!(dgate_up.len, gate_up.len, "glu_backward: dgate_up length");
        rows_of(dout.len, width);
        let kind = Arg::I32(activation_kind(act));
        let args =
            [kind, ptr(&dout), ptr(&gate_up), ptr_mut(&dgate_up), Arg::I64(dout.len as i64), Arg::I32(width as i32)];
        self.run("activations", "glu_backward", dtype, self.dev.flat(dout.len), &args);
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
        first_row: usize,
        losses: DevMut<'_>,
        columns: LogitColumns,
        grad_scale: Option<f32>,
    ) {
        is_f32("cross_entropy losses", losses.dtype);
        let rows = logit_rows(logits.len, columns);
        assert!(losses.len == rows, "cross_entropy: one loss per row");
        let args = [
            ptr_mut(&logits),
            Arg::Ptr(target_rows(targets, first_row, rows)),
            ptr_mut(&losses),
            Arg::I32(rows as i32),
            Arg::I32(columns.vocab as i32),
            Arg::I32(columns.stride as i32),
            Arg::I32(grad_scale.is_some() as i32),
            Arg::F32(grad_scale.unwrap_or(0.0)),
        ];
        self.run("cross_entropy", "cross_entropy", logits.dtype, Self::per_row(rows, 0), &args);
    }
    fn cross_entropy_stats(
        &self,
        logits: DevRef<'_>,
        targets: &DeviceIds,
        first_row: usize,
        stats: DevMut<'_>,
        first_id: usize,
        columns: LogitColumns,
    ) {
        is_f32("cross_entropy_stats stats", stats.dtype);
        let rows = logit_rows(logits.len, columns);
        assert!(stats.len == 3 * rows, "cross_entropy_stats: three stats per row");
        let args = [
            ptr(&logits),
            Arg::Ptr(target_rows(targets, first_row, rows)),
            ptr_mut(&stats),
            Arg::I32(rows as i32),
            Arg::I32(first_id as i32),
            Arg::I32(columns.vocab as i32),
            Arg::I32(columns.stride as i32),
        ];
        self.run("cross_entropy", "cross_entropy_stats", logits.dtype, Self::per_row(rows, 0), &args);
    }
    fn cross_entropy_grad(
        &self,
        logits: DevMut<'_>,
        targets: &DeviceIds,
        first_row: usize,
        lse: DevRef<'_>,
        first_id: usize,
        columns: LogitColumns,
        grad_scale: f32,
    ) {
        is_f32("cross_entropy_grad lse", lse.dtype);
        let rows = logit_rows(logits.len, columns);
        assert!(lse.len == rows, "cross_entropy_grad: one lse per row");
        let args = [
            ptr_mut(&logits),
            Arg::Ptr(target_rows(targets, first_row, rows)),
            ptr(&lse),
            Arg::I32(rows as i32),
            Arg::I32(first_id as i32),
            Arg::I32(columns.vocab as i32),
            Arg::I32(columns.stride as i32),
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
        all_f32("adamw", &[("params", params.dtype), ("grads", grads.dtype), ("m", m.dtype), ("v", v.dtype)]);
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
        Activation::Silu => 2,
    }
}

/// Taps of a causal convolution, checking the lengths the CPU checks.
fn conv_taps(what: &str, x: usize, w: usize, bias: usize, y: usize, len: usize, channels: usize) -> usize {
    assert!(channels > 0 && w.is_multiple_of(channels) && bias == channels, "{what}: w is [channels, K]");
    assert!(x == y && x.is_multiple_of(len * channels), "{what}: x and y are [batch, len, channels]");
    let k = w / channels;
    assert!((1..=CONV_MAX_TAPS).contains(&k), "{what}: {k} taps; the CUDA kernel takes 1 to {CONV_MAX_TAPS}");
    k
}

/// The most taps the causal convolution takes (CONV_MAX_K in kernels/conv1d.cu).
pub const CONV_MAX_TAPS: usize = 8;

/// States per channel the selective scan keeps in registers, and the tokens between the
/// states its backward stores (SCAN_MAX_STATE and SCAN_SUB in kernels/selective_scan.cu).
pub const SCAN_MAX_STATE: usize = 16;
const SCAN_SUB: usize = 8;

/// The storage type of a selective scan's inputs, checking their lengths.
fn scan_type(what: &str, x: &ScanInputs<DevRef<'_>>, s: ScanShape) -> Dtype {
    let dtype = same_type(what, &[x.u.dtype, x.delta.dtype, x.delta_bias.dtype, x.a_log.dtype, x.b.dtype, x.c.dtype]);
    same_type(what, &[dtype, x.d.dtype, x.z.dtype]);
    let (rows, ch, n) = (s.batch * s.len, s.channels, s.state);
    assert!(
        n <= SCAN_MAX_STATE,
        "{what}: {n} states per channel; the CUDA scan keeps at most {SCAN_MAX_STATE} in registers"
    );
    assert!(
        x.u.len == rows * ch
            && x.delta.len == rows * ch
            && x.z.len == rows * ch
            && x.b.len == rows * n
            && x.c.len == rows * n,
        "{what}: activation lengths"
    );
    assert!(x.delta_bias.len == ch && x.d.len == ch && x.a_log.len == ch * n, "{what}: parameter lengths");
    dtype
}

/// u, delta, delta_bias, a_log, B, C, D, z: the scan kernels' first arguments.
fn scan_args(x: &ScanInputs<DevRef<'_>>) -> Vec<Arg> {
    [x.u, x.delta, x.delta_bias, x.a_log, x.b, x.c, x.d, x.z].iter().map(ptr).collect()
}

fn scan_geometry(s: ScanShape) -> [Arg; 4] {
    [Arg::I32(s.len as i32), Arg::I32(s.channels as i32), Arg::I32(s.state as i32), Arg::I32(s.chunk as i32)]
}

/// One thread per (channel, sequence), 128 a block.
fn scan_grid(s: ScanShape) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (s.channels.div_ceil(128) as u32, s.batch as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Query rows per pass of the SSD's quadratic form (SSD_ROWS in kernels/ssd.cu).
const SSD_ROWS: usize = 16;

/// The longest SSD chunk the CUDA kernels take: the CUDA-core backward keeps 4 + 3 SSD_ROWS
/// floats per token of a chunk in shared memory (52 KiB at 256 tokens; GPUs with the least
/// allow 99 KiB a block). Mamba-2 and Codestral Mamba use 256, Nemotron-H 128.
pub const SSD_MAX_CHUNK: usize = 256;

/// The widest head `qk_norm_backward` takes: each of its warps keeps 2 D floats of weight
/// gradient in shared memory, 64 KiB for a block of 8 warps at 1024, within every GPU's.
pub const QK_NORM_MAX_HEAD_DIM: usize = 1024;

/// An A100's shared memory a block (163 KiB with the opt-in): the emulator's by default.
const A100_SHARED_BYTES: u32 = 163 << 10;

/// The storage type of an SSD's inputs, checking their lengths.
fn ssd_type(what: &str, x: &SsdInputs<DevRef<'_>>, s: SsdShape) -> Dtype {
    let dtype = same_type(what, &[x.xbc.dtype, x.dt.dtype, x.dt_bias.dtype, x.a_log.dtype, x.d.dtype]);
    assert!(s.groups > 0 && s.heads.is_multiple_of(s.groups), "{what}: heads must be a multiple of groups");
    assert!(
        s.chunk <= SSD_MAX_CHUNK,
        "{what}: chunks of {} tokens; the CUDA kernels take at most {SSD_MAX_CHUNK}",
        s.chunk
    );
    assert!(x.xbc.len == s.rows() * s.xbc_width() && x.dt.len == s.rows() * s.heads, "{what}: activation lengths");
    assert!(x.dt_bias.len == s.heads && x.a_log.len == s.heads && x.d.len == s.heads, "{what}: parameter lengths");
    dtype
}

/// xbc, dt, dt_bias, a_log (and D, for the kernels that read it).
fn ssd_inputs(x: &SsdInputs<DevRef<'_>>, with_d: bool) -> Vec<Arg> {
    let mut args = vec![ptr(&x.xbc), ptr(&x.dt), ptr(&x.dt_bias), ptr(&x.a_log)];
    if with_d {
        args.push(ptr(&x.d));
    }
    args
}

fn ssd_geometry(s: SsdShape) -> Vec<Arg> {
    [s.len, s.heads, s.head_dim, s.groups, s.state, s.chunk].iter().map(|&v| Arg::I32(v as i32)).collect()
}

/// One block per (chunk, head, sequence) with `q_floats` x chunk floats of shared memory.
fn ssd_chunk_grid(s: SsdShape, q_floats: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (s.len.div_ceil(s.chunk) as u32, s.heads as u32, s.batch as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: (4 * q_floats * s.chunk) as u32,
    }
}

/// The column reductions' chunks of rows (bias and conv1d weight gradients: a block per
/// chunk and 256 columns, one atomic add per column): 64 rows each, or more where 64 would
/// need more chunks than a grid's y dimension holds (65,535). Returns (rows per chunk, chunks).
fn row_chunks(rows: usize) -> (usize, u32) {
    let per_chunk = rows.div_ceil(65_535).max(64);
    (per_chunk, rows.div_ceil(per_chunk) as u32)
}

/// The (head dim, state size) pairs whose SSD runs on tensor cores in bf16 (the
/// instances of SSD_TC_KERNELS in kernels/ssd.cu).
const SSD_TC_SHAPES: [(usize, usize); 4] = [(32, 32), (64, 64), (64, 128), (128, 128)];

/// The tensor-core SSD kernels' grid: `tiles` blocks per (chunk, head, sequence), 128
/// threads, `q_floats` x chunk floats and then, 16-byte aligned, `bf16s` bf16 of shared memory.
fn ssd_tc_grid(s: SsdShape, tiles: usize, q_floats: usize, bf16s: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((s.len.div_ceil(s.chunk) * tiles) as u32, s.heads as u32, s.batch as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: (4 * (q_floats * s.chunk).next_multiple_of(4) + 2 * bf16s) as u32,
    }
}

/// One thread per state value of a head, over the chunks in turn.
fn ssd_passing_grid(s: SsdShape) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((s.head_dim * s.state).div_ceil(256) as u32, s.heads as u32, s.batch as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rows of a gated norm's `[rows, width]` input, with whole groups per row.
fn gated_rows(what: &str, len: usize, width: usize, group: usize) -> usize {
    assert!(group > 0 && width.is_multiple_of(group), "{what}: width {width} is not whole groups of {group}");
    rows_of(len, width)
}

/// The simple attention kernels' grid (kernels/attention.cu): a block of ROW_THREADS per
/// (query, head, sequence), with shared memory for a tile of ROW_THREADS keys' scores and two
/// rows of the head dimension, however many keys there are.
fn simple_attention_grid(s: AttnShape) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (s.seq as u32, s.n_heads as u32, s.batch as u32),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 4 * (ROW_THREADS + 2 * s.head_dim as u32),
    }
}

/// How cached attention over `keys` keys at most splits them: (parts, keys per part). One
/// part where the queries' blocks (query x head x sequence) fill four per SM; else enough
/// parts for that (decoding: one query per sequence), each of whole 256-key tiles, at most 64.
fn cached_key_parts(shape: AttnShape, keys: usize, sms: usize) -> (usize, usize) {
    let blocks = shape.seq * shape.n_heads * shape.batch;
    let tile = ROW_THREADS as usize;
    let wanted = (4 * sms).div_ceil(blocks).min(keys.div_ceil(tile)).clamp(1, 64);
    let span = keys.div_ceil(wanted).next_multiple_of(tile);
    (keys.div_ceil(span), span)
}

/// The head dims flash attention has instances for (FLASH_KERNELS in
/// kernels/flash_attention.cu): the smoke configs' 32, GPT-2's and Llama-1B's 64, Phi-2's
/// and Pythia-2.8B's 80, GPT-NeoX-20B's 96, Llama-3's 128.
const FLASH_HEAD_DIMS: [usize; 5] = [32, 64, 80, 96, 128];

/// Flash attention's blocks: (rows of the sequence per block, warps), 16 rows a warp; the
/// forward's are query rows (FA_BM in kernels/flash_attention.cu), the backward's keys (FA_BK).
const FLASH_FORWARD: (usize, u32) = (128, 8);
const FLASH_BACKWARD: (usize, u32) = (128, 8);

/// Flash attention's backward's shared memory at head dim `d` with `stages` buffers of the
/// query tiles: K and V (FA_BK = 128 rows) and Q and dO (FA_BQ = 32 rows) of d + 8 bf16, dS^T
/// (128 x 40 bf16), and lse and delta (32 floats each) per stage.
fn flash_backward_shared(d: usize, stages: usize) -> u32 {
    let bf16s = 2 * 128 * (d + 8) + stages * 2 * 32 * (d + 8) + 128 * 40;
    (2 * bf16s + stages * 2 * 32 * 4) as u32
}

/// The device address of attention's `first_keys` (0 for none, which the kernels read as
/// every query's first key being 0).
fn first_keys_ptr(first_keys: Option<&DeviceIds>, shape: AttnShape) -> u64 {
    first_keys.map_or(0, |f| {
        assert_eq!(f.len, shape.rows(), "attention: one first key per row");
        f.ptr
    })
}

/// Flash attention's grid: tiles of `rows` rows of the sequence x `heads` x batch, `warps`
/// warps a block, with `shared` bytes of shared memory.
fn flash_grid(s: AttnShape, heads: usize, (rows, warps): (usize, u32), shared: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (s.seq.div_ceil(rows) as u32, heads as u32, s.batch as u32),
        block_dim: (32 * warps, 1, 1),
        shared_mem_bytes: shared as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::{AttnShape, cached_key_parts, row_chunks, simple_attention_grid};
    use crate::device::launch_limit;

    #[test]
    fn decoding_splits_the_keys_into_whole_tiles_until_the_gpu_is_full() {
        let decode = AttnShape { batch: 1, seq: 1, n_heads: 32, n_kv_heads: 8, head_dim: 128 };
        for keys in [1, 255, 256, 257, 4096, 32_768, 1 << 20] {
            let (parts, span) = cached_key_parts(decode, keys, 132);
            assert!(span.is_multiple_of(256) && parts <= 64, "{keys} keys: {parts} x {span}");
            assert!(parts * span >= keys && (parts - 1) * span < keys, "{keys} keys: {parts} x {span}");
        }
        // 32 heads on 132 SMs want 17 parts; in whole tiles that is 16 of 2048 keys (512 blocks).
        assert_eq!(cached_key_parts(decode, 32_768, 132), (16, 2048));
        // A prefill's queries fill the GPU on their own.
        assert_eq!(cached_key_parts(AttnShape { seq: 512, ..decode }, 512, 132), (1, 512));
        // tests/backend.rs's decoding steps on the emulator's 2 SMs (8 blocks wanted).
        let small = AttnShape { batch: 1, seq: 1, n_heads: 2, n_kv_heads: 1, head_dim: 8 };
        for (shape, keys, parts) in [
            (AttnShape { seq: 2, ..small }, 513, 2),
            (small, 514, 3),
            (AttnShape { batch: 2, ..small }, 514, 2),
            (AttnShape { n_heads: 4, n_kv_heads: 2, ..small }, 514, 2),
        ] {
            assert_eq!(cached_key_parts(shape, keys, 2).0, parts, "{shape:?} over {keys} keys");
        }
    }

    #[test]
    fn simple_attention_needs_the_same_shared_memory_at_any_length() {
        let shape = |seq| AttnShape { batch: 1, seq, n_heads: 32, n_kv_heads: 8, head_dim: 256 };
        let short = simple_attention_grid(shape(1)).shared_mem_bytes;
        assert_eq!(simple_attention_grid(shape(1 << 20)).shared_mem_bytes, short);
        assert!(launch_limit(&simple_attention_grid(shape(1 << 20)), 48 << 10).is_none());
    }

    #[test]
    fn row_chunks_cover_every_row_within_the_grid_limit() {
        for rows in [1, 63, 64, 65, 4_194_240, 4_194_241, 100_000_000] {
            let (per_chunk, chunks) = row_chunks(rows);
            assert!(chunks <= 65_535, "{rows} rows: {chunks} chunks");
            assert!(per_chunk * chunks as usize >= rows && per_chunk * (chunks as usize - 1) < rows, "{rows} rows");
        }
        assert_eq!(row_chunks(1000), (64, 16));
    }
}
