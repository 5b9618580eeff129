//! ondol-cpu: the CPU backend, f32 throughout. It is the reference every other backend is
//! tested against, and fast enough to train small models: GEMMs through the `gemm` crate,
//! everything else in rayon-parallel loops written to vectorise, every reduction in a fixed
//! order so a seed always gives the same bits.

mod activation;
mod adamw;
mod attention;
mod dense;
mod embedding;
mod loss;
pub mod math;
mod norm;
mod reduce;
mod scan;
mod simd;

use ondol_core::AdamWParams;
use ondol_core::backend::{
    Activation, AttnShape, Backend, Gemm, LogitColumns, ScanGrads, ScanInputs, ScanShape, SsdGrads, SsdInputs, SsdShape,
};
use rayon::prelude::*;
use std::ops::Range;

/// A raw pointer into a buffer that parallel tasks share because each writes a disjoint
/// region of it (every use says which). Accessed through `get` so closures capture the
/// wrapper, not the bare pointer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(*mut f32);
// SAFETY: only used where concurrent tasks write disjoint elements.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    pub(crate) fn new(buf: &mut [f32]) -> Self {
        Self(buf.as_mut_ptr())
    }
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// The CPU backend. Threads come from rayon's global pool (`RAYON_NUM_THREADS`).
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        Self
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;
    type Ref<'a> = &'a [f32];
    type Mut<'a> = &'a mut [f32];

    fn name(&self) -> String {
        let threads = rayon::current_num_threads();
        format!("cpu ({threads} thread{})", if threads == 1 { "" } else { "s" })
    }

    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    fn upload(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }
    fn write(&self, buf: &mut Vec<f32>, data: &[f32]) {
        buf.copy_from_slice(data);
    }
    fn download(&self, buf: &Vec<f32>) -> Vec<f32> {
        buf.clone()
    }
    fn download_view(&self, view: &[f32]) -> Vec<f32> {
        view.to_vec()
    }
    fn write_view(&self, view: &mut [f32], data: &[f32]) {
        view.copy_from_slice(data);
    }
    fn upload_ids(&self, ids: &[u32]) -> Vec<u32> {
        ids.to_vec()
    }
    fn write_ids(&self, ids: &mut Vec<u32>, data: &[u32]) {
        ids.copy_from_slice(data);
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn view<'a>(&self, buf: &'a Vec<f32>, range: Range<usize>) -> &'a [f32] {
        &buf[range]
    }
    fn view_mut<'a>(&self, buf: &'a mut Vec<f32>, range: Range<usize>) -> &'a mut [f32] {
        &mut buf[range]
    }
    fn views_mut<'a, const N: usize>(&self, buf: &'a mut Vec<f32>, ranges: [Range<usize>; N]) -> [&'a mut [f32]; N] {
        for (i, a) in ranges.iter().enumerate() {
            assert!(a.start <= a.end && a.end <= buf.len(), "view {a:?} out of bounds");
            for b in &ranges[i + 1..] {
                assert!(a.end <= b.start || b.end <= a.start, "views {a:?} and {b:?} overlap");
            }
        }
        let base = buf.as_mut_ptr();
        // SAFETY: the ranges are in bounds and pairwise disjoint (checked above), and all
        // borrow `buf` mutably for 'a, so nothing else can touch it meanwhile.
        ranges.map(|r| unsafe { std::slice::from_raw_parts_mut(base.add(r.start), r.len()) })
    }
    fn fill(&self, x: &mut [f32], value: f32) {
        x.par_chunks_mut(1 << 16).for_each(|c| c.fill(value));
    }
    fn add_assign(&self, dst: &mut [f32], src: &[f32]) {
        assert_eq!(dst.len(), src.len());
        dst.par_chunks_mut(1 << 14).zip(src.par_chunks(1 << 14)).for_each(|(d, s)| {
            d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
        });
    }
    fn scale(&self, x: &mut [f32], factor: f32) {
        x.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v *= factor));
    }
    fn sum_squares(&self, x: &[f32]) -> f64 {
        reduce::sum_f64(x, |v| (v as f64) * (v as f64))
    }
    fn sum(&self, x: &[f32]) -> f64 {
        reduce::sum_f64(x, |v| v as f64)
    }

    fn gemm(&self, g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        dense::gemm(g, a, b, c, false);
    }
    fn gemm_bias(&self, g: Gemm, a: &[f32], b: &[f32], bias: &[f32], c: &mut [f32]) {
        assert!(g.batch == 1 && g.beta == 0.0, "gemm_bias: one batch, beta 0");
        dense::gemm(g, a, b, c, false);
        self.add_bias(c, bias, g.n);
    }
    fn gemm_activation(
        &self,
        g: Gemm,
        a: &[f32],
        b: &[f32],
        bias: Option<&[f32]>,
        act: Activation,
        pre: &mut [f32],
        out: &mut [f32],
    ) {
        assert!(g.batch == 1 && g.beta == 0.0, "gemm_activation: one batch, beta 0");
        match bias {
            Some(bias) => self.gemm_bias(g, a, b, bias, pre),
            None => self.gemm(g, a, b, pre),
        }
        activation::activation_forward(act, pre, out);
    }
    fn gemm_activation_backward(
        &self,
        g: Gemm,
        a: &[f32],
        b: &[f32],
        act: Activation,
        pre: &[f32],
        dpre: &mut [f32],
        scratch: &mut [f32],
    ) {
        assert!(g.batch == 1 && g.beta == 0.0, "gemm_activation_backward: one batch, beta 0");
        self.gemm(g, a, b, scratch);
        activation::activation_backward(act, scratch, pre, dpre);
    }
    fn add_bias(&self, y: &mut [f32], bias: &[f32], cols: usize) {
        assert_eq!(bias.len(), cols);
        y.par_chunks_mut(cols).for_each(|row| row.iter_mut().zip(bias).for_each(|(y, b)| *y += b));
    }
    fn bias_backward(&self, dy: &[f32], dbias: &mut [f32], cols: usize) {
        assert_eq!(dbias.len(), cols);
        reduce::column_sums(dy.len() / cols, dbias, |rows, part| {
            for row in dy[rows.start * cols..rows.end * cols].chunks_exact(cols) {
                part.iter_mut().zip(row).for_each(|(p, d)| *p += d);
            }
        });
    }

    fn embedding_forward(
        &self,
        ids: &Vec<u32>,
        table: &[f32],
        first_id: usize,
        positions: Option<(&[f32], usize)>,
        out: &mut [f32],
        dim: usize,
    ) {
        embedding::embedding_forward(ids, table, first_id, positions, out, dim);
    }
    fn embedding_backward(&self, ids: &Vec<u32>, dout: &[f32], dtable: &mut [f32], first_id: usize, dim: usize) {
        embedding::embedding_backward(ids, dout, dtable, first_id, dim);
    }
    fn position_embedding_backward(&self, dout: &[f32], dpos: &mut [f32], seq: usize, dim: usize) {
        embedding::position_embedding_backward(dout, dpos, seq, dim);
    }

    fn rmsnorm_forward(&self, x: &[f32], w: &[f32], out: &mut [f32], rstd: &mut [f32], dim: usize, eps: f32) {
        norm::rmsnorm_forward(x, w, out, rstd, dim, eps);
    }
    fn rmsnorm_backward(
        &self,
        dout: &[f32],
        x: &[f32],
        w: &[f32],
        rstd: &[f32],
        dx: &mut [f32],
        dw: &mut [f32],
        dim: usize,
    ) {
        norm::rmsnorm_backward(dout, x, w, rstd, dx, dw, dim);
    }
    fn layernorm_forward(
        &self,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        dim: usize,
        eps: f32,
    ) {
        norm::layernorm_forward(x, w, b, out, mean, rstd, dim, eps);
    }
    fn layernorm_backward(
        &self,
        dout: &[f32],
        x: &[f32],
        w: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dx: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
        dim: usize,
    ) {
        norm::layernorm_backward(dout, x, w, mean, rstd, dx, dw, db, dim);
    }

    fn rope(&self, qkv: &mut [f32], cos_sin: &[f32], shape: AttnShape, inverse: bool, q_scale: f32) {
        attention::rope(qkv, cos_sin, shape, inverse, q_scale);
    }
    fn qk_norm_forward(&self, qkv: &[f32], w: &[f32], out: &mut [f32], rstd: &mut [f32], shape: AttnShape, eps: f32) {
        norm::qk_norm_forward(qkv, w, out, rstd, shape, eps);
    }
    fn qk_norm_backward(
        &self,
        dqkv: &mut [f32],
        qkv: &[f32],
        w: &[f32],
        rstd: &[f32],
        dw: &mut [f32],
        shape: AttnShape,
    ) {
        norm::qk_norm_backward(dqkv, qkv, w, rstd, dw, shape);
    }
    fn attention_forward(
        &self,
        qkv: &[f32],
        out: &mut [f32],
        lse: &mut [f32],
        shape: AttnShape,
        first_keys: Option<&Vec<u32>>,
    ) {
        attention::attention_forward(qkv, out, lse, shape, first_keys.map(Vec::as_slice));
    }
    fn attention_backward(
        &self,
        dout: &[f32],
        qkv: &[f32],
        out: &[f32],
        lse: &[f32],
        dqkv: &mut [f32],
        shape: AttnShape,
        first_keys: Option<&Vec<u32>>,
    ) {
        attention::attention_backward(dout, qkv, out, lse, dqkv, shape, first_keys.map(Vec::as_slice));
    }

    fn attention_cached(
        &self,
        qkv: &[f32],
        k_cache: &mut [f32],
        v_cache: &mut [f32],
        out: &mut [f32],
        shape: AttnShape,
        pos: usize,
        max_seq: usize,
        window: Option<usize>,
    ) {
        attention::attention_cached(qkv, k_cache, v_cache, out, shape, pos, max_seq, window);
    }

    fn conv1d_forward(&self, x: &[f32], w: &[f32], bias: &[f32], y: &mut [f32], len: usize, channels: usize) {
        scan::conv1d_forward(x, w, bias, y, len, channels);
    }
    fn conv1d_backward(
        &self,
        dy: &[f32],
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        dx: &mut [f32],
        dw: &mut [f32],
        dbias: &mut [f32],
        len: usize,
        channels: usize,
    ) {
        scan::conv1d_backward(dy, x, w, bias, dx, dw, dbias, len, channels);
    }
    fn conv1d_recurrent(
        &self,
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        state: &mut [f32],
        y: &mut [f32],
        len: usize,
        channels: usize,
    ) {
        scan::conv1d_recurrent(x, w, bias, state, y, len, channels);
    }
    fn selective_scan_recurrent(&self, x: ScanInputs<&[f32]>, y: &mut [f32], state: &mut [f32], shape: ScanShape) {
        scan::selective_scan_recurrent(x, y, state, shape);
    }
    fn ssd_recurrent(&self, x: SsdInputs<&[f32]>, y: &mut [f32], state: &mut [f32], shape: SsdShape) {
        scan::ssd_recurrent(x, y, state, shape);
    }
    fn selective_scan_forward(&self, x: ScanInputs<&[f32]>, y: &mut [f32], states: &mut [f32], shape: ScanShape) {
        scan::selective_scan_forward(x, y, states, shape);
    }
    fn selective_scan_backward(
        &self,
        dy: &[f32],
        x: ScanInputs<&[f32]>,
        states: &[f32],
        grads: ScanGrads<&mut [f32]>,
        shape: ScanShape,
    ) {
        scan::selective_scan_backward(dy, x, states, grads, shape);
    }
    fn ssd_forward(&self, x: SsdInputs<&[f32]>, y: &mut [f32], states: &mut [f32], shape: SsdShape) {
        scan::ssd_forward(x, y, states, shape);
    }
    fn ssd_backward(
        &self,
        dy: &[f32],
        x: SsdInputs<&[f32]>,
        states: &[f32],
        grads: SsdGrads<&mut [f32]>,
        shape: SsdShape,
    ) {
        scan::ssd_backward(dy, x, states, grads, shape);
    }
    fn gated_rmsnorm_forward(
        &self,
        x: &[f32],
        z: &[f32],
        weight: &[f32],
        out: &mut [f32],
        rstd: &mut [f32],
        group: usize,
        eps: f32,
    ) {
        norm::gated_rmsnorm_forward(x, z, weight, out, rstd, group, eps);
    }
    fn gated_rmsnorm_backward(
        &self,
        dout: &[f32],
        x: &[f32],
        z: &[f32],
        weight: &[f32],
        rstd: &[f32],
        dx: &mut [f32],
        dz: &mut [f32],
        dweight: &mut [f32],
        group: usize,
    ) {
        norm::gated_rmsnorm_backward(dout, x, z, weight, rstd, dx, dz, dweight, group);
    }

    fn glu_forward(&self, act: Activation, gate_up: &[f32], out: &mut [f32], width: usize) {
        activation::glu_forward(act, gate_up, out, width);
    }
    fn glu_backward(&self, act: Activation, dout: &[f32], gate_up: &[f32], dgate_up: &mut [f32], width: usize) {
        activation::glu_backward(act, dout, gate_up, dgate_up, width);
    }
    fn activation_forward(&self, act: Activation, x: &[f32], out: &mut [f32]) {
        activation::activation_forward(act, x, out);
    }
    fn activation_backward(&self, act: Activation, dout: &[f32], x: &[f32], dx: &mut [f32]) {
        activation::activation_backward(act, dout, x, dx);
    }

    fn cross_entropy(
        &self,
        logits: &mut [f32],
        targets: &Vec<u32>,
        first_row: usize,
        losses: &mut [f32],
        columns: LogitColumns,
        grad_scale: Option<f32>,
    ) {
        loss::cross_entropy(logits, &targets[first_row..][..losses.len()], losses, columns, grad_scale);
    }
    fn cross_entropy_stats(
        &self,
        logits: &[f32],
        targets: &Vec<u32>,
        first_row: usize,
        stats: &mut [f32],
        first_id: usize,
        columns: LogitColumns,
    ) {
        let targets = &targets[first_row..][..stats.len() / 3];
        loss::cross_entropy_stats(logits, targets, stats, first_id, columns);
    }
    fn cross_entropy_grad(
        &self,
        logits: &mut [f32],
        targets: &Vec<u32>,
        first_row: usize,
        lse: &[f32],
        first_id: usize,
        columns: LogitColumns,
        grad_scale: f32,
    ) {
        loss::cross_entropy_grad(logits, &targets[first_row..][..lse.len()], lse, first_id, columns, grad_scale);
    }

    fn adamw(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamWParams, copy: Option<&mut [f32]>) {
        adamw::adamw(p, g, m, v, hp);
        if let Some(copy) = copy {
            copy.copy_from_slice(p);
        }
    }
}

/// The machine's f32 GEMM throughput in FLOP/s: the best of repeated 1024^3 products on every
/// rayon thread, for at least 0.3 s. The denominator of CPU MFU (DESIGN.md section 7). The
/// first products run slow (clock ramp-up, first touch of the pages, waking the thread pool):
/// on the development machine the best of four read 95 GFLOP/s where the best of twenty reads
/// 165, and the smoke run then showed an MFU above 100 %.
pub fn measure_gemm_peak() -> f64 {
    let n = 1024;
    let a = vec![1.0f32; n * n];
    let mut c = vec![0.0f32; n * n];
    let g = Gemm::new(n, n, n, false, false);
    let (start, mut best, mut reps) = (std::time::Instant::now(), f64::INFINITY, 0);
    while reps < 5 || start.elapsed().as_secs_f64() < 0.3 {
        let t = std::time::Instant::now();
        dense::gemm(g, &a, &a, &mut c, false);
        best = best.min(t.elapsed().as_secs_f64());
        reps += 1;
    }
    g.flops() as f64 / best
}
