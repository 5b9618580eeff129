//! [`Mixture`]: batches drawn from several token sources in proportion to their weights.
//!
//! Each source has its own single-window [`Loader`] (its own shuffled order, epochs and
//! cursor), so a small source repeats while a large one is still in its first epoch. Sequences
//! are numbered across the run, `g = batch * batch_size * world + slot`, and the source of
//! sequence `g` is drawn from the normalised weights with an RNG forked from the seed and `g`:
//! the draw depends on nothing but (seed, g), so every data-parallel rank computes the same
//! assignment (each reads only its own slots but advances every source as the whole read of
//! every rank does), the `g`-th sequence is the same whatever the batch size and world size, and
//! `(batch, source cursors)` is the complete position that a resumed run continues from (in
//! another geometry after [`MixtureCursor::in_reads_of`]).

use std::path::Path;
use std::sync::Arc;

use ondol_core::Rng;
use serde::{Deserialize, Serialize};

use crate::loader::batches_in_reads_of;
use crate::{Cursor, DataError, Loader, Order, TokenStream};

/// The position of a [`Mixture`]: reads done (each one micro-batch of every rank), and each
/// source's own position.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MixtureCursor {
    pub batch: u64,
    pub sources: Vec<Cursor>,
}

impl MixtureCursor {
    /// The same position for a mixture whose reads (one micro-batch of every rank) hold `to`
    /// sequences, this cursor having counted reads of `from`; None where that position falls
    /// inside a read. The sources' cursors count single windows and stay as they are.
    pub fn in_reads_of(&self, from: usize, to: usize) -> Option<MixtureCursor> {
        Some(MixtureCursor { batch: batches_in_reads_of(self.batch, from, to)?, sources: self.sources.clone() })
    }
}

#[derive(Debug)]
pub struct Mixture {
    sources: Vec<Loader>,
    /// Normalised cumulative weights; the last is 1.
    cumulative: Vec<f64>,
    seed: u64,
    seq_len: usize,
    batch_size: usize,
    rank: usize,
    world: usize,
    batch: u64,
    /// Where the windows of other ranks' slots are read to (and dropped).
    scratch: (Vec<u32>, Vec<u32>),
    /// Each row of the last batch: its source, and the stream index of its first token.
    last_rows: Vec<(usize, usize)>,
}

impl Mixture {
    /// A mixture of `streams` with `weights` (positive, any scale) for rank `rank` of `world`.
    /// `order` applies within each source (shuffled sources get seeds forked from its seed);
    /// `seed` drives the choice of source per sequence.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        streams: Vec<Arc<TokenStream>>,
        weights: &[f64],
        seq_len: usize,
        batch_size: usize,
        order: Order,
        seed: u64,
        rank: usize,
        world: usize,
    ) -> Result<Self, DataError> {
        if streams.is_empty() || streams.len() != weights.len() {
            return Err(DataError::Invalid(format!(
                "a mixture needs one weight per source ({} sources, {} weights)",
                streams.len(),
                weights.len()
            )));
        }
        if let Some(w) = weights.iter().find(|w| !(w.is_finite() && **w > 0.0)) {
            return Err(DataError::Invalid(format!("mixture weight {w}: weights must be positive numbers")));
        }
        if batch_size == 0 || world == 0 || rank >= world {
            return Err(DataError::Invalid(format!(
                "mixture: batch_size {batch_size}, rank {rank} of world {world} is not a valid geometry"
            )));
        }
        let mut sources = Vec::with_capacity(streams.len());
        for (i, stream) in streams.into_iter().enumerate() {
            let order = match order {
                Order::Sequential => Order::Sequential,
                Order::Shuffled { seed } => Order::Shuffled { seed: Rng::new(seed).fork(i as u64).next_u64() },
            };
            // A source gives whole sequences one at a time: it needs one at least.
            if stream.len() <= seq_len {
                let first =
                    if stream.is_empty() { String::new() } else { format!(" ({}...)", stream.origin(0).0.display()) };
                return Err(DataError::Invalid(format!(
                    "source {i}{first} has {} tokens, fewer than one sequence of seq_len {seq_len} + 1",
                    stream.len()
                )));
            }
            let loader = Loader::new(stream, seq_len, 1, 1, order, 0, 1)
                .map_err(|e| DataError::Invalid(format!("mixture source {i}: {e}")))?;
            sources.push(loader);
        }
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut cumulative: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        *cumulative.last_mut().expect("at least one source") = 1.0;
        let scratch = (vec![0; seq_len], vec![0; seq_len]);
        Ok(Self {
            sources,
            cumulative,
            seed,
            seq_len,
            batch_size,
            rank,
            world,
            batch: 0,
            scratch,
            last_rows: Vec::new(),
        })
    }

    /// Sequences a read holds: one micro-batch of every rank.
    fn slots(&self) -> u64 {
        (self.batch_size * self.world) as u64
    }

    /// The source of each slot of read `batch` (one micro-batch of every rank).
    fn assignment(&self, batch: u64) -> impl Iterator<Item = usize> + '_ {
        let slots = self.slots();
        let draws = Rng::new(self.seed ^ 0x6D69_7874_7572_6573);
        (batch * slots..(batch + 1) * slots).map(move |g| {
            let u = draws.fork(g).next_f64();
            self.cumulative.partition_point(|&c| c <= u).min(self.cumulative.len() - 1)
        })
    }

    /// Fills `inputs` and `targets` (`batch_size * seq_len` each) with this rank's sequences;
    /// returns the learned targets of the whole read, as [`Loader::next_batch`] does.
    pub fn next_batch(&mut self, inputs: &mut [u32], targets: &mut [u32]) -> u64 {
        let (t, b) = (self.seq_len, self.batch_size);
        assert!(inputs.len() == b * t && targets.len() == b * t, "mixture: buffers must hold batch_size * seq_len");
        let picks: Vec<usize> = self.assignment(self.batch).collect();
        self.last_rows.resize(b, (0, 0));
        let mut learned = 0;
        for (slot, s) in picks.into_iter().enumerate() {
            if slot / b == self.rank {
                let j = slot % b;
                learned +=
                    self.sources[s].next_batch(&mut inputs[j * t..(j + 1) * t], &mut targets[j * t..(j + 1) * t]);
                self.last_rows[j] = (s, self.sources[s].last_start(0));
            } else {
                let (i, g) = &mut self.scratch;
                learned += self.sources[s].next_batch(i, g);
            }
        }
        self.batch += 1;
        learned
    }

    /// Where a token of the last batch came from, as [`Loader::origin`] says.
    ///
    /// # Panics
    /// If there was no such row or position in the last batch (a caller bug).
    pub fn origin(&self, row: usize, pos: usize) -> (&Path, usize) {
        assert!(pos <= self.seq_len, "position {pos} is outside a window of {} tokens", self.seq_len + 1);
        let (source, start) = self.last_rows[row];
        self.sources[source].stream().origin(start + pos)
    }

    pub fn cursor(&self) -> MixtureCursor {
        MixtureCursor { batch: self.batch, sources: self.sources.iter().map(Loader::cursor).collect() }
    }

    pub fn set_cursor(&mut self, cursor: &MixtureCursor) -> Result<(), DataError> {
        if cursor.batch.checked_add(1).and_then(|b| b.checked_mul(self.slots())).is_none() {
            return Err(DataError::Invalid(format!("the saved data position, read {}, is out of range", cursor.batch)));
        }
        if cursor.sources.len() != self.sources.len() {
            return Err(DataError::Invalid(format!(
                "the saved data position has {} sources, the run has {}",
                cursor.sources.len(),
                self.sources.len()
            )));
        }
        // All sources move, or none.
        for (loader, c) in self.sources.iter().zip(&cursor.sources) {
            loader.check_cursor(*c)?;
        }
        for (loader, c) in self.sources.iter_mut().zip(&cursor.sources) {
            loader.set_cursor(*c)?;
        }
        self.batch = cursor.batch;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SourceKind;
    use crate::write_shard;

    /// Two sources whose tokens tell them apart: source 0 holds ids < 1000, source 1 ids >= 1000.
    fn streams(dir: &std::path::Path) -> Vec<Arc<TokenStream>> {
        (0..2u32)
            .map(|s| {
                let path = dir.join(format!("s{s}.bin"));
                let tokens: Vec<u32> = (0..(3000 + 5000 * s)).map(|i| s * 1000 + i % 1000).collect();
                write_shard(&path, &tokens, None).unwrap();
                Arc::new(TokenStream::open(&[path], SourceKind::Shards).unwrap())
            })
            .collect()
    }

    fn mixture(dir: &std::path::Path, rank: usize, world: usize) -> Mixture {
        Mixture::new(streams(dir), &[0.7, 0.3], 8, 4, Order::Shuffled { seed: 3 }, 11, rank, world).unwrap()
    }

    #[test]
    fn each_source_gets_its_share_within_sampling_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = mixture(dir.path(), 0, 1);
        let (mut x, mut y) = (vec![0; 32], vec![0; 32]);
        let (mut first, mut total) = (0usize, 0usize);
        for _ in 0..2000 {
            m.next_batch(&mut x, &mut y);
            for seq in x.chunks(8) {
                assert!(seq.iter().all(|&t| t < 1000) || seq.iter().all(|&t| t >= 1000), "a sequence mixes sources");
                first += (seq[0] < 1000) as usize;
                total += 1;
            }
        }
        let share = first as f64 / total as f64;
        let sigma = (0.7 * 0.3 / total as f64).sqrt();
        assert!((share - 0.7).abs() < 4.0 * sigma, "source 0 share {share:.4}, want 0.7 +- {:.4}", 4.0 * sigma);
    }

    /// A source shorter than one sequence is named, with its first file.
    #[test]
    fn a_source_shorter_than_a_sequence_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let tiny = dir.path().join("tiny.bin");
        write_shard(&tiny, &[1, 2, 3, 4, 5], None).unwrap();
        let mut streams = streams(dir.path());
        streams[1] = Arc::new(TokenStream::open(&[tiny], SourceKind::Shards).unwrap());
        let err = Mixture::new(streams, &[0.7, 0.3], 8, 4, Order::Sequential, 1, 0, 1).unwrap_err().to_string();
        assert!(err.contains("source 1 (") && err.contains("tiny.bin") && err.contains("5 tokens"), "{err}");
    }

    /// A token of the last batch is traced to its source's file and a place there holding its
    /// value, on a rank that also reads (and drops) the other rank's windows.
    #[test]
    fn origin_names_the_source_file_of_each_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = mixture(dir.path(), 1, 2);
        let (mut x, mut y) = (vec![0; 32], vec![0; 32]);
        for _ in 0..20 {
            m.next_batch(&mut x, &mut y);
            for (row, (input, target)) in x.chunks(8).zip(y.chunks(8)).enumerate() {
                for (pos, &value) in input.iter().chain(&target[7..]).enumerate() {
                    let (file, index) = m.origin(row, pos);
                    let source = value / 1000;
                    assert_eq!(file, dir.path().join(format!("s{source}.bin")), "row {row} place {pos}");
                    assert_eq!(index as u32 % 1000, value % 1000, "row {row} place {pos}");
                }
            }
        }
    }

    #[test]
    fn resumes_exactly_and_ranks_split_the_global_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (mut x, mut y) = (vec![0; 32], vec![0; 32]);
        let mut a = mixture(dir.path(), 0, 1);
        for _ in 0..37 {
            a.next_batch(&mut x, &mut y);
        }
        let saved = serde_json::to_string(&a.cursor()).unwrap();
        let mut b = mixture(dir.path(), 0, 1);
        b.set_cursor(&serde_json::from_str(&saved).unwrap()).unwrap();
        let (mut x2, mut y2) = (vec![0; 32], vec![0; 32]);
        for _ in 0..50 {
            a.next_batch(&mut x, &mut y);
            b.next_batch(&mut x2, &mut y2);
            assert_eq!((&x, &y), (&x2, &y2));
        }
        // Two ranks of batch 2 read exactly the world-1 batch of 4, in order.
        let mut whole = mixture(dir.path(), 0, 1);
        let mut r0 =
            Mixture::new(streams(dir.path()), &[0.7, 0.3], 8, 2, Order::Shuffled { seed: 3 }, 11, 0, 2).unwrap();
        let mut r1 =
            Mixture::new(streams(dir.path()), &[0.7, 0.3], 8, 2, Order::Shuffled { seed: 3 }, 11, 1, 2).unwrap();
        let (mut h0, mut t0, mut h1, mut t1) = (vec![0; 16], vec![0; 16], vec![0; 16], vec![0; 16]);
        for _ in 0..20 {
            whole.next_batch(&mut x, &mut y);
            r0.next_batch(&mut h0, &mut t0);
            r1.next_batch(&mut h1, &mut t1);
            assert_eq!([h0.as_slice(), h1.as_slice()].concat(), x);
        }
        assert!(Mixture::new(streams(dir.path()), &[1.0, 0.0], 8, 2, Order::Sequential, 0, 0, 1).is_err());
        assert!(b.set_cursor(&MixtureCursor { batch: 0, sources: vec![] }).is_err());
        assert!(b.set_cursor(&MixtureCursor { batch: u64::MAX / 2, ..a.cursor() }).is_err());
        // A position one source cannot take moves no source.
        let (before, mut bad) = (b.cursor(), a.cursor());
        (bad.sources[0], bad.sources[1].batch) = (Cursor::default(), u64::MAX);
        assert!(b.set_cursor(&bad).is_err());
        assert_eq!(b.cursor(), before);
    }

    /// The next `reads` reads of ranks of `batch_size` sequences, in global order.
    fn global_sequences(ranks: &mut [Mixture], batch_size: usize, reads: usize) -> Vec<u32> {
        let mut out = Vec::new();
        for _ in 0..reads {
            for m in ranks.iter_mut() {
                let (mut x, mut y) = (vec![0; batch_size * 8], vec![0; batch_size * 8]);
                m.next_batch(&mut x, &mut y);
                out.extend(x);
            }
        }
        out
    }

    #[test]
    fn the_sequences_do_not_depend_on_how_a_global_batch_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let cut = |b: usize, world: usize| -> Vec<Mixture> {
            let order = Order::Shuffled { seed: 3 };
            (0..world)
                .map(|r| Mixture::new(streams(dir.path()), &[0.7, 0.3], 8, b, order, 11, r, world).unwrap())
                .collect()
        };
        let want = global_sequences(&mut cut(4, 1), 4, 30);
        assert_eq!(global_sequences(&mut cut(1, 2), 1, 60), want, "reads of 1 x 2 sequences");
        assert_eq!(global_sequences(&mut cut(3, 1), 3, 40), want, "reads of 3 sequences");
        // Saved after 9 reads of 1 x 2, resumed in reads of 3 (and of 4, where 18 sequences
        // fall inside a read).
        let mut saved = cut(1, 2);
        global_sequences(&mut saved, 1, 9);
        let cursor = saved[0].cursor();
        assert_eq!(cursor.in_reads_of(2, 4), None);
        let moved = cursor.in_reads_of(2, 3).unwrap();
        assert_eq!(moved.batch, 6);
        let mut resumed = cut(3, 1);
        resumed[0].set_cursor(&moved).unwrap();
        assert_eq!(global_sequences(&mut resumed, 3, 34), want[18 * 8..]);
    }
}
