//! Loss masks: which tokens of a shard are learned as targets. Fine-tuning on prompt–completion
//! pairs learns each completion (and the end-of-text after it) but not its prompt, which is
//! context only; `data prepare --completion-field` writes such a mask beside each shard.
//!
//! The mask of shard `X.bin` is `X.mask` (all little-endian):
//! ```text
//! bytes 0..1024   header: 256 x i32
//!                   [0] magic 20261208
//!                   [1] version 1
//!                   [2] number of tokens n (the shard's)
//!                   [3..256] zero
//! bytes 1024..    ceil(n / 8) bytes: bit i % 8 of byte i / 8 (least significant first) is 1
//!                 where token i is learned when it is a target
//! ```
//! Memory-mapped like the shard, and checked the same way: magic, version, and a length of
//! exactly `1024 + ceil(n / 8)` with n the shard's token count. Written atomically.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use ondol_core::IGNORED_TARGET;

use crate::DataError;
use crate::prepare::write_atomic;
use crate::shard::HEADER_BYTES;

/// Header word 0 of every loss mask.
pub const MASK_MAGIC: i32 = 20261208;
const MASK_VERSION: i32 = 1;

/// A memory-mapped, validated loss mask.
#[derive(Debug)]
pub struct LossMask {
    map: Mmap,
    len: usize,
}

impl LossMask {
    /// Where the mask of the shard at `shard` lives: the same name with the extension `mask`.
    pub fn path_for(shard: &Path) -> PathBuf {
        shard.with_extension("mask")
    }

    /// The mask beside `shard` (a shard of `tokens` tokens), if there is one.
    pub fn beside(shard: &Path, tokens: usize) -> Result<Option<Self>, DataError> {
        let path = Self::path_for(shard);
        if !path.exists() {
            return Ok(None);
        }
        Self::open(&path, tokens).map(Some)
    }

    /// Maps `path` and checks that it is the mask of a shard of `tokens` tokens.
    pub fn open(path: &Path, tokens: usize) -> Result<Self, DataError> {
        let file = File::open(path).map_err(|e| DataError::io("open loss mask", path, e))?;
        // SAFETY: the mapping is read-only; like the shards, masks are not modified while a run
        // reads them (they are written to a temporary name and renamed into place).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io("map loss mask", path, e))?;
        let bad = |what: String| DataError::format(path, what);
        if map.len() < HEADER_BYTES {
            return Err(bad(format!("{} bytes is shorter than the {HEADER_BYTES}-byte header", map.len())));
        }
        let word = |i: usize| i32::from_le_bytes(map[4 * i..4 * i + 4].try_into().expect("4 bytes"));
        if word(0) != MASK_MAGIC {
            return Err(bad(format!("magic {} is not a loss mask's ({MASK_MAGIC})", word(0))));
        }
        if word(1) != MASK_VERSION {
            return Err(bad(format!("version {} is not one this ondol reads ({MASK_VERSION})", word(1))));
        }
        if usize::try_from(word(2)).ok() != Some(tokens) {
            return Err(bad(format!(
                "it masks {} tokens, but its shard {} holds {tokens}; prepare the data again",
                word(2),
                path.with_extension("bin").display()
            )));
        }
        let want = HEADER_BYTES + tokens.div_ceil(8);
        if map.len() != want {
            return Err(bad(format!(
                "{} bytes, but a mask of {tokens} tokens has {want} (truncated or damaged)",
                map.len()
            )));
        }
        Ok(Self { map, len: tokens })
    }

    fn bits(&self) -> &[u8] {
        &self.map[HEADER_BYTES..]
    }

    /// Whether token `i` is learned as a target.
    pub fn learned(&self, i: usize) -> bool {
        assert!(i < self.len, "token {i} of a {}-token mask", self.len);
        self.bits()[i / 8] >> (i % 8) & 1 == 1
    }

    /// How many of tokens `start .. start + len` are learned (a population count: every
    /// rank counts the targets of the whole read, every step).
    pub fn count_learned(&self, start: usize, len: usize) -> usize {
        let end = start + len;
        assert!(end <= self.len, "tokens {start}..{end} of a {}-token mask", self.len);
        if len == 0 {
            return 0;
        }
        let bytes = &self.bits()[start / 8..end.div_ceil(8)];
        let whole: u32 = bytes.iter().map(|b| b.count_ones()).sum();
        // Less the bits before `start` in the first byte and from `end` on in the last.
        let before = (bytes[0] & ((1u16 << (start % 8)) - 1) as u8).count_ones();
        let after = if end.is_multiple_of(8) { 0 } else { (bytes[bytes.len() - 1] >> (end % 8)).count_ones() };
        (whole - before - after) as usize
    }

    /// Replaces each of `targets` (tokens `start ..` of the shard) that is not learned by
    /// [`IGNORED_TARGET`].
    pub fn apply(&self, start: usize, targets: &mut [u32]) {
        for (i, t) in targets.iter_mut().enumerate() {
            if !self.learned(start + i) {
                *t = IGNORED_TARGET;
            }
        }
    }
}

/// Writes the mask of a shard whose token `i` is learned where `learned[i]` (see the module
/// docs), atomically.
pub fn write_mask(path: &Path, learned: &[bool]) -> Result<(), DataError> {
    let count = i32::try_from(learned.len()).map_err(|_| {
        DataError::Invalid(format!(
            "cannot write {}: {} tokens is more than a mask holds",
            path.display(),
            learned.len()
        ))
    })?;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + learned.len().div_ceil(8));
    let mut header = [0i32; HEADER_BYTES / 4];
    header[..3].copy_from_slice(&[MASK_MAGIC, MASK_VERSION, count]);
    for word in header {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    bytes.extend(learned.chunks(8).map(|bits| bits.iter().rev().fold(0u8, |byte, &b| byte << 1 | u8::from(b))));
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_reads_back_the_bits_written_and_refuses_another_shards_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train_000000.mask");
        let learned: Vec<bool> = (0..21).map(|i| i % 3 == 1 || i > 17).collect();
        write_mask(&path, &learned).unwrap();
        let mask = LossMask::open(&path, learned.len()).unwrap();
        assert_eq!((0..21).map(|i| mask.learned(i)).collect::<Vec<_>>(), learned);
        for start in 0..=21 {
            for len in 0..=21 - start {
                let want = learned[start..start + len].iter().filter(|&&b| b).count();
                assert_eq!(mask.count_learned(start, len), want, "{start}..{}", start + len);
            }
        }
        let mut targets = vec![5u32; 4];
        mask.apply(3, &mut targets);
        assert_eq!(targets, [IGNORED_TARGET, 5, IGNORED_TARGET, IGNORED_TARGET]);
        let err = LossMask::open(&path, 22).unwrap_err().to_string();
        assert!(err.contains("train_000000.mask") && err.contains("masks 21 tokens"), "{err}");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let err = LossMask::open(&path, 21).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
