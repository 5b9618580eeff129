//! [`Loader`]: batches of training sequences from a [`TokenStream`], sharded over data-parallel
//! ranks, resumable from a two-number [`Cursor`].
//!
//! The stream is cut into non-overlapping windows of `seq_len + 1` tokens: window `w` covers
//! tokens `[w * seq_len, w * seq_len + seq_len + 1)`, its first `seq_len` tokens are the inputs
//! and its last `seq_len` the targets (consecutive windows share one boundary token, so no
//! token is wasted as a target-only token). `W = (len - 1) / seq_len` windows make an epoch.
//!
//! Each epoch lists the windows in an order (identity, or a Fisher-Yates permutation drawn
//! from `Rng::new(seed).fork(epoch)`), and that list is read `batch_size * world` windows at a
//! time: one micro-batch of every rank, of which rank `r` takes windows `[r * batch_size, (r +
//! 1) * batch_size)`. `accum` such reads make one optimizer step, whose global batch is the
//! `S = batch_size * world * accum` consecutive windows of the list. The last `W % S` windows
//! are dropped, so every step is whole and within one epoch. Because the order of an epoch
//! depends only on the seed and the epoch number, `(epoch, batch)` is the complete position,
//! and step `s` of an epoch is windows `[s * S, (s + 1) * S)` whatever the factors of `S`: a run
//! resumed at another world size, micro-batch size or accumulation that keeps `S` (its cursor
//! converted by [`Cursor::in_reads_of`]) trains on exactly the sequences it would have.
//!
//! Memory: a shuffled loader keeps its epoch's permutation as `u32` window indices, 4 bytes per
//! `seq_len` tokens of data (100 B tokens at seq_len 1024 = 400 MB per rank); nothing is
//! allocated per batch.

use std::path::Path;
use std::sync::Arc;

use ondol_core::Rng;
use serde::{Deserialize, Serialize};

use crate::{DataError, TokenStream};

/// The order of windows within an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Windows in stream order, every epoch (evaluation, or data that is already shuffled).
    Sequential,
    /// A fresh permutation each epoch, reproducible from `seed`.
    Shuffled { seed: u64 },
}

/// The position of a [`Loader`]: the next batch to read is batch `batch` of epoch `epoch`.
/// Saved in the trainer state; `Cursor::default()` is the start of the data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub batch: u64,
}

impl Cursor {
    /// The same position for a loader that reads `to` windows a batch, this cursor having
    /// counted batches of `from` windows; None where that position falls inside a batch.
    pub fn in_reads_of(self, from: usize, to: usize) -> Option<Cursor> {
        Some(Cursor { epoch: self.epoch, batch: batches_in_reads_of(self.batch, from, to)? })
    }
}

/// `batches` reads of `from` items, counted in reads of `to`; None where that falls inside a
/// read (or `to` is 0).
pub(crate) fn batches_in_reads_of(batches: u64, from: usize, to: usize) -> Option<u64> {
    let items = batches.checked_mul(from as u64)?;
    (to > 0 && items % to as u64 == 0).then(|| items / to as u64)
}

/// A resumable, rank-sharded batch loader; see the module docs.
#[derive(Debug)]
pub struct Loader {
    stream: Arc<TokenStream>,
    seq_len: usize,
    batch_size: usize,
    /// Reads a step.
    accum: usize,
    rank: usize,
    world: usize,
    order: Order,
    windows: usize,
    batches: u64,
    cursor: Cursor,
    /// `Shuffled` only: the window order of epoch `perm_epoch`, rebuilt when the epoch changes.
    perm: Vec<u32>,
    perm_epoch: Option<u64>,
    /// The stream index of each row's first token in the last batch, for [`Loader::origin`].
    last_starts: Vec<usize>,
    /// Whether the stream has loss masks (else every target is learned).
    masked: bool,
}

impl Loader {
    /// A loader for data-parallel rank `rank` of `world`, at the start of the data. Each call
    /// to [`Loader::next_batch`] yields `batch_size` sequences of `seq_len` tokens; `accum`
    /// calls make a step (an epoch holds whole steps).
    pub fn new(
        stream: Arc<TokenStream>,
        seq_len: usize,
        batch_size: usize,
        accum: usize,
        order: Order,
        rank: usize,
        world: usize,
    ) -> Result<Self, DataError> {
        let checks = [("seq_len", seq_len), ("batch_size", batch_size), ("accum", accum), ("world size", world)];
        for (name, value) in checks {
            if value == 0 {
                return Err(DataError::Invalid(format!("loader: {name} is 0; it must be at least 1")));
            }
        }
        if rank >= world {
            return Err(DataError::Invalid(format!(
                "loader: rank {rank} is out of range for world size {world} (valid ranks: 0..{world})"
            )));
        }
        let windows = stream.len().saturating_sub(1) / seq_len;
        let step = batch_size.saturating_mul(world).saturating_mul(accum);
        if windows < step {
            let needed = step.saturating_mul(seq_len).saturating_add(1);
            return Err(DataError::Invalid(format!(
                "not enough data: one step ({batch_size} sequences x {world} ranks x {accum} micro-batches \
                 of {seq_len} tokens) needs at least {needed} tokens, but the stream has {}",
                stream.len()
            )));
        }
        if matches!(order, Order::Shuffled { .. }) && u32::try_from(windows).is_err() {
            return Err(DataError::Invalid(format!(
                "loader: {windows} windows per epoch; shuffling supports at most {} (use a longer seq_len)",
                u32::MAX
            )));
        }
        Ok(Self {
            seq_len,
            batch_size,
            accum,
            rank,
            world,
            order,
            windows,
            batches: (windows / step * accum) as u64,
            cursor: Cursor::default(),
            perm: Vec::new(),
            perm_epoch: None,
            last_starts: Vec::with_capacity(batch_size),
            masked: stream.has_masks(),
            stream,
        })
    }

    /// Tokens of a sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Windows of `seq_len + 1` tokens in the stream, W.
    pub fn windows_per_epoch(&self) -> u64 {
        self.windows as u64
    }

    /// Batches per epoch: `accum` for each of the `W / S` whole steps.
    pub fn batches_per_epoch(&self) -> u64 {
        self.batches
    }

    /// The position of the next batch.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Moves to `cursor` (from [`Loader::cursor`] between steps, e.g. of a saved run), if
    /// [`Loader::check_cursor`] takes it.
    pub fn set_cursor(&mut self, cursor: Cursor) -> Result<(), DataError> {
        self.check_cursor(cursor)?;
        self.cursor = cursor;
        Ok(())
    }

    /// Refuses a batch index past the end of an epoch or inside a step: the cursor was saved
    /// with other data or batch geometry, or by an ondol whose epochs did not hold whole steps.
    pub fn check_cursor(&self, cursor: Cursor) -> Result<(), DataError> {
        if cursor.batch >= self.batches || !cursor.batch.is_multiple_of(self.accum as u64) {
            return Err(DataError::Invalid(format!(
                "the data position (epoch {}, batch {}) is not the start of a step of an epoch, which has {} \
                 batches in steps of {}; was it saved with other data, seq_len, batch size, world size or \
                 grad_accum, or by an older ondol?",
                cursor.epoch, cursor.batch, self.batches, self.accum
            )));
        }
        Ok(())
    }

    /// Fills `inputs` and `targets` (each `batch_size * seq_len` tokens, row-major
    /// `[batch_size, seq_len]`) with this rank's share of the next read (one micro-batch of
    /// every rank), and advances. Targets that a loss mask does not learn read as
    /// [`ondol_core::IGNORED_TARGET`]. Returns the learned targets of the whole read, every
    /// rank's: what the mean loss of a step divides by.
    ///
    /// # Panics
    /// If a slice has the wrong length (a caller bug).
    pub fn next_batch(&mut self, inputs: &mut [u32], targets: &mut [u32]) -> u64 {
        let n = self.batch_size * self.seq_len;
        assert!(
            inputs.len() == n && targets.len() == n,
            "next_batch: inputs and targets must hold batch_size * seq_len = {n} tokens, got {} and {}",
            inputs.len(),
            targets.len()
        );
        let epoch = self.cursor.epoch;
        if let Order::Shuffled { seed } = self.order
            && self.perm_epoch != Some(epoch)
        {
            self.perm.clear();
            self.perm.extend(0..self.windows as u32);
            Rng::new(seed).fork(epoch).shuffle(&mut self.perm);
            self.perm_epoch = Some(epoch);
        }
        let read = self.cursor.batch as usize * self.batch_size * self.world;
        let window = |slot: usize| match self.order {
            Order::Sequential => read + slot,
            Order::Shuffled { .. } => self.perm[read + slot] as usize,
        };
        let learned = match self.masked {
            false => (self.batch_size * self.world * self.seq_len) as u64,
            true => (0..self.batch_size * self.world)
                .map(|slot| self.stream.count_learned(window(slot) * self.seq_len + 1, self.seq_len) as u64)
                .sum(),
        };
        let rows = inputs.chunks_exact_mut(self.seq_len).zip(targets.chunks_exact_mut(self.seq_len));
        self.last_starts.clear();
        for (i, (input, target)) in rows.enumerate() {
            let start = window(self.rank * self.batch_size + i) * self.seq_len;
            self.stream.read(start, input);
            self.stream.read_targets(start + 1, target);
            self.last_starts.push(start);
        }
        self.cursor.batch += 1;
        if self.cursor.batch == self.batches {
            self.cursor = Cursor { epoch: epoch + 1, batch: 0 };
        }
        learned
    }
}

impl Loader {
    /// Where a token of the last batch came from: the file, and the token's index within it.
    /// `row` is the sequence in the batch and `pos` the token's place in its window of
    /// `seq_len + 1` tokens (input column `c` is `pos = c`, target column `c` is `c + 1`).
    ///
    /// # Panics
    /// If there was no such row or position in the last batch (a caller bug).
    pub fn origin(&self, row: usize, pos: usize) -> (&Path, usize) {
        assert!(pos <= self.seq_len, "position {pos} is outside a window of {} tokens", self.seq_len + 1);
        self.stream.origin(self.last_starts[row] + pos)
    }

    /// The stream index of row `row`'s first token in the last batch.
    pub(crate) fn last_start(&self, row: usize) -> usize {
        self.last_starts[row]
    }

    pub(crate) fn stream(&self) -> &TokenStream {
        &self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SourceKind, write_shard};
    use tempfile::TempDir;

    /// A stream whose token at index i is i, over two shards, so a window shows its index.
    fn counting_stream(len: u32) -> (TempDir, Arc<TokenStream>) {
        let dir = tempfile::tempdir().unwrap();
        let files = [dir.path().join("a.bin"), dir.path().join("b.bin")];
        write_shard(&files[0], &(0..len / 3).collect::<Vec<_>>(), None).unwrap();
        write_shard(&files[1], &(len / 3..len).collect::<Vec<_>>(), None).unwrap();
        let stream = TokenStream::open(&files, SourceKind::Shards).unwrap();
        (dir, Arc::new(stream))
    }

    /// The window index of each row of the next batch, after checking inputs and targets.
    fn next_windows(loader: &mut Loader, seq_len: usize, batch_size: usize) -> Vec<u32> {
        let mut inputs = vec![0; batch_size * seq_len];
        let mut targets = vec![0; batch_size * seq_len];
        loader.next_batch(&mut inputs, &mut targets);
        let rows = inputs.chunks(seq_len).zip(targets.chunks(seq_len));
        rows.map(|(input, target)| {
            let w = input[0] / seq_len as u32;
            let start = w * seq_len as u32;
            assert_eq!(input, (start..start + seq_len as u32).collect::<Vec<_>>());
            assert_eq!(target, (start + 1..start + seq_len as u32 + 1).collect::<Vec<_>>());
            w
        })
        .collect()
    }

    fn loader(
        stream: &Arc<TokenStream>,
        seq_len: usize,
        batch_size: usize,
        order: Order,
        rank: usize,
        world: usize,
    ) -> Loader {
        Loader::new(stream.clone(), seq_len, batch_size, 1, order, rank, world).unwrap()
    }

    /// With a loss mask beside one of two shards, a target its mask does not learn reads as
    /// ignored (the other shard's all are learned), inputs stay whole, and each read counts
    /// the learned targets of every rank's rows, the same on every rank.
    #[test]
    fn masked_targets_read_as_ignored_and_every_rank_counts_the_whole_read() {
        use ondol_core::IGNORED_TARGET;
        let len = 301;
        let (dir, _) = counting_stream(len);
        let learned = |i: u32| i % 7 < 3;
        let a: Vec<bool> = (0..len / 3).map(learned).collect();
        crate::mask::write_mask(&dir.path().join("a.mask"), &a).unwrap();
        let files = [dir.path().join("a.bin"), dir.path().join("b.bin")];
        let stream = Arc::new(TokenStream::open(&files, SourceKind::Shards).unwrap());
        assert!(stream.has_masks());
        let (seq_len, batch_size, world) = (10, 3, 2);
        let mut ranks: Vec<Loader> =
            (0..world).map(|r| loader(&stream, seq_len, batch_size, Order::Shuffled { seed: 5 }, r, world)).collect();
        let mut ignored = 0;
        for _ in 0..4 {
            let mut counted = Vec::new();
            let mut learned_here = 0;
            for l in &mut ranks {
                let (mut inputs, mut targets) = (vec![0; batch_size * seq_len], vec![0; batch_size * seq_len]);
                counted.push(l.next_batch(&mut inputs, &mut targets));
                for (row, (input, target)) in inputs.chunks(seq_len).zip(targets.chunks(seq_len)).enumerate() {
                    for (c, &t) in target.iter().enumerate() {
                        let value = input[c] + 1; // the counting stream: each target is its input + 1
                        let want = if value < len / 3 && !learned(value) { IGNORED_TARGET } else { value };
                        assert_eq!(t, want, "row {row} column {c}");
                        learned_here += u64::from(t != IGNORED_TARGET);
                        ignored += u64::from(t == IGNORED_TARGET);
                    }
                }
            }
            assert_eq!(counted, vec![learned_here; world], "each rank counts the whole read");
        }
        assert!(ignored > 0, "the reads never touched the masked shard");
    }

    /// Each token of a shuffled batch is traced to its file and index there: in the counting
    /// stream, token i of the stream is the value i, in a.bin up to len / 3, then in b.bin.
    #[test]
    fn origin_names_the_file_and_index_of_every_token_of_the_last_batch() {
        let len = 301;
        let (dir, stream) = counting_stream(len);
        let (seq_len, batch_size) = (10, 4);
        let mut loader = loader(&stream, seq_len, batch_size, Order::Shuffled { seed: 9 }, 1, 2);
        let mut inputs = vec![0; batch_size * seq_len];
        let mut targets = vec![0; batch_size * seq_len];
        for _ in 0..3 {
            loader.next_batch(&mut inputs, &mut targets);
            for (row, (input, target)) in inputs.chunks(seq_len).zip(targets.chunks(seq_len)).enumerate() {
                let tokens = input.iter().chain(&target[seq_len - 1..]);
                for (pos, &value) in tokens.enumerate() {
                    let expected = match value < len / 3 {
                        true => (dir.path().join("a.bin"), value as usize),
                        false => (dir.path().join("b.bin"), (value - len / 3) as usize),
                    };
                    let (file, index) = loader.origin(row, pos);
                    assert_eq!((file.to_path_buf(), index), expected, "row {row} place {pos}");
                }
            }
        }
    }

    #[test]
    fn targets_are_inputs_shifted_by_one_across_shard_boundaries() {
        let (_dir, stream) = counting_stream(100);
        let mut l = loader(&stream, 7, 2, Order::Shuffled { seed: 3 }, 0, 1);
        for _ in 0..20 {
            next_windows(&mut l, 7, 2); // checks every row
        }
    }

    #[test]
    fn sequential_reads_windows_in_order_and_drops_the_remainder() {
        // 43 tokens, seq_len 4: W = 42 / 4 = 10 windows; batches of 3 -> 3 per epoch, window 9 dropped.
        let (_dir, stream) = counting_stream(43);
        let mut l = loader(&stream, 4, 3, Order::Sequential, 0, 1);
        assert_eq!((l.windows_per_epoch(), l.batches_per_epoch()), (10, 3));
        let seen: Vec<Vec<u32>> = (0..4).map(|_| next_windows(&mut l, 4, 3)).collect();
        assert_eq!(seen, [vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8], vec![0, 1, 2]]);
        assert_eq!(l.cursor(), Cursor { epoch: 1, batch: 1 });
        // The last window ends on the last token: 41 tokens give exactly W = 10 as well.
        let (_dir, exact) = counting_stream(41);
        let mut l = loader(&exact, 4, 10, Order::Sequential, 0, 1);
        assert_eq!(next_windows(&mut l, 4, 10), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn shuffled_epochs_are_permutations_that_depend_on_seed_and_epoch() {
        let (_dir, stream) = counting_stream(241); // W = 60, batches of 5 -> 12 per epoch
        let epoch = |l: &mut Loader| (0..12).flat_map(|_| next_windows(l, 4, 5)).collect::<Vec<_>>();
        let mut a = loader(&stream, 4, 5, Order::Shuffled { seed: 1 }, 0, 1);
        let (a0, a1) = (epoch(&mut a), epoch(&mut a));
        for order in [&a0, &a1] {
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, (0..60).collect::<Vec<_>>());
        }
        assert_ne!(a0, (0..60).collect::<Vec<_>>());
        assert_ne!(a0, a1, "epochs must be reshuffled");
        let mut same = loader(&stream, 4, 5, Order::Shuffled { seed: 1 }, 0, 1);
        assert_eq!(epoch(&mut same), a0);
        let mut other = loader(&stream, 4, 5, Order::Shuffled { seed: 2 }, 0, 1);
        assert_ne!(epoch(&mut other), a0);
    }

    #[test]
    fn rank_slices_are_disjoint_and_make_up_the_single_rank_batch() {
        let (_dir, stream) = counting_stream(500);
        for order in [Order::Sequential, Order::Shuffled { seed: 9 }] {
            let mut whole = loader(&stream, 5, 6, order, 0, 1); // 6 = 2 per rank x 3 ranks
            let mut ranks: Vec<Loader> = (0..3).map(|r| loader(&stream, 5, 2, order, r, 3)).collect();
            assert_eq!(whole.batches_per_epoch(), ranks[0].batches_per_epoch());
            for _ in 0..40 {
                let joined: Vec<u32> = ranks.iter_mut().flat_map(|l| next_windows(l, 5, 2)).collect();
                let mut distinct = joined.clone();
                distinct.sort();
                distinct.dedup();
                assert_eq!(distinct.len(), 6, "{joined:?}");
                assert_eq!(joined, next_windows(&mut whole, 5, 6));
            }
        }
    }

    /// The windows of the next `steps` steps of `(batch_size, world, accum)`, each step's
    /// sorted (the order within a step does not change its gradient), read by one loader per
    /// rank.
    fn step_windows(
        ranks: &mut [Loader],
        seq_len: usize,
        batch_size: usize,
        accum: usize,
        steps: usize,
    ) -> Vec<Vec<u32>> {
        (0..steps)
            .map(|_| {
                let mut step: Vec<u32> = (0..accum)
                    .flat_map(|_| {
                        ranks.iter_mut().flat_map(|l| next_windows(l, seq_len, batch_size)).collect::<Vec<_>>()
                    })
                    .collect();
                step.sort();
                step
            })
            .collect()
    }

    #[test]
    fn a_step_reads_the_same_windows_whatever_the_factors_of_its_global_batch() {
        // W = 70 windows, S = 12 sequences a step: 5 whole steps an epoch, 10 windows dropped.
        let (_dir, stream) = counting_stream(281);
        let order = Order::Shuffled { seed: 5 };
        let layouts = |b: usize, world: usize, accum: usize| -> Vec<Loader> {
            (0..world).map(|r| Loader::new(stream.clone(), 4, b, accum, order, r, world).unwrap()).collect()
        };
        let mut reference = layouts(12, 1, 1);
        assert_eq!(reference[0].batches_per_epoch(), 5);
        let want = step_windows(&mut reference, 4, 12, 1, 12); // more than two epochs
        for (b, world, accum) in [(6, 1, 2), (2, 3, 2), (3, 2, 2), (1, 4, 3), (4, 3, 1)] {
            let mut ranks = layouts(b, world, accum);
            assert_eq!(ranks[0].batches_per_epoch(), 5 * accum as u64);
            let got = step_windows(&mut ranks, 4, b, accum, 12);
            assert_eq!(got, want, "batch_size {b} x world {world} x accum {accum}");
        }
        // A cursor saved at (2 x 3, accum 2) after 7 steps (in the second epoch) continues at
        // (1 x 4, accum 3) with the steps the first layout would have read.
        let mut saved = layouts(2, 3, 2);
        step_windows(&mut saved, 4, 2, 2, 7);
        let cursor = saved[0].cursor();
        assert_eq!(cursor, Cursor { epoch: 1, batch: 4 });
        let moved = cursor.in_reads_of(6, 4).unwrap();
        assert_eq!(moved, Cursor { epoch: 1, batch: 6 });
        let mut resumed = layouts(1, 4, 3);
        resumed.iter_mut().for_each(|l| l.set_cursor(moved).unwrap());
        assert_eq!(step_windows(&mut resumed, 4, 1, 3, 5), want[7..]);
        // Inside a batch of the new layout there is no such position.
        assert_eq!(Cursor { epoch: 0, batch: 1 }.in_reads_of(6, 4), None);
    }

    #[test]
    fn a_restored_cursor_continues_the_identical_sequence() {
        let (_dir, stream) = counting_stream(241); // W = 60, batches of 4 -> 15 per epoch
        let order = Order::Shuffled { seed: 42 };
        let mut original = loader(&stream, 4, 4, order, 0, 1);
        // Save mid-epoch (after 6), at the epoch boundary (after 15) and across it (after 13).
        for save_after in [6, 15, 13] {
            original.set_cursor(Cursor::default()).unwrap();
            (0..save_after).for_each(|_| drop(next_windows(&mut original, 4, 4)));
            let saved: Cursor = serde_json::from_str(&serde_json::to_string(&original.cursor()).unwrap()).unwrap();
            assert_eq!(saved, original.cursor());
            let expected: Vec<_> = (0..20).map(|_| next_windows(&mut original, 4, 4)).collect();

            let mut resumed = loader(&stream, 4, 4, order, 0, 1);
            resumed.set_cursor(saved).unwrap();
            let got: Vec<_> = (0..20).map(|_| next_windows(&mut resumed, 4, 4)).collect();
            assert_eq!(got, expected, "resumed after {save_after} batches");
        }
        assert_eq!(original.cursor(), Cursor { epoch: 2, batch: 3 });
    }

    #[test]
    fn bad_geometry_and_cursors_are_clear_errors() {
        let (_dir, stream) = counting_stream(100);
        let err = |r: Result<Loader, DataError>| r.unwrap_err().to_string();
        // 8 ranks x 2 sequences x 8 tokens + 1 = 129 tokens needed; 100 available.
        let msg = err(Loader::new(stream.clone(), 8, 2, 1, Order::Sequential, 0, 8));
        assert!(msg.contains("at least 129 tokens") && msg.contains("has 100"), "{msg}");
        let msg = err(Loader::new(stream.clone(), 8, 2, 4, Order::Sequential, 0, 2));
        assert!(msg.contains("4 micro-batches") && msg.contains("at least 129 tokens"), "{msg}");
        let msg = err(Loader::new(stream.clone(), 8, 2, 1, Order::Sequential, 2, 2));
        assert!(msg.contains("rank 2") && msg.contains("world size 2"), "{msg}");
        let msg = err(Loader::new(stream.clone(), 0, 2, 1, Order::Sequential, 0, 1));
        assert!(msg.contains("seq_len is 0"), "{msg}");

        let mut l = loader(&stream, 8, 2, Order::Sequential, 0, 1); // 12 windows -> 6 batches
        let msg = l.set_cursor(Cursor { epoch: 0, batch: 6 }).unwrap_err().to_string();
        assert!(msg.contains("6 batches"), "{msg}");
        assert_eq!(l.cursor(), Cursor::default());
        // One step of 2 batches of 5 takes 10 of the 12 windows; no position inside it.
        let mut l = Loader::new(stream.clone(), 8, 5, 2, Order::Sequential, 0, 1).unwrap();
        assert_eq!(l.batches_per_epoch(), 2);
        l.set_cursor(Cursor { epoch: 3, batch: 0 }).unwrap();
        let msg = l.set_cursor(Cursor { epoch: 0, batch: 1 }).unwrap_err().to_string();
        assert!(msg.contains("steps of 2") && msg.contains("grad_accum"), "{msg}");
        assert_eq!(l.cursor(), Cursor { epoch: 3, batch: 0 });
    }
}
