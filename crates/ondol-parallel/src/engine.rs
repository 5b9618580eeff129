//! [`Engine`]: everything one rank of a (dp, pp, tp) layout does in an optimizer step.

use crate::schedule::{self, Action, ScheduleKind};
use ondol_comm::{Communicator, Coords, Mesh, RankComms};
use ondol_core::backend::document_starts;
use ondol_core::{Backend, DeviceSlice, Error, Result};
use ondol_model::{MicroBatch, Model, ModelConfig, Part, Scratch, TensorParallel, Workspace, scratch_elems};
use ondol_optim::{AdamW, OptimizerConfig};
use std::ops::Range;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

/// Training pads every shard's output head to a multiple of this many vocabulary rows (see
/// [`Part::vocab_align`]): 16-byte-aligned bf16 rows for every head GEMM, GPT-2's 50257 rows
/// becoming 50304. Checkpoints hold the unpadded tensors.
pub const HEAD_ROW_ALIGN: usize = 64;

/// How the run is laid out over ranks and micro-batches.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub mesh: Mesh,
    pub schedule: ScheduleKind,
    /// Model chunks per pipeline rank: more than 1 only for the interleaved schedule.
    pub chunks: usize,
    /// Layers of each virtual stage, in order (`pp x chunks` entries); empty: an even split.
    pub stage_layers: Vec<usize>,
    /// Micro-batches per optimizer step, of `batch` sequences of `seq` tokens each.
    pub micro: usize,
    pub batch: usize,
    pub seq: usize,
    /// Activation checkpointing: recompute every k-th layer (0: off).
    pub recompute: usize,
    /// Rows of logits the loss makes at a time (0: the default of [`Model::loss_chunk`]).
    pub loss_chunk: usize,
    /// ZeRO-1: shard the AdamW state over the data-parallel replicas.
    pub zero: bool,
    /// Megatron's sequence parallelism within each tp group (see [`Part::sequence_parallel`]).
    pub sequence_parallel: bool,
    /// Data-parallel gradient buckets of this many floats, summed during the last backward
    /// of each chunk while backward goes on (None: all at once after the schedule): on the
    /// device, or on a worker thread by communicators that can lend a second handle.
    /// All-reduced, or under ZeRO-1 each piece reduced into the replica whose shard holds it.
    pub grad_buckets: Option<usize>,
    /// Documents packed into a sequence attend only within their own, each starting at this
    /// end-of-text token (see [`document_starts`]); None: every token attends to its whole
    /// sequence before it.
    pub document_mask: Option<u32>,
}

impl Layout {
    /// The shape of each micro-batch's work.
    pub fn micro_batch(&self) -> MicroBatch {
        MicroBatch { batch: self.batch, seq: self.seq, recompute_every: self.recompute, loss_chunk: self.loss_chunk }
    }

    /// The layer range of every virtual stage.
    fn stage_ranges(&self, n_layers: usize) -> Result<Vec<Range<usize>>> {
        let stages = self.mesh.pp * self.chunks;
        let sizes = if self.stage_layers.is_empty() {
            if stages > n_layers {
                return Err(Error::config(
                    "parallelism.pp",
                    format!(
                        "{} pipeline stages x {} chunks = {stages} stages for {n_layers} layers: every stage needs a layer",
                        self.mesh.pp, self.chunks
                    ),
                ));
            }
            // As even as it goes; the first stages (which also embed) take one layer fewer
            // than the last ones when it does not divide.
            (0..stages).map(|i| n_layers / stages + usize::from(i >= stages - n_layers % stages)).collect()
        } else {
            self.stage_layers.clone()
        };
        if sizes.len() != stages || sizes.contains(&0) || sizes.iter().sum::<usize>() != n_layers {
            return Err(Error::config(
                "parallelism.stage_layers",
                format!(
                    "{sizes:?}: give {stages} positive layer counts (pp x virtual_stages) that sum to model.n_layers = {n_layers}"
                ),
            ));
        }
        let mut start = 0;
        Ok(sizes
            .iter()
            .map(|n| {
                start += n;
                start - n..start
            })
            .collect())
    }

    /// The model parts of the rank at `c`: its chunks in order, their heads padded to
    /// [`HEAD_ROW_ALIGN`].
    pub fn parts(&self, cfg: &ModelConfig, c: Coords) -> Result<Vec<Part>> {
        let ranges = self.stage_ranges(cfg.n_layers)?;
        Ok((0..self.chunks)
            .map(|k| {
                Part::new(cfg, c.tp, self.mesh.tp, ranges[k * self.mesh.pp + c.pp].clone())
                    .with_sequence_parallel(self.sequence_parallel)
                    .with_vocab_align(HEAD_ROW_ALIGN)
            })
            .collect())
    }

    /// Refuses layouts that cannot run, naming the key to change.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        schedule::check(self.schedule, self.mesh.pp, self.chunks, self.micro)?;
        let (tp, tokens) = (self.mesh.tp, self.batch * self.seq);
        if self.sequence_parallel && !tokens.is_multiple_of(tp) {
            return Err(Error::config(
                "parallelism.sequence_parallel",
                format!(
                    "tp = {tp} must divide the tokens of a micro-batch ({} sequences x {} = {tokens}); \
                     change the batch, grad_accum or seq_len, or turn sequence parallelism off",
                    self.batch, self.seq
                ),
            ));
        }
        for rank in 0..self.mesh.world() {
            for part in self.parts(cfg, self.mesh.coords(rank)?)? {
                part.check(cfg)?;
            }
        }
        Ok(())
    }
}

/// What one step produced on this rank.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// The sum of every token's loss over the whole global batch (the same on every rank).
    pub loss_sum: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Seconds this rank spent waiting for activations or gradients from its pipeline
    /// neighbours (the measured bubble, plus transfer time).
    pub pipeline_wait_s: f64,
    /// The largest stop code a rank gave (0: none asked to stop after this step).
    pub stop: u8,
}

/// What [`Engine::evaluate`] returns to every rank.
#[derive(Clone, Copy, Debug)]
pub struct Evaluation {
    /// The loss summed over every token of the batches.
    pub loss_sum: f64,
    /// The largest stop code a rank gave during the evaluation (0: none).
    pub stop: u8,
}

/// ZeRO-1's partition of a flat buffer: padded to `len * world` elements, replica r holds the
/// AdamW state of `[start, start + len)` with `start = r * len` (the chunk's parameter and
/// gradient buffers are padded so too).
#[derive(Clone, Copy, Debug)]
struct ZeroShard {
    start: usize,
    len: usize,
    padded: usize,
}

impl ZeroShard {
    fn new(n: usize, rank: usize, world: usize) -> Self {
        let len = n.div_ceil(world);
        Self { start: rank * len, len, padded: len * world }
    }

    /// The buffer's decay runs clipped to this shard, shifted to start at 0; the padding past
    /// the last parameter gets no decay.
    fn decay_runs(&self, runs: &[(Range<usize>, bool)]) -> Vec<(Range<usize>, bool)> {
        let mut out: Vec<_> = clip(runs.iter().cloned(), self.start..self.start + self.len)
            .map(|(r, d)| (r.start - self.start..r.end - self.start, d))
            .collect();
        let covered = out.last().map_or(0, |(r, _)| r.end);
        if covered < self.len {
            out.push((covered..self.len, false));
        }
        out
    }

    /// The pieces of `range` (of the padded buffer) by the replica whose shard holds them.
    fn owners(&self, range: Range<usize>) -> impl Iterator<Item = (usize, Range<usize>)> {
        let len = self.len;
        (range.start / len..range.end.div_ceil(len))
            .map(move |r| (r, range.start.max(r * len)..range.end.min((r + 1) * len)))
    }

    /// This shard of a whole-buffer tensor, zero-padded.
    fn slice(&self, full: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0f32; self.len];
        let end = (self.start + self.len).min(full.len());
        if self.start < end {
            out[..end - self.start].copy_from_slice(&full[self.start..end]);
        }
        out
    }
}

/// The parts of `(range, tag)` items that fall inside `window`.
fn clip<T>(
    items: impl Iterator<Item = (Range<usize>, T)>,
    window: Range<usize>,
) -> impl Iterator<Item = (Range<usize>, T)> {
    items.filter_map(move |(r, t)| {
        let (a, b) = (r.start.max(window.start), r.end.min(window.end));
        (a < b).then_some((a..b, t))
    })
}

/// One of the rank's model chunks with its parameters, gradients, optimizer state and the
/// workspaces of its micro-batches in flight.
struct Chunk<B: Backend> {
    model: Model,
    params: B::Buf,
    grads: B::Buf,
    opt: AdamW<B>,
    zero: Option<ZeroShard>,
    /// Flat ranges of the tensors whose gradients count in the global norm on this rank.
    primary: Vec<Range<usize>>,
    /// Workspaces; `busy[i]` names the micro-batch using workspace i.
    pool: Vec<Workspace<B>>,
    busy: Vec<Option<usize>>,
    /// The virtual stage this chunk is (`chunk * pp + pp rank`).
    stage: usize,
}

impl<B: Backend> Chunk<B> {
    /// The workspace of micro-batch `micro`, taking a free one (or a new one) if it has none.
    fn workspace(&mut self, be: &B, micro: usize, layout: &Layout) -> Result<usize> {
        if let Some(i) = self.busy.iter().position(|b| *b == Some(micro)) {
            return Ok(i);
        }
        let i = match self.busy.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                let (l, model) = (layout, &self.model);
                self.pool.push(Workspace::without_scratch(be, model, l.micro_batch())?);
                self.busy.push(None);
                self.pool.len() - 1
            }
        };
        self.busy[i] = Some(micro);
        Ok(i)
    }

    /// Frees the workspace of micro-batch `micro`.
    fn release(&mut self, micro: usize) {
        self.busy.iter_mut().filter(|b| **b == Some(micro)).for_each(|b| *b = None);
    }
}

/// `view` in device memory, if `comm` can work there (NCCL on a GPU backend, or a host
/// communicator on the emulated one); else the collective goes through host copies.
fn on_device<B: Backend>(be: &B, comm: &dyn Communicator, view: B::Ref<'_>) -> Option<DeviceSlice> {
    be.device_slice(view).filter(|s| comm.takes(s))
}

/// `ranges` of `buf` become their sums over `comm`: on the device where it can (a call per
/// range), else through the host in one call.
fn all_reduce_ranges<B: Backend>(
    be: &B,
    comm: &dyn Communicator,
    buf: &mut B::Buf,
    ranges: &[Range<usize>],
) -> Result<()> {
    if ranges.iter().all(|r| on_device(be, comm, be.view(buf, r.clone())).is_some()) {
        for r in ranges {
            let slice = on_device(be, comm, be.view(buf, r.clone())).expect("checked above");
            comm.all_reduce_device(slice)?;
        }
        return Ok(());
    }
    let mut host: Vec<f32> = ranges.iter().flat_map(|r| be.download_view(be.view(buf, r.clone()))).collect();
    comm.all_reduce_sum(&mut host)?;
    let mut at = 0;
    for r in ranges {
        be.write_view(be.view_mut(buf, r.clone()), &host[at..at + r.len()]);
        at += r.len();
    }
    Ok(())
}

/// `buf` becomes its sum over `comm`: on the device where it can, else through the host.
fn all_reduce_buf<B: Backend>(be: &B, comm: &dyn Communicator, buf: &mut B::Buf) -> Result<()> {
    if let Some(d) = on_device(be, comm, be.all(buf)) {
        return Ok(comm.all_reduce_device(d)?);
    }
    let mut host = be.download(buf);
    comm.all_reduce_sum(&mut host)?;
    be.write(buf, &host);
    Ok(())
}

/// ZeRO-1: `window` (this rank's shard) of `buf` (padded to whole shards) becomes its sum over
/// `comm`, a reduce-scatter in place; on the device where it can.
fn reduce_scatter_buf<B: Backend>(
    be: &B,
    comm: &dyn Communicator,
    buf: &mut B::Buf,
    window: Range<usize>,
) -> Result<()> {
    if let (Some(whole), Some(mine)) =
        (on_device(be, comm, be.all(buf)), on_device(be, comm, be.view(buf, window.clone())))
    {
        return Ok(comm.reduce_scatter_device(whole, mine)?);
    }
    let mut mine = vec![0.0f32; window.len()];
    comm.reduce_scatter_sum(&be.download(buf), &mut mine)?;
    be.write_view(be.view_mut(buf, window), &mine);
    Ok(())
}

/// ZeRO-1: each piece of `ranges` of `buf` becomes its sum over `comm` on the replica whose
/// shard holds it (a reduce per piece): on the device where it can, queued together and
/// waited for once; else through the host.
fn reduce_to_owners<B: Backend>(
    be: &B,
    comm: &dyn Communicator,
    buf: &mut B::Buf,
    ranges: &[Range<usize>],
    shard: &ZeroShard,
) -> Result<()> {
    for (owner, piece) in ranges.iter().flat_map(|r| shard.owners(r.clone())) {
        match on_device(be, comm, be.view(buf, piece.clone())) {
            Some(slice) => comm.queue_reduce_device(slice, owner)?,
            None => {
                let mut host = be.download_view(be.view(buf, piece.clone()));
                comm.reduce_sum(&mut host, owner)?;
                if owner == comm.rank() {
                    be.write_view(be.view_mut(buf, piece), &host);
                }
            }
        }
    }
    Ok(comm.wait_queued()?)
}

/// ZeRO-1: `buf` (padded to whole shards) becomes every rank's `window` in rank order, an
/// all-gather in place; on the device where it can.
fn all_gather_buf<B: Backend>(be: &B, comm: &dyn Communicator, buf: &mut B::Buf, window: Range<usize>) -> Result<()> {
    if let (Some(mine), Some(whole)) =
        (on_device(be, comm, be.view(buf, window.clone())), on_device(be, comm, be.all(buf)))
    {
        return Ok(comm.all_gather_device(mine, whole)?);
    }
    let mut whole = vec![0.0f32; be.len(buf)];
    comm.all_gather(&be.download_view(be.view(buf, window)), &mut whole)?;
    be.write(buf, &whole);
    Ok(())
}

/// A communicator as the model's tensor-parallel hook: collectives on the device with NCCL,
/// through host copies otherwise; and, in the last backward of a chunk, where finished
/// gradients go to the data-parallel buckets.
struct TpHook<'a> {
    comm: &'a dyn Communicator,
    buckets: Option<BucketSink<'a>>,
}

/// Where the last backward of chunk `chunk` hands finished gradients: the buckets, summed
/// over `dp`.
struct BucketSink<'a> {
    buckets: &'a mut Buckets,
    chunk: usize,
    dp: &'a dyn Communicator,
}

impl<'a> TpHook<'a> {
    fn new(comm: &'a dyn Communicator) -> Self {
        Self { comm, buckets: None }
    }
}

impl<B: Backend> TensorParallel<B> for TpHook<'_> {
    fn all_reduce(&mut self, be: &B, buf: &mut B::Buf) -> Result<()> {
        all_reduce_buf(be, self.comm, buf)
    }
    fn all_gather(&mut self, part: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0.0; part.len() * self.comm.size()];
        self.comm.all_gather(part, &mut out)?;
        Ok(out)
    }
    fn all_gather_rows(&mut self, be: &B, part: &B::Buf, whole: &mut B::Buf) -> Result<()> {
        if let (Some(i), Some(o)) = (on_device(be, self.comm, be.all(part)), on_device(be, self.comm, be.all(whole))) {
            return Ok(self.comm.all_gather_device(i, o)?);
        }
        let gathered = TensorParallel::<B>::all_gather(self, &be.download(part))?;
        be.write(whole, &gathered);
        Ok(())
    }
    fn reduce_scatter_rows(&mut self, be: &B, whole: &B::Buf, part: &mut B::Buf) -> Result<()> {
        if let (Some(i), Some(o)) = (on_device(be, self.comm, be.all(whole)), on_device(be, self.comm, be.all(part))) {
            return Ok(self.comm.reduce_scatter_device(i, o)?);
        }
        let mut mine = vec![0.0; be.len(part)];
        self.comm.reduce_scatter_sum(&be.download(whole), &mut mine)?;
        be.write(part, &mine);
        Ok(())
    }
    fn grads_ready(&mut self, be: &B, grads: &B::Buf, range: Range<usize>) -> Result<()> {
        match &mut self.buckets {
            Some(sink) => sink.buckets.ready(be, sink.dp, sink.chunk, grads, range),
            None => Ok(()),
        }
    }
}

/// A bucket reduced over dp through the host: its chunk, its range of the chunk's
/// gradients, the sums.
type Reduced = (usize, Range<usize>, Vec<f32>);

/// A bucket for the worker: its chunk, its range, the replica to reduce it into (ZeRO-1;
/// None: all of them), its values.
type Outgoing = (usize, Range<usize>, Option<usize>, Vec<f32>);

/// What the bucket worker hands back: the communicator handle, and every bucket's sums.
type Finished = (Box<dyn Communicator>, std::result::Result<Vec<Reduced>, ondol_comm::CommError>);

/// How this rank sums gradient buckets over dp during backward ([`Layout::grad_buckets`]).
enum Bucketing {
    Off,
    /// On the device: queued on the dp communicator beside the backward kernels (NCCL's side
    /// stream; a host communicator on the emulated device's memory sums at once).
    Device,
    /// Through the host, by a worker thread with this second handle of the dp communicator
    /// (lent to the worker during each step).
    Worker(Option<Box<dyn Communicator>>),
}

/// The worker of [`Bucketing::Worker`]: sums the buckets it is sent, in order.
struct Worker {
    tx: Option<mpsc::Sender<Outgoing>>,
    thread: Option<JoinHandle<Finished>>,
}

impl Worker {
    fn start(comm: Box<dyn Communicator>) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Outgoing>();
        let thread = std::thread::Builder::new()
            .name("ondol-dp-buckets".into())
            .spawn(move || {
                let mut done = Vec::new();
                for (chunk, range, owner, mut data) in rx {
                    let summed = match owner {
                        None => comm.all_reduce_sum(&mut data),
                        Some(root) => comm.reduce_sum(&mut data, root),
                    };
                    if let Err(e) = summed {
                        return (comm, Err(e));
                    }
                    // A piece another replica owns has nothing to write back.
                    if owner.is_none_or(|root| root == comm.rank()) {
                        done.push((chunk, range, data));
                    }
                }
                (comm, Ok(done))
            })
            .map_err(|e| Error::Training(format!("cannot start the gradient-bucket thread: {e}")))?;
        Ok(Self { tx: Some(tx), thread: Some(thread) })
    }

    /// Waits for the worker: the communicator handle back, and every bucket's sums.
    fn finish(mut self) -> Finished {
        self.tx = None;
        self.thread.take().expect("finished once").join().expect("the gradient-bucket thread does not panic")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // An error in the schedule drops the buckets unfinished: stop the worker with them.
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Data-parallel gradient buckets summed while backward goes on: on the device, or through
/// the host by a [`Worker`] (None). Backward reports finished ranges in descending order;
/// adjacent ones gather into a bucket until it holds `size` floats. Tensors whose gradients
/// are first summed over tp or pp (a tied embedding's two copies, shared kv heads) stay out
/// and are reduced after the schedule, so every element's dp sum adds the same values as
/// without buckets: bit for bit on the thread and TCP communicators, which add in rank
/// order; NCCL picks its order by message size, so there the replicas agree with each other
/// but not to the last bit with a run without buckets. Under ZeRO-1 a bucket is reduced
/// piece by piece into the replicas whose shards hold the pieces, which is what the
/// reduce-scatter after the schedule does.
struct Buckets {
    size: usize,
    worker: Option<Worker>,
    /// Per chunk: its ZeRO-1 shards, the bucket being gathered, the ranges that stay out, the
    /// ranges handed off.
    shards: Vec<Option<ZeroShard>>,
    open: Vec<Option<Range<usize>>>,
    excluded: Vec<Vec<Range<usize>>>,
    covered: Vec<Vec<Range<usize>>>,
}

impl Buckets {
    fn new(
        size: usize,
        worker: Option<Worker>,
        shards: Vec<Option<ZeroShard>>,
        excluded: Vec<Vec<Range<usize>>>,
    ) -> Self {
        let chunks = excluded.len();
        Self { size, worker, shards, open: vec![None; chunks], excluded, covered: vec![Vec::new(); chunks] }
    }

    fn ready<B: Backend>(
        &mut self,
        be: &B,
        dp: &dyn Communicator,
        chunk: usize,
        grads: &B::Buf,
        range: Range<usize>,
    ) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        if self.excluded[chunk].iter().any(|x| x.start < range.end && range.start < x.end) {
            return self.flush(be, dp, chunk, grads);
        }
        match &mut self.open[chunk] {
            Some(open) if range.end == open.start => open.start = range.start,
            _ => {
                self.flush(be, dp, chunk, grads)?;
                self.open[chunk] = Some(range);
            }
        }
        if self.open[chunk].as_ref().is_some_and(|r| r.len() >= self.size) {
            self.flush(be, dp, chunk, grads)?;
        }
        Ok(())
    }

    /// Hands the chunk's gathered bucket to the device or to the worker.
    fn flush<B: Backend>(&mut self, be: &B, dp: &dyn Communicator, chunk: usize, grads: &B::Buf) -> Result<()> {
        let Some(range) = self.open[chunk].take() else { return Ok(()) };
        self.covered[chunk].push(range.clone());
        let pieces: Vec<(Option<usize>, Range<usize>)> = match &self.shards[chunk] {
            None => vec![(None, range)],
            Some(shard) => shard.owners(range).map(|(owner, piece)| (Some(owner), piece)).collect(),
        };
        for (owner, piece) in pieces {
            let view = be.view(grads, piece.clone());
            match &self.worker {
                None => {
                    let slice = on_device(be, dp, view).expect("device buckets only where dp takes the gradients");
                    match owner {
                        None => dp.queue_all_reduce_device(slice)?,
                        Some(root) => dp.queue_reduce_device(slice, root)?,
                    }
                }
                Some(worker) => {
                    let tx = worker.tx.as_ref().expect("buckets are open until finish");
                    // A send fails only if the worker stopped on an error, which finish reports.
                    let _ = tx.send((chunk, piece, owner, be.download_view(view)));
                }
            }
        }
        Ok(())
    }
}

/// The parts of `0..n` outside `covered` (sorted or not), in order.
fn complement(n: usize, covered: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut sorted: Vec<Range<usize>> = covered.to_vec();
    sorted.sort_by_key(|r| r.start);
    let (mut out, mut at) = (Vec::new(), 0);
    for r in sorted {
        if r.start > at {
            out.push(at..r.start);
        }
        at = at.max(r.end);
    }
    if at < n {
        out.push(at..n);
    }
    out
}

/// One rank of a parallel run.
pub struct Engine<B: Backend> {
    pub be: B,
    pub comms: RankComms<Box<dyn Communicator>>,
    pub layout: Layout,
    /// The whole model: global names and shapes, for checkpoints and FLOP counts.
    pub whole: Model,
    chunks: Vec<Chunk<B>>,
    plan: Vec<Action>,
    /// Device copies of each micro-batch's inputs and targets.
    ids: Vec<(B::Ids, B::Ids)>,
    /// Under [`Layout::document_mask`], each micro-batch's first key of every token's
    /// attention, set in its workspace by its forward.
    first_keys: Vec<Vec<u32>>,
    bucketing: Bucketing,
    /// Per chunk, the micro-batch of its last backward in the plan (its gradients are final
    /// after it).
    last_backward: Vec<usize>,
}

impl<B: Backend> Engine<B> {
    /// This rank's chunks, initialised from `seed` (the same model in every layout).
    pub fn new(
        be: B,
        cfg: ModelConfig,
        layout: Layout,
        optimizer: OptimizerConfig,
        comms: RankComms<Box<dyn Communicator>>,
        seed: u64,
    ) -> Result<Self> {
        layout.check(&cfg)?;
        let whole = Model::new(cfg.clone())?;
        let c = comms.coords;
        let mut chunks = Vec::new();
        for (k, part) in layout.parts(&cfg, c)?.into_iter().enumerate() {
            let model = Model::part(cfg.clone(), part)?;
            let n = model.num_params();
            let zero = layout.zero.then(|| ZeroShard::new(n, c.dp, layout.mesh.dp));
            let runs = model.layout.decay_runs();
            let init = model.layout.init(seed);
            let opt = match &zero {
                None => AdamW::new(&be, optimizer.clone(), &init, runs),
                Some(z) => AdamW::new(&be, optimizer.clone(), &z.slice(&init), z.decay_runs(&runs)),
            };
            let primary = merged(model.layout.params().iter().filter(|p| p.place.primary).map(|p| p.range()));
            // Under ZeRO-1 the flat buffers are padded to whole shards, so that the shards are
            // reduce-scattered and all-gathered in place.
            let padded = zero.map_or(n, |z| z.padded);
            let mut padded_init = init;
            padded_init.resize(padded, 0.0);
            chunks.push(Chunk {
                params: be.upload(&padded_init),
                grads: be.zeros_f32(padded),
                model,
                opt,
                zero,
                primary,
                pool: Vec::new(),
                busy: Vec::new(),
                stage: k * layout.mesh.pp + c.pp,
            });
        }
        let plan = schedule::actions(layout.schedule, c.pp, layout.mesh.pp, layout.chunks, layout.micro);
        let mut last_backward = vec![0; chunks.len()];
        for action in &plan {
            if let Action::Backward { chunk, micro } = *action {
                last_backward[chunk] = micro;
            }
        }
        let rows = layout.batch * layout.seq;
        let ids = (0..layout.micro).map(|_| (be.upload_ids(&vec![0; rows]), be.upload_ids(&vec![0; rows]))).collect();
        let dp = comms.dp.as_ref();
        let bucketing = match layout.grad_buckets {
            Some(_) if dp.size() > 1 => {
                if chunks.iter().all(|c| on_device(&be, dp, be.all(&c.grads)).is_some()) {
                    Bucketing::Device
                } else {
                    dp.duplicate().map_or(Bucketing::Off, |comm| Bucketing::Worker(Some(comm)))
                }
            }
            _ => Bucketing::Off,
        };
        Ok(Self { be, comms, layout, whole, chunks, plan, ids, first_keys: Vec::new(), bucketing, last_backward })
    }

    /// Where this rank sums gradient buckets during backward: "the device" (the dp
    /// communicator's side stream), "a host thread", or None when it does not.
    pub fn bucket_path(&self) -> Option<&'static str> {
        match self.bucketing {
            Bucketing::Off => None,
            Bucketing::Device => Some("the device"),
            Bucketing::Worker(_) => Some("a host thread"),
        }
    }

    fn stages(&self) -> usize {
        self.layout.mesh.pp * self.layout.chunks
    }

    /// Whether this rank reports its replica's loss: the first tp shard of the last stage (its
    /// tp peers compute the same number).
    fn reports_loss(&self) -> bool {
        let c = self.comms.coords;
        c.tp == 0 && c.pp == self.layout.mesh.pp - 1
    }

    /// Bytes this rank holds: parameters (in the compute type, and fp32 master weights where
    /// the optimizer keeps them), gradients, AdamW moments, and activations: those of the
    /// micro-batches its schedule keeps in flight and the one scratch they share.
    pub fn memory_bytes(&self) -> u64 {
        let l = &self.layout;
        let width = self.be.compute_bytes();
        let in_flight = schedule::in_flight(l.schedule, self.comms.coords.pp, l.mesh.pp, l.chunks, l.micro);
        let chunks: u64 = self
            .chunks
            .iter()
            .zip(in_flight)
            .map(|(c, in_flight)| {
                // The flat buffers' length (padded to whole shards under ZeRO-1).
                let n = self.be.len(&c.grads) as u64;
                let opt = self.be.len(&c.opt.m) as u64;
                let master = c.opt.master.as_ref().map_or(0, |m| self.be.len(m) as u64);
                let acts = c.model.activation_elems(l.micro_batch()).times(in_flight as u64).bytes(width);
                width as u64 * n + 4 * (n + 2 * opt + master) + acts
            })
            .sum();
        let models: Vec<&Model> = self.chunks.iter().map(|c| &c.model).collect();
        chunks + scratch_elems(&models, l.micro_batch()).bytes(width)
    }

    /// Under [`Layout::document_mask`], the first key of every token's attention in each
    /// micro-batch of the last step or evaluation (empty without it).
    pub fn document_first_keys(&self) -> &[Vec<u32>] {
        &self.first_keys
    }

    /// Parameters this rank holds (its pieces of every chunk).
    pub fn params_held(&self) -> usize {
        self.chunks.iter().map(|c| c.model.num_params()).sum()
    }

    /// Elements (f32) of the AdamW moments this rank holds, falling as 1 / dp under ZeRO-1;
    /// mixed precision's master weights come on top, as many as one moment.
    pub fn moment_elems(&self) -> usize {
        self.chunks.iter().map(|c| 2 * self.be.len(&c.opt.m)).sum()
    }

    /// One optimizer update over `batches`, this replica's micro-batches (inputs, targets);
    /// each learned target's loss enters with weight `grad_scale` (1 / learned targets in the
    /// global batch: every target, unless loss masks leave some out).
    /// `stop_request` is read at the step's end, just before its last collective: a code
    /// above 0 asks to stop after the step; the outcome's `stop` is the largest code any rank
    /// gave, the same on every rank.
    pub fn step(
        &mut self,
        batches: &[(Vec<u32>, Vec<u32>)],
        grad_scale: f32,
        lr: f32,
        stop_request: impl FnOnce() -> u8,
    ) -> Result<StepOutcome> {
        self.upload(batches);
        for c in &mut self.chunks {
            self.be.fill(self.be.all_mut(&mut c.grads), 0.0);
        }
        let size = self.layout.grad_buckets.unwrap_or(0);
        let mut buckets = match &mut self.bucketing {
            Bucketing::Off => None,
            Bucketing::Device => Some(Buckets::new(size, None, self.shards(), self.excluded_from_buckets())),
            // The handle is back after every step, unless its worker thread could not start.
            Bucketing::Worker(comm) => match comm.take() {
                Some(comm) => {
                    Some(Buckets::new(size, Some(Worker::start(comm)?), self.shards(), self.excluded_from_buckets()))
                }
                None => None,
            },
        };
        let schedule = self.run_schedule(grad_scale, buckets.as_mut());
        // Also after a failed schedule: the queued sums are waited for (the device must not
        // go on writing the gradients) and the worker's handle comes back.
        let finished = buckets.map(|b| self.finish_buckets(b));
        let (loss, wait) = schedule?;
        let covered = match finished {
            Some(covered) => covered?,
            None => vec![Vec::new(); self.chunks.len()],
        };
        self.sum_shared_grads()?;
        let grad_norm = self.sync_and_update(lr, &covered)?;
        // The stop request rides on the loss's all-reduce, which every rank makes every step.
        let loss = if self.reports_loss() { loss } else { 0.0 };
        let ranks = self.each_rank_over_world([loss, f64::from(stop_request())])?;
        let loss_sum = ranks.iter().map(|[loss, _]| loss).sum();
        let stop = ranks.iter().map(|&[_, code]| code as u8).max().unwrap_or(0);
        Ok(StepOutcome { loss_sum, grad_norm, pipeline_wait_s: wait, stop })
    }

    /// The step's plan of forwards and backwards, handing finished gradients to `buckets`;
    /// returns this rank's loss and the seconds it waited for its pipeline neighbours.
    fn run_schedule(&mut self, grad_scale: f32, mut buckets: Option<&mut Buckets>) -> Result<(f64, f64)> {
        let (mut loss, mut wait) = (0.0, 0.0);
        for action in self.plan.clone() {
            match action {
                Action::Forward { chunk, micro } => {
                    let (l, w) = self.forward(chunk, micro, Some(grad_scale))?;
                    loss += l;
                    wait += w;
                }
                Action::Backward { chunk, micro } => {
                    let last = micro == self.last_backward[chunk];
                    wait += self.backward(chunk, micro, buckets.as_deref_mut().filter(|_| last))?
                }
            }
        }
        Ok((loss, wait))
    }

    /// The summed loss of `batches`, this replica's share of an evaluation, without gradients;
    /// returns the sum over every replica, on every rank, with the stop code agreed as
    /// [`Engine::step`] agrees it (`stop_request` read at the end).
    pub fn evaluate(
        &mut self,
        batches: &[(Vec<u32>, Vec<u32>)],
        stop_request: impl FnOnce() -> u8,
    ) -> Result<Evaluation> {
        self.upload(batches);
        let mut loss = 0.0;
        for chunk in 0..self.chunks.len() {
            for micro in 0..batches.len() {
                loss += self.forward(chunk, micro, None)?.0;
                // Nothing is kept for backward: the workspace is free again at once.
                self.chunks[chunk].release(micro);
            }
        }
        // As in a step, a stop request rides on the loss's all-reduce.
        let own = if self.reports_loss() { loss } else { 0.0 };
        let ranks = self.each_rank_over_world([own, f64::from(stop_request())])?;
        let stop = ranks.iter().map(|&[_, code]| code as u8).max().unwrap_or(0);
        Ok(Evaluation { loss_sum: ranks.iter().map(|[loss, _]| loss).sum(), stop })
    }

    fn upload(&mut self, batches: &[(Vec<u32>, Vec<u32>)]) {
        if self.ids.len() < batches.len() {
            let rows = self.layout.batch * self.layout.seq;
            self.ids.resize_with(batches.len(), || {
                (self.be.upload_ids(&vec![0; rows]), self.be.upload_ids(&vec![0; rows]))
            });
        }
        for ((inputs, targets), (i, t)) in batches.iter().zip(&mut self.ids) {
            self.be.write_ids(i, inputs);
            self.be.write_ids(t, targets);
        }
        if let Some(eot) = self.layout.document_mask {
            self.first_keys = batches.iter().map(|(inputs, _)| document_starts(inputs, self.layout.seq, eot)).collect();
        }
    }

    /// The workspace of `micro` in chunk `chunk`, given the rank's one scratch: from the
    /// workspace that used it last, of whichever chunk, or made on first use.
    fn workspace(&mut self, chunk: usize, micro: usize) -> Result<usize> {
        let slot = self.chunks[chunk].workspace(&self.be, micro, &self.layout)?;
        let held = self.chunks[chunk].pool[slot].take_scratch();
        let elsewhere = || self.chunks.iter_mut().flat_map(|c| &mut c.pool).find_map(Workspace::take_scratch);
        let scratch = match held.or_else(elsewhere) {
            Some(scratch) => scratch,
            None => {
                let (l, models): (_, Vec<&Model>) = (&self.layout, self.chunks.iter().map(|c| &c.model).collect());
                Scratch::new(&self.be, &models, l.micro_batch())
            }
        };
        self.chunks[chunk].pool[slot].give_scratch(scratch);
        Ok(slot)
    }

    /// The forward of `micro` through chunk `chunk`: receives its input unless it is the first
    /// stage; sends its output, or computes the loss (with gradients if `grad_scale`) on the
    /// last stage. Returns the loss (0 before the last stage) and the seconds spent waiting.
    fn forward(&mut self, chunk: usize, micro: usize, grad_scale: Option<f32>) -> Result<(f64, f64)> {
        let slot = self.workspace(chunk, micro)?;
        let (be, stages) = (&self.be, self.stages());
        let mut tp = TpHook::new(self.comms.tp.as_ref());
        let c = &mut self.chunks[chunk];
        let ws = &mut c.pool[slot];
        let mut wait = 0.0;
        if c.stage > 0 {
            wait = recv_tagged(be, self.comms.pp.as_ref(), ws.input_mut(), prev(&self.comms), (c.stage, micro))?;
        }
        let (ids, targets) = &self.ids[micro];
        ws.set_first_keys(be, self.first_keys.get(micro).map(Vec::as_slice));
        c.model.forward_stage(be, &c.params, ws, ids, &mut tp)?;
        if c.stage + 1 == stages {
            let grad = grad_scale.map(|scale| (scale, &mut c.grads));
            return Ok((c.model.loss_stage(be, &c.params, ws, targets, grad, &mut tp)?, wait));
        }
        send_tagged(be, self.comms.pp.as_ref(), ws.output(), next(&self.comms), (c.stage + 1, micro))?;
        Ok((0.0, wait))
    }

    /// The backward of `micro` through chunk `chunk`, handing finished gradients to
    /// `buckets` if given (the chunk's last backward); returns the seconds spent waiting.
    fn backward(&mut self, chunk: usize, micro: usize, mut buckets: Option<&mut Buckets>) -> Result<f64> {
        let slot = self.workspace(chunk, micro)?;
        let (be, stages) = (&self.be, self.stages());
        let dp = self.comms.dp.as_ref();
        let sink = buckets.as_deref_mut().map(|buckets| BucketSink { buckets, chunk, dp });
        let mut tp = TpHook { comm: self.comms.tp.as_ref(), buckets: sink };
        let c = &mut self.chunks[chunk];
        let ws = &mut c.pool[slot];
        let mut wait = 0.0;
        if c.stage + 1 < stages {
            let from = next(&self.comms);
            wait = recv_tagged(be, self.comms.pp_back.as_ref(), ws.output_grad_mut(), from, (c.stage, micro))?;
        }
        let ids = &self.ids[micro].0;
        c.model.backward_stage(be, &c.params, &mut c.grads, ws, ids, &mut tp)?;
        if let Some(b) = buckets {
            b.flush(be, dp, chunk, &c.grads)?;
        }
        if c.stage > 0 {
            send_tagged(be, self.comms.pp_back.as_ref(), ws.input_grad(), prev(&self.comms), (c.stage - 1, micro))?;
        }
        c.release(micro);
        Ok(wait)
    }

    /// Waits for the buckets' sums (writing those made through the host into the gradients);
    /// returns per chunk the ranges they cover.
    fn finish_buckets(&mut self, mut b: Buckets) -> Result<Vec<Vec<Range<usize>>>> {
        match b.worker.take() {
            None => self.comms.dp.wait_queued()?,
            Some(worker) => {
                let (comm, reduced) = worker.finish();
                self.bucketing = Bucketing::Worker(Some(comm));
                for (chunk, range, sums) in reduced? {
                    let grads = &mut self.chunks[chunk].grads;
                    self.be.write_view(self.be.view_mut(grads, range), &sums);
                }
            }
        }
        Ok(b.covered)
    }

    /// Per chunk, its ZeRO-1 shards (None without ZeRO-1).
    fn shards(&self) -> Vec<Option<ZeroShard>> {
        self.chunks.iter().map(|c| c.zero).collect()
    }

    /// Per chunk, the tensors whose gradients are summed over tp or pp before dp (see
    /// [`Engine::sum_shared_grads`]), which stay out of the gradient buckets.
    fn excluded_from_buckets(&self) -> Vec<Vec<Range<usize>>> {
        self.chunks
            .iter()
            .map(|c| {
                let partial = c.model.layout.params().iter().filter(|p| p.place.partial_grad).map(|p| p.range());
                c.model.shared_embedding().into_iter().chain(partial).collect()
            })
            .collect()
    }

    /// Sums the gradients that several model-parallel ranks each hold a part of: a tied
    /// embedding (first stage) and its copy for the head (last stage), in device memory where
    /// the pipeline channels take it; and key/value heads shared by several tp shards,
    /// through the host (only those tensors travel).
    fn sum_shared_grads(&mut self) -> Result<()> {
        let Self { be, comms, chunks, layout, .. } = self;
        for c in chunks {
            if let Some(range) = c.model.shared_embedding() {
                let piece = layout.grad_buckets.unwrap_or(TIED_PIECE).max(1);
                sum_tied_copies(be, comms, (c.stage == 0, layout.mesh.pp - 1), &mut c.grads, range, piece)?;
            }
            for p in c.model.layout.params().iter().filter(|p| p.place.partial_grad) {
                // Each sharer places its part in a global-sized buffer; summed over the tp group,
                // every sharer gets the sum for its piece.
                let mut global = vec![0.0f32; p.place.global_shape.iter().product()];
                p.place.insert(&be.download_view(be.view(&c.grads, p.range())), &mut global);
                comms.tp.all_reduce_sum(&mut global)?;
                be.write_view(be.view_mut(&mut c.grads, p.range()), &p.place.extract(&global));
            }
        }
        Ok(())
    }

    /// Sums gradients over the data-parallel replicas (all-reduce, or reduce-scatter under
    /// ZeRO-1), finds the global norm over every rank, and applies AdamW. `covered` holds,
    /// per chunk, the ranges the buckets already summed during backward; the rest of each
    /// chunk is summed here.
    fn sync_and_update(&mut self, lr: f32, covered: &[Vec<Range<usize>>]) -> Result<f64> {
        let be = &self.be;
        let dp: &dyn Communicator = self.comms.dp.as_ref();
        let first_replica = self.comms.coords.dp == 0;
        let mut squares = 0.0;
        for (c, covered) in self.chunks.iter_mut().zip(covered) {
            match &c.zero {
                None => {
                    if covered.is_empty() && dp.size() > 1 {
                        all_reduce_buf(be, dp, &mut c.grads)?;
                    } else if dp.size() > 1 {
                        // The rest of the chunk: tensors kept out of the buckets.
                        let rest = complement(c.model.num_params(), covered);
                        all_reduce_ranges(be, dp, &mut c.grads, &rest)?;
                    }
                    // Replicas hold equal gradients: the first one counts them.
                    if first_replica {
                        squares += c.primary.iter().map(|r| be.sum_squares(be.view(&c.grads, r.clone()))).sum::<f64>();
                    }
                }
                Some(z) => {
                    let window = z.start..z.start + z.len;
                    if covered.is_empty() {
                        reduce_scatter_buf(be, dp, &mut c.grads, window.clone())?;
                    } else {
                        // The rest of the chunk: tensors kept out of the buckets. (The padding
                        // past the parameters holds zeros on every replica.)
                        reduce_to_owners(be, dp, &mut c.grads, &complement(c.model.num_params(), covered), z)?;
                    }
                    squares += clip(c.primary.iter().map(|r| (r.clone(), ())), window)
                        .map(|(r, _)| be.sum_squares(be.view(&c.grads, r)))
                        .sum::<f64>();
                }
            }
        }
        let norm = self.sum_over_world(squares)?.sqrt();
        for c in &mut self.chunks {
            let clip = c.opt.clip_factor(norm);
            match &c.zero {
                Some(z) => {
                    c.opt.update_window(be, &mut c.params, &c.grads, z.start, lr, clip);
                    all_gather_buf(be, dp, &mut c.params, z.start..z.start + z.len)?;
                }
                None => c.opt.update(be, &mut c.params, &c.grads, lr, clip),
            }
        }
        Ok(norm)
    }

    /// The sum of `x` over every rank of the world (each rank's value travels exactly as a high
    /// and a low f32 in slots of its own; the parts are added in f64 in rank order).
    pub fn sum_over_world(&self, x: f64) -> Result<f64> {
        sum_f64(self.comms.world.as_ref(), x)
    }

    /// Every rank's `xs` (see [`each_rank_f64s`]).
    fn each_rank_over_world<const N: usize>(&self, xs: [f64; N]) -> Result<Vec<[f64; N]>> {
        each_rank_f64s(self.comms.world.as_ref(), xs)
    }

    /// Chunk `c`'s parameters (the fp32 master weights where the optimizer keeps them) and
    /// AdamW moments over its whole flat buffer (gathered over dp under ZeRO-1).
    fn optimizer_state(&self, c: &Chunk<B>) -> Result<[Vec<f32>; 3]> {
        let be = &self.be;
        let (m, v) = (be.download(&c.opt.m), be.download(&c.opt.v));
        let Some(z) = &c.zero else { return Ok([c.opt.master_params(be, &c.params), m, v]) };
        let gather = |shard: Vec<f32>| -> Result<Vec<f32>> {
            let mut full = vec![0.0f32; z.padded];
            self.comms.dp.all_gather(&shard, &mut full)?;
            full.truncate(c.model.num_params());
            Ok(full)
        };
        // The master weights are sharded like the moments; without them every rank holds
        // the whole parameters.
        let params = match &c.opt.master {
            Some(master) => gather(be.download(master))?,
            None => be.download(&c.params),
        };
        Ok([params, gather(m)?, gather(v)?])
    }

    /// Parameters and AdamW moments as whole tensors in the whole model's flat layout, on world
    /// rank 0 (None elsewhere). Every rank must call it.
    pub fn whole_state(&self) -> Result<Option<[Vec<f32>; 3]>> {
        let mut mine = [Vec::new(), Vec::new(), Vec::new()];
        for c in &self.chunks {
            let state = self.optimizer_state(c)?;
            for info in c.model.layout.params().iter().filter(|i| i.place.primary) {
                for (out, src) in mine.iter_mut().zip(&state) {
                    out.extend_from_slice(&src[info.range()]);
                }
            }
        }
        let world = self.comms.world.as_ref();
        if self.comms.coords.dp != 0 {
            return Ok(None);
        }
        if world.rank() != 0 {
            world.send(&mine.concat(), 0)?;
            return Ok(None);
        }
        let n = self.whole.num_params();
        let mut whole = [vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]];
        let mesh = self.layout.mesh;
        for rank in 0..mesh.world() {
            let coords = mesh.coords(rank)?;
            if coords.dp != 0 {
                continue;
            }
            let models: Vec<Model> = self
                .layout
                .parts(&self.whole.cfg, coords)?
                .into_iter()
                .map(|part| Model::part(self.whole.cfg.clone(), part))
                .collect::<Result<_>>()?;
            let primaries: Vec<_> =
                models.iter().flat_map(|m| m.layout.params().iter().filter(|i| i.place.primary).cloned()).collect();
            let len: usize = primaries.iter().map(|i| i.len()).sum();
            let payload = if rank == 0 {
                mine.concat()
            } else {
                let mut buf = vec![0.0f32; 3 * len];
                world.recv(&mut buf, rank)?;
                buf
            };
            let mut at = 0;
            for (k, out) in whole.iter_mut().enumerate() {
                let part = &payload[k * len..(k + 1) * len];
                at = 0;
                for info in &primaries {
                    let target = self.whole.layout.get(&info.name).expect("a part's tensor is in the whole model");
                    info.place.insert(&part[at..at + info.len()], &mut out[target.range()]);
                    at += info.len();
                }
            }
            debug_assert_eq!(at, len);
        }
        Ok(Some(whole))
    }

    /// Loads whole tensors (in the whole model's flat layout): parameters, and AdamW moments
    /// with the step count if given. Each rank cuts out its pieces.
    pub fn load_whole(&mut self, params: &[f32], moments: Option<(&[f32], &[f32], u64)>) {
        let be = &self.be;
        for c in &mut self.chunks {
            // The chunk's buffers may be longer (padded to ZeRO-1's shards).
            let len = be.len(&c.params);
            let cut = |whole: &[f32]| -> Vec<f32> {
                let mut local = vec![0.0f32; len];
                for info in c.model.layout.params() {
                    let src = self.whole.layout.get(&info.name).expect("a part's tensor is in the whole model");
                    local[info.range()].copy_from_slice(&info.place.extract(&whole[src.range()]));
                }
                local
            };
            let local = cut(params);
            be.write(&mut c.params, &local);
            let shard = |x: Vec<f32>| match &c.zero {
                None => x,
                Some(z) => z.slice(&x),
            };
            if let Some(master) = &mut c.opt.master {
                be.write(master, &shard(local));
            }
            if let Some((m, v, step)) = moments {
                be.write(&mut c.opt.m, &shard(cut(m)));
                be.write(&mut c.opt.v, &shard(cut(v)));
                c.opt.step = step;
            }
        }
    }
}

/// Floats of a tied embedding's gradient exchanged at a time on the device without gradient
/// buckets (with them, a bucket's size), so that the scratch and the pipeline channel's send
/// buffer stay at 64 MiB however large the vocabulary.
const TIED_PIECE: usize = 1 << 24;

/// `range` of `grads`, the first stage's tied embedding gradient or the last stage's copy,
/// becomes their sum on both (the same bits: f32 addition commutes). Each channel carries its
/// own direction around the ring of stages: the last stage sends on the forward one (to its
/// next rank, the first), the first stage on the backward one (to its previous rank, the
/// last). In device memory, `piece` floats at a time, where the channels take it; else
/// through the host.
fn sum_tied_copies<B: Backend>(
    be: &B,
    comms: &RankComms<Box<dyn Communicator>>,
    (first, last_rank): (bool, usize),
    grads: &mut B::Buf,
    range: Range<usize>,
    piece: usize,
) -> Result<()> {
    let (pp, back) = (comms.pp.as_ref(), comms.pp_back.as_ref());
    let (send, recv, peer) = if first { (back, pp, last_rank) } else { (pp, back, 0) };
    if on_device(be, send, be.view(grads, range.clone())).is_some_and(|d| recv.takes(&d)) {
        // The backend's scratch is device memory as its gradients are.
        let theirs = be.zeros_f32(range.len().min(piece));
        for start in range.clone().step_by(piece) {
            let piece = start..(start + piece).min(range.end);
            let n = piece.len();
            let (mine, scratch) =
                (be.device_slice(be.view(grads, piece.clone())), be.device_slice(be.view(&theirs, 0..n)));
            send.send_device(mine.expect("device memory"), peer)?;
            recv.recv_device(scratch.expect("device memory"), peer)?;
            be.add_assign(be.view_mut(grads, piece), be.view(&theirs, 0..n));
        }
        return Ok(());
    }
    let mut mine = be.download_view(be.view(grads, range.clone()));
    let mut theirs = vec![0.0f32; mine.len()];
    send.send(&mine, peer)?;
    recv.recv(&mut theirs, peer)?;
    mine.iter_mut().zip(&theirs).for_each(|(g, t)| *g += t);
    be.write_view(be.view_mut(grads, range), &mine);
    Ok(())
}

/// Adjacent ranges joined: one norm call per run of primary tensors, not per tensor.
fn merged(ranges: impl Iterator<Item = Range<usize>>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

/// The pipeline rank before and after this one (around the ring: interleaved chunks wrap).
fn prev(comms: &RankComms<Box<dyn Communicator>>) -> usize {
    let p = comms.mesh.pp;
    (comms.coords.pp + p - 1) % p
}

fn next(comms: &RankComms<Box<dyn Communicator>>) -> usize {
    (comms.coords.pp + 1) % comms.mesh.pp
}

/// Sends `buf` with its (stage, micro-batch) tag, so that a receiver expecting another message
/// fails loudly instead of computing on the wrong activations: from device memory where the
/// communicator takes it (the tag first, as a message of its own, checked before the payload
/// is received), else through the host (the tag at the end).
fn send_tagged<B: Backend>(
    be: &B,
    comm: &dyn Communicator,
    buf: &B::Buf,
    to: usize,
    tag: (usize, usize),
) -> Result<()> {
    let tag = [tag.0 as f32, tag.1 as f32];
    if let Some(d) = on_device(be, comm, be.all(buf)) {
        comm.send(&tag, to)?;
        return Ok(comm.send_device(d, to)?);
    }
    let mut host = be.download(buf);
    host.extend(tag);
    Ok(comm.send(&host, to)?)
}

/// Receives into `buf` the message tagged `tag` (sent by [`send_tagged`]); returns the
/// seconds spent waiting.
fn recv_tagged<B: Backend>(
    be: &B,
    comm: &dyn Communicator,
    buf: &mut B::Buf,
    from: usize,
    tag: (usize, usize),
) -> Result<f64> {
    let start = Instant::now();
    let check = |got: &[f32]| {
        let got = (got[0] as usize, got[1] as usize);
        if got == tag {
            return Ok(());
        }
        Err(Error::Training(format!(
            "pipeline messages out of order: stage {} expected micro-batch {} but received stage {} micro-batch {}",
            tag.0, tag.1, got.0, got.1
        )))
    };
    if let Some(d) = on_device(be, comm, be.all(buf)) {
        let mut got = [0.0f32; 2];
        comm.recv(&mut got, from)?;
        check(&got)?;
        comm.recv_device(d, from)?;
    } else {
        let mut host = vec![0.0f32; be.len(buf) + 2];
        comm.recv(&mut host, from)?;
        check(&host[host.len() - 2..])?;
        host.truncate(host.len() - 2);
        be.write(buf, &host);
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The sum of `x` over `comm`: every rank's value (see [`each_rank_f64s`]), added in f64 in
/// rank order.
pub fn sum_f64(comm: &dyn Communicator, x: f64) -> Result<f64> {
    Ok(each_rank_f64s(comm, [x])?.iter().map(|[x]| x).sum())
}

/// Every rank's `xs`, in rank order, through one all-reduce: each value travels as a high and a
/// low f32 in slots of its rank's own, so to 48 bits of mantissa (small integers exactly), where
/// an f32 sum would keep 24.
pub fn each_rank_f64s<const N: usize>(comm: &dyn Communicator, xs: [f64; N]) -> Result<Vec<[f64; N]>> {
    if comm.size() == 1 {
        return Ok(vec![xs]);
    }
    // Rank r's value j as the pair at slot r * N + j.
    let mut parts = vec![0.0f32; 2 * N * comm.size()];
    for (j, x) in xs.into_iter().enumerate() {
        let slot = 2 * (comm.rank() * N + j);
        let hi = x as f32;
        (parts[slot], parts[slot + 1]) = (hi, (x - hi as f64) as f32);
    }
    comm.all_reduce_sum(&mut parts)?;
    let values = parts.chunks(2).map(|pair| pair[0] as f64 + pair[1] as f64).collect::<Vec<_>>();
    Ok(values.chunks(N).map(|rank| rank.try_into().expect("N values a rank")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Every rank's values come back apart and to f64 precision (an f32 all-reduce would
    /// lose the 1e-9s), and their sum is added in rank order.
    #[test]
    fn each_rank_values_come_back_apart_and_precise() {
        let comms = RankComms::threads(Mesh::new(1, 1, 3).unwrap(), Duration::from_secs(60)).unwrap();
        let got: Vec<(Vec<[f64; 2]>, f64)> = std::thread::scope(|scope| {
            let ranks: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    scope.spawn(move || {
                        let r = c.world.rank() as f64;
                        let each = each_rank_f64s(&c.world, [1.0 + r * 1e-9, f64::from(u8::from(r == 1.0))]).unwrap();
                        (each, sum_f64(&c.world, 1.0 + r * 1e-9).unwrap())
                    })
                })
                .collect();
            ranks.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let want = [[1.0, 0.0], [1.0 + 1e-9, 1.0], [1.0 + 2e-9, 0.0]];
        let sum = 1.0 + (1.0 + 1e-9) + (1.0 + 2e-9);
        assert!(got.iter().all(|(each, s)| *each == want && *s == sum), "{got:?}, want {want:?} and {sum}");
    }
}
