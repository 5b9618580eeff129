//! Token shards in the llm.c / modded-nanogpt format, so shards prepared for those projects
//! load here unchanged and ours load there.
//!
//! Layout (all little-endian):
//! ```text
//! bytes 0..1024   header: 256 x i32
//!                   [0] magic 20240520
//!                   [1] version: 1 = u16 tokens, 2 = u32 tokens
//!                   [2] number of tokens n (so at most i32::MAX tokens per shard)
//!                   [3..256] zero (written as zero; not checked on read, as in llm.c)
//! bytes 1024..    n tokens of 2 (v1) or 4 (v2) bytes each
//! ```
//! A shard is memory-mapped, not read: a run touches only the windows it draws, and all ranks
//! on a machine share one page cache. Opening checks the header and that the file length is
//! exactly `1024 + n * token_bytes`, so a truncated copy is refused up front instead of
//! yielding garbage tokens mid-run. Writing goes through a sibling temporary file, fsync and
//! rename, so a crash never leaves a half-written shard under the final name.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::DataError;

/// Header word 0 of every shard.
pub const MAGIC: i32 = 20240520;
/// Size of the header in bytes (256 little-endian i32).
pub const HEADER_BYTES: usize = 1024;

/// How tokens are stored: the header's version word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardVersion {
    /// Version 1: u16 tokens (vocabularies up to 65536, e.g. GPT-2's 50257).
    V1,
    /// Version 2: u32 tokens (larger vocabularies, e.g. Llama 3's 128256).
    V2,
}

impl ShardVersion {
    /// Bytes per stored token.
    pub fn token_bytes(self) -> usize {
        match self {
            Self::V1 => 2,
            Self::V2 => 4,
        }
    }

    fn number(self) -> i32 {
        match self {
            Self::V1 => 1,
            Self::V2 => 2,
        }
    }
}

/// A memory-mapped, validated token shard.
#[derive(Debug)]
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    version: ShardVersion,
    len: usize,
}

impl Shard {
    /// Maps `path` and checks its header and length (see the module docs).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| DataError::io("open token shard", path, e))?;
        let meta = file.metadata().map_err(|e| DataError::io("stat token shard", path, e))?;
        if !meta.is_file() {
            return Err(DataError::format(path, "is not a regular file; a token shard must be one"));
        }
        let actual = meta.len();
        if actual < HEADER_BYTES as u64 {
            return Err(DataError::format(
                path,
                format!("file is {actual} bytes, shorter than the {HEADER_BYTES}-byte token shard header"),
            ));
        }
        // SAFETY: the map is read-only. If another process truncates
        // or rewrites the file while it is mapped, reads may see the new bytes or fault; shards
        // are write-once inputs (write_shard renames complete files into place), so we accept that.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io("memory-map token shard", path, e))?;
        let header = map[..HEADER_BYTES].as_chunks::<4>().0;
        let word = |i: usize| i32::from_le_bytes(header[i]);

        let magic = word(0);
        if magic == crate::mask::MASK_MAGIC {
            return Err(DataError::format(
                path,
                "is a loss mask, which is read beside its shard (the .bin of the same name), not as a shard: \
                 let the data patterns name the .bin files only",
            ));
        }
        if magic != MAGIC {
            return Err(DataError::format(
                path,
                format!("header int 0 (magic) is {magic}, expected {MAGIC}: not an llm.c token shard"),
            ));
        }
        let version = match word(1) {
            1 => ShardVersion::V1,
            2 => ShardVersion::V2,
            v => {
                return Err(DataError::format(
                    path,
                    format!("header int 1 (version) is {v}; valid: 1 (uint16 tokens) or 2 (uint32 tokens)"),
                ));
            }
        };
        let n = word(2);
        let len = usize::try_from(n)
            .map_err(|_| DataError::format(path, format!("header int 2 (token count) is {n}; it must be >= 0")))?;
        let expected = HEADER_BYTES as u64 + len as u64 * version.token_bytes() as u64;
        if actual != expected {
            let what = if actual < expected { "truncated" } else { "too long" };
            return Err(DataError::format(
                path,
                format!(
                    "file is {what}: the header says {len} tokens of {} bytes, so the file should be \
                     {expected} bytes, but it is {actual} bytes",
                    version.token_bytes()
                ),
            ));
        }
        Ok(Self { path: path.to_path_buf(), map, version, len })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn version(&self) -> ShardVersion {
        self.version
    }

    /// Token `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn get(&self, i: usize) -> u32 {
        let mut out = [0];
        self.read(i, &mut out);
        out[0]
    }

    /// Copies tokens `start .. start + out.len()` into `out`.
    ///
    /// # Panics
    /// If the range runs past `self.len()` (a caller bug: ranges come from `len()`).
    pub fn read(&self, start: usize, out: &mut [u32]) {
        let end = start.checked_add(out.len()).filter(|&end| end <= self.len);
        let Some(end) = end else {
            panic!(
                "read of {} tokens at {start} past the end of {} ({} tokens)",
                out.len(),
                self.path.display(),
                self.len
            )
        };
        let width = self.version.token_bytes();
        let bytes = &self.map[HEADER_BYTES + start * width..HEADER_BYTES + end * width];
        // Fixed-size chunks zipped with `out`: no bounds checks in the loop, and it vectorizes.
        match self.version {
            ShardVersion::V1 => {
                for (o, c) in out.iter_mut().zip(bytes.as_chunks::<2>().0) {
                    *o = u16::from_le_bytes(*c).into();
                }
            }
            ShardVersion::V2 => {
                for (o, c) in out.iter_mut().zip(bytes.as_chunks::<4>().0) {
                    *o = u32::from_le_bytes(*c);
                }
            }
        }
    }
}

/// Writes `tokens` as a shard at `path`, atomically (sibling `<name>.tmp`, fsync, rename).
///
/// `version: None` picks V1 when every token is below 65536 (half the disk and page cache),
/// else V2. Asking for V1 with a larger token is an error, as is more than `i32::MAX` tokens
/// (the header stores the count as an i32).
pub fn write_shard(path: impl AsRef<Path>, tokens: &[u32], version: Option<ShardVersion>) -> Result<(), DataError> {
    let path = path.as_ref();
    let max = tokens.iter().copied().max().unwrap_or(0);
    let version = version.unwrap_or(if max <= u16::MAX as u32 { ShardVersion::V1 } else { ShardVersion::V2 });
    if version == ShardVersion::V1
        && let Some(i) = tokens.iter().position(|&t| t > u16::MAX as u32)
    {
        return Err(DataError::Invalid(format!(
            "cannot write {}: token {} at index {i} does not fit a version-1 (uint16) shard; \
             use version 2 or let write_shard choose",
            path.display(),
            tokens[i]
        )));
    }
    let count = i32::try_from(tokens.len()).map_err(|_| {
        DataError::Invalid(format!(
            "cannot write {}: {} tokens is more than one shard holds ({}); split them over several shards",
            path.display(),
            tokens.len(),
            i32::MAX
        ))
    })?;
    let name = path.file_name().ok_or_else(|| {
        DataError::Invalid(format!("cannot write a token shard to {}: the path names no file", path.display()))
    })?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);

    let result = write_file(&tmp, tokens, version, count)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| DataError::io("rename temporary shard into", path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // Persist the rename itself: fsync the directory that holds the new entry.
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| DataError::io("sync directory", dir, e))
}

fn write_file(tmp: &Path, tokens: &[u32], version: ShardVersion, count: i32) -> Result<(), DataError> {
    let io = |e| DataError::io("write token shard", tmp, e);
    let file = File::create(tmp).map_err(io)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut header = [0i32; HEADER_BYTES / 4];
    header[..3].copy_from_slice(&[MAGIC, version.number(), count]);
    for word in header {
        out.write_all(&word.to_le_bytes()).map_err(io)?;
    }
    for &t in tokens {
        match version {
            ShardVersion::V1 => out.write_all(&(t as u16).to_le_bytes()),
            ShardVersion::V2 => out.write_all(&t.to_le_bytes()),
        }
        .map_err(io)?;
    }
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_v1_and_v2_with_automatic_version() {
        let dir = tempfile::tempdir().unwrap();
        let small = [0, 1, 50256, 65535, 7];
        write_shard(dir.path().join("a.bin"), &small, None).unwrap();
        let a = Shard::open(dir.path().join("a.bin")).unwrap();
        assert_eq!(a.version(), ShardVersion::V1);
        assert_eq!(std::fs::metadata(dir.path().join("a.bin")).unwrap().len(), 1024 + 2 * 5);
        let mut out = [9; 5];
        a.read(0, &mut out);
        assert_eq!(out, small);

        let large = [0, 65535, 65536, 128_255, u32::MAX];
        write_shard(dir.path().join("b.bin"), &large, None).unwrap();
        let b = Shard::open(dir.path().join("b.bin")).unwrap();
        assert_eq!(b.version(), ShardVersion::V2);
        assert_eq!(b.len(), 5);
        assert_eq!((0..5).map(|i| b.get(i)).collect::<Vec<_>>(), large);
        let mut mid = [0; 2];
        b.read(2, &mut mid);
        assert_eq!(mid, [65536, 128_255]);

        write_shard(dir.path().join("c.bin"), &small, Some(ShardVersion::V2)).unwrap();
        let c = Shard::open(dir.path().join("c.bin")).unwrap();
        assert_eq!((c.version(), c.get(3)), (ShardVersion::V2, 65535));

        write_shard(dir.path().join("empty.bin"), &[], None).unwrap();
        assert!(Shard::open(dir.path().join("empty.bin")).unwrap().is_empty());
        assert!(!dir.path().join("a.bin.tmp").exists(), "temporary file left behind");
    }

    #[test]
    fn v1_overflow_is_an_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_shard(dir.path().join("x.bin"), &[1, 65536], Some(ShardVersion::V1)).unwrap_err().to_string();
        assert!(err.contains("x.bin") && err.contains("65536") && err.contains("index 1"), "{err}");
        assert!(!dir.path().join("x.bin").exists() && !dir.path().join("x.bin.tmp").exists());
    }

    /// The bytes llm.c's `dev/data/data_common.py::write_datafile` produces, built by hand:
    /// `header = np.zeros(256, dtype=np.int32); header[0..3] = 20240520, 1, len(toks)`,
    /// `f.write(header.tobytes()); f.write(np.array(toks, dtype=np.uint16).tobytes())`.
    #[test]
    fn loads_a_shard_laid_out_like_llm_c_write_datafile() {
        let dir = tempfile::tempdir().unwrap();
        let toks: [u16; 6] = [50256, 15496, 11, 995, 0, 65535];
        let mut bytes = Vec::new();
        let mut header = [0i32; 256];
        header[0] = 20240520;
        header[1] = 1;
        header[2] = toks.len() as i32;
        header.iter().for_each(|h| bytes.extend_from_slice(&h.to_le_bytes()));
        toks.iter().for_each(|t| bytes.extend_from_slice(&t.to_le_bytes()));
        std::fs::write(dir.path().join("fineweb_train_000001.bin"), &bytes).unwrap();

        let shard = Shard::open(dir.path().join("fineweb_train_000001.bin")).unwrap();
        assert_eq!(shard.version(), ShardVersion::V1);
        let mut out = vec![0; shard.len()];
        shard.read(0, &mut out);
        assert_eq!(out, toks.map(u32::from));
    }

    fn open_err(path: &Path) -> String {
        Shard::open(path).unwrap_err().to_string()
    }

    fn assert_contains(message: &str, parts: &[&str]) {
        for part in parts {
            assert!(message.contains(part), "`{message}` lacks `{part}`");
        }
    }

    #[test]
    fn damaged_shards_are_refused_with_the_path_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        write_shard(dir.path().join("good.bin"), &[1, 2, 3, 4], Some(ShardVersion::V1)).unwrap();
        let good = std::fs::read(dir.path().join("good.bin")).unwrap();
        let variant = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = good.clone();
            edit(&mut bytes);
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            open_err(&path)
        };

        let err = variant("truncated.bin", &|b| b.truncate(b.len() - 1));
        assert_contains(&err, &["truncated.bin", "truncated", "1032 bytes", "1031 bytes"]);
        let err = variant("long.bin", &|b| b.extend_from_slice(&[0, 0]));
        assert_contains(&err, &["long.bin", "too long", "1032 bytes", "1034 bytes"]);
        let err = variant("magic.bin", &|b| b[..4].copy_from_slice(&20240521i32.to_le_bytes()));
        assert_contains(&err, &["magic.bin", "20240521", "20240520"]);
        let err = variant("version.bin", &|b| b[4..8].copy_from_slice(&3i32.to_le_bytes()));
        assert_contains(&err, &["version.bin", "version) is 3", "1 (uint16 tokens) or 2 (uint32 tokens)"]);
        let err = variant("negative.bin", &|b| b[8..12].copy_from_slice(&(-4i32).to_le_bytes()));
        assert_contains(&err, &["negative.bin", "-4"]);
        let err = variant("short.bin", &|b| b.truncate(100));
        assert_contains(&err, &["short.bin", "100 bytes", "1024-byte"]);
        let err = open_err(&dir.path().join("missing.bin"));
        assert_contains(&err, &["missing.bin", "cannot open"]);
        let err = open_err(dir.path());
        assert_contains(&err, &[&dir.path().display().to_string(), "not a regular file"]);
    }
}
