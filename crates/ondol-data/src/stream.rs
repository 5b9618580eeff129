//! [`TokenStream`]: the training (or validation) data as one long sequence of tokens, read by
//! global token index.
//!
//! A stream is a list of sources concatenated in the order given: token shards (memory-mapped)
//! or raw UTF-8 text files (read whole, byte-tokenized, each one document closed by
//! end-of-text). Internally it is a list of parts, each a token range of a shared source
//! (`Arc`), so [`TokenStream::split_tail`] can cut every source into a training head and a
//! validation tail without copying or re-mapping anything.
//!
//! [`expand_globs`] turns the data patterns of a run config into the file list.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::mask::LossMask;
use crate::{ByteTokenizer, DataError, Shard};

/// What each file given to [`TokenStream::open`] contains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// Token shards in the llm.c format (see [`crate::shard`]).
    Shards,
    /// Raw UTF-8 text; each file is one document, tokenized by [`ByteTokenizer`].
    ByteText,
}

#[derive(Debug)]
enum Source {
    /// A shard, and the loss mask beside it where there is one.
    Shard(Shard, Option<LossMask>),
    /// The file's bytes; its tokens are these bytes followed by one end-of-text. Kept as
    /// bytes, not tokens, to hold a quarter of the memory.
    Text { path: PathBuf, bytes: Vec<u8> },
}

impl Source {
    fn len(&self) -> usize {
        match self {
            Self::Shard(shard, _) => shard.len(),
            Self::Text { bytes, .. } => bytes.len() + 1,
        }
    }

    fn mask(&self) -> Option<&LossMask> {
        match self {
            Self::Shard(_, mask) => mask.as_ref(),
            Self::Text { .. } => None,
        }
    }

    fn path(&self) -> &Path {
        match self {
            Self::Shard(shard, _) => shard.path(),
            Self::Text { path, .. } => path,
        }
    }

    /// Tokens `start .. start + out.len()`, which the caller keeps within `len()`.
    fn read(&self, start: usize, out: &mut [u32]) {
        match self {
            Self::Shard(shard, _) => shard.read(start, out),
            Self::Text { bytes, .. } => {
                let body = &bytes[start.min(bytes.len())..];
                let n = body.len().min(out.len());
                for (o, &b) in out.iter_mut().zip(&body[..n]) {
                    *o = b.into();
                }
                out[n..].fill(ByteTokenizer::EOT); // at most one token: the end-of-text
            }
        }
    }
}

/// Tokens `offset .. offset + len` of one source.
#[derive(Clone, Debug)]
struct Part {
    source: Arc<Source>,
    offset: usize,
    len: usize,
}

/// Several token sources read as one sequence; see the module docs.
#[derive(Debug)]
pub struct TokenStream {
    parts: Vec<Part>,
    /// `starts[i]` is the global index of part `i`'s first token; the last entry is `len()`.
    starts: Vec<usize>,
}

impl TokenStream {
    /// Opens `files` in order as sources of `kind`.
    pub fn open(files: &[PathBuf], kind: SourceKind) -> Result<Self, DataError> {
        if files.is_empty() {
            return Err(DataError::Invalid("no data files given: a token stream needs at least one".into()));
        }
        let parts = files
            .iter()
            .map(|path| {
                let source = match kind {
                    SourceKind::Shards => {
                        let shard = Shard::open(path)?;
                        let mask = LossMask::beside(path, shard.len())?;
                        Source::Shard(shard, mask)
                    }
                    SourceKind::ByteText => Source::Text { path: path.clone(), bytes: read_utf8(path)? },
                };
                Ok(Part { offset: 0, len: source.len(), source: Arc::new(source) })
            })
            .collect::<Result<_, DataError>>()?;
        Ok(Self::from_parts(parts))
    }

    /// The streams one after the other, as one.
    pub fn concat(streams: impl IntoIterator<Item = TokenStream>) -> Self {
        Self::from_parts(streams.into_iter().flat_map(|s| s.parts).collect())
    }

    fn from_parts(parts: Vec<Part>) -> Self {
        let parts: Vec<Part> = parts.into_iter().filter(|p| p.len > 0).collect();
        let mut starts = Vec::with_capacity(parts.len() + 1);
        let mut total = 0;
        for part in &parts {
            starts.push(total);
            total += part.len;
        }
        starts.push(total);
        Self { parts, starts }
    }

    /// The files the stream reads, in order (a file split in parts, once).
    pub fn files(&self) -> Vec<&Path> {
        let mut files: Vec<&Path> = self.parts.iter().map(|p| p.source.path()).collect();
        files.dedup();
        files
    }

    /// Total number of tokens.
    pub fn len(&self) -> usize {
        self.starts[self.starts.len() - 1]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether some source has a loss mask (see [`crate::mask`]): then not every target is
    /// learned.
    pub fn has_masks(&self) -> bool {
        self.parts.iter().any(|p| p.source.mask().is_some())
    }

    /// Copies tokens `start .. start + out.len()` into `out`, across source boundaries.
    ///
    /// # Panics
    /// If the range runs past `self.len()` (a caller bug: ranges come from `len()`).
    pub fn read(&self, start: usize, out: &mut [u32]) {
        self.for_each_piece(start, out.len(), |source, at, range| source.read(at, &mut out[range]));
    }

    /// [`Self::read`] for targets: a token its source's loss mask does not learn reads as
    /// [`ondol_core::IGNORED_TARGET`].
    pub fn read_targets(&self, start: usize, out: &mut [u32]) {
        self.for_each_piece(start, out.len(), |source, at, range| {
            source.read(at, &mut out[range.clone()]);
            if let Some(mask) = source.mask() {
                mask.apply(at, &mut out[range]);
            }
        });
    }

    /// How many of tokens `start .. start + len` are learned as targets.
    pub fn count_learned(&self, start: usize, len: usize) -> usize {
        let mut learned = 0;
        self.for_each_piece(start, len, |source, at, range| {
            learned += source.mask().map_or(range.len(), |mask| mask.count_learned(at, range.len()));
        });
        learned
    }

    /// Calls `f(source, index in the source, range of 0..len)` for each source's piece of
    /// tokens `start .. start + len`, in order.
    fn for_each_piece(&self, start: usize, len: usize, mut f: impl FnMut(&Source, usize, std::ops::Range<usize>)) {
        let in_range = start.checked_add(len).is_some_and(|end| end <= self.len());
        assert!(in_range, "read of {len} tokens at {start} past the end of a {}-token stream", self.len());
        if len == 0 {
            return;
        }
        // The part holding `start`: the last one that starts at or before it.
        let mut i = self.starts.partition_point(|&s| s <= start) - 1;
        let (mut local, mut done) = (start - self.starts[i], 0);
        while done < len {
            let part = &self.parts[i];
            let n = (part.len - local).min(len - done);
            f(&part.source, part.offset + local, done..done + n);
            done += n;
            local = 0;
            i += 1;
        }
    }

    /// The file holding token `index` of the stream, and that token's index within the file.
    ///
    /// # Panics
    /// If `index >= self.len()` (a caller bug).
    pub fn origin(&self, index: usize) -> (&Path, usize) {
        assert!(index < self.len(), "token {index} past the end of a {}-token stream", self.len());
        let i = self.starts.partition_point(|&s| s <= index) - 1;
        let part = &self.parts[i];
        (part.source.path(), part.offset + index - self.starts[i])
    }

    /// Splits off the last `fraction` of every source's tokens (rounded to the nearest token)
    /// as a validation stream: returns `(train, val)` with train = the heads, val = the tails,
    /// each in source order. For runs without separate validation files; holding out a tail
    /// of each source keeps every source represented in validation. Both halves share the
    /// sources. `fraction` must be in [0, 1).
    pub fn split_tail(self, fraction: f64) -> Result<(TokenStream, TokenStream), DataError> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(DataError::Invalid(format!(
                "validation fraction {fraction} is out of range: it must be in [0, 1)"
            )));
        }
        let (heads, tails) = self
            .parts
            .into_iter()
            .map(|part| {
                let tail = (part.len as f64 * fraction).round() as usize;
                let head_len = part.len - tail;
                let head = Part { len: head_len, ..part.clone() };
                (head, Part { offset: part.offset + head_len, len: tail, ..part })
            })
            .unzip();
        Ok((Self::from_parts(heads), Self::from_parts(tails)))
    }
}

fn read_utf8(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io("read text file", path, e))?;
    if let Err(e) = std::str::from_utf8(&bytes) {
        return Err(DataError::format(
            path,
            format!(
                "invalid UTF-8 at byte offset {}: byte-level text sources must be UTF-8 \
                 (convert the file, or tokenize it into shards)",
                e.valid_up_to()
            ),
        ));
    }
    Ok(bytes)
}

/// What tells files apart: the canonical path where the file exists (`./x` and `x`, or a
/// link and its target, are one file), else the path as given.
pub fn file_identity(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Expands data file patterns (`data/fineweb_train_*.bin`) into files.
///
/// Relative patterns are resolved against `base` (the directory of the run config); each
/// pattern must match at least one file. Matches of one pattern are sorted, patterns keep
/// their order, and a file matched twice (however spelled: `./x` is `x`) is kept at its first
/// place. A pattern that names an existing file is that file, glob characters and all.
pub fn expand_globs(patterns: &[String], base: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut seen = HashSet::new();
    let mut files = Vec::new();
    for pattern in patterns {
        let pattern_error = |message: String| DataError::Pattern { pattern: pattern.clone(), message };
        let full = if Path::new(pattern).is_absolute() {
            pattern.clone()
        } else {
            let base = base
                .to_str()
                .ok_or_else(|| pattern_error(format!("the base directory {} is not valid UTF-8", base.display())))?;
            // Escaped, so a base directory named like `runs/[ablation]` matches literally.
            format!("{}/{pattern}", glob::Pattern::escape(base))
        };
        // A file named like a glob (`notes [1].txt`) is that file.
        let literal = base.join(pattern);
        if literal.is_file() {
            if seen.insert(file_identity(&literal)) {
                files.push(literal);
            }
            continue;
        }
        let paths = glob::glob(&full).map_err(|e| pattern_error(format!("invalid pattern: {e}")))?;
        let (mut matched, mut dirs) = (Vec::new(), 0);
        for entry in paths {
            let path = entry.map_err(|e| {
                let dir = e.path().to_path_buf();
                DataError::io("read directory", dir, e.into())
            })?;
            if path.is_file() {
                matched.push(path);
            } else if path.is_dir() {
                dirs += 1;
            }
        }
        if matched.is_empty() && dirs > 0 {
            return Err(pattern_error(format!(
                "matches only directories ({dirs}), no file: give their files, or a glob like {pattern}/*"
            )));
        }
        if matched.is_empty() {
            return Err(pattern_error(format!("matches no file (searched {full})")));
        }
        matched.sort();
        files.extend(matched.into_iter().filter(|p| seen.insert(file_identity(p))));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write_shard;

    fn all(stream: &TokenStream) -> Vec<u32> {
        let mut out = vec![0; stream.len()];
        stream.read(0, &mut out);
        out
    }

    #[test]
    fn reads_across_sources_and_splits_tails() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = ["a.bin", "b.bin", "c.bin", "d.bin"].iter().map(|n| dir.path().join(n)).collect();
        write_shard(&files[0], &(0..10).collect::<Vec<_>>(), None).unwrap();
        write_shard(&files[1], &[], None).unwrap();
        write_shard(&files[2], &[100, 101, 70_000], None).unwrap();
        write_shard(&files[3], &(200..220).collect::<Vec<_>>(), None).unwrap();
        let stream = TokenStream::open(&files, SourceKind::Shards).unwrap();
        let expected: Vec<u32> = (0..10).chain([100, 101, 70_000]).chain(200..220).collect();
        assert_eq!(stream.len(), 33);
        assert_eq!(all(&stream), expected);
        for start in 0..33 {
            for len in 0..=33 - start {
                let mut out = vec![0; len];
                stream.read(start, &mut out);
                assert_eq!(out, expected[start..start + len], "start {start} len {len}");
            }
        }

        let (train, val) = stream.split_tail(0.2).unwrap();
        // Tails: round(10 * 0.2) = 2, round(3 * 0.2) = 1, round(20 * 0.2) = 4.
        assert_eq!(all(&train), (0..8).chain([100, 101]).chain(200..216).collect::<Vec<_>>());
        assert_eq!(all(&val), [8, 9, 70_000, 216, 217, 218, 219]);
        // Each token's file and index in it, for the tails too (parts that start inside a file).
        let origins = |s: &TokenStream| -> Vec<(PathBuf, usize)> {
            (0..s.len()).map(|i| (s.origin(i).0.to_path_buf(), s.origin(i).1)).collect()
        };
        let at = |f: usize, i: std::ops::Range<usize>| -> Vec<(PathBuf, usize)> {
            i.map(|i| (files[f].clone(), i)).collect()
        };
        assert_eq!(origins(&val), [at(0, 8..10), at(2, 2..3), at(3, 16..20)].concat());
        assert_eq!(origins(&train), [at(0, 0..8), at(2, 0..2), at(3, 0..16)].concat());
        // Two sources' tails, concatenated, are one stream's over the same files.
        let first = TokenStream::open(&files[..2], SourceKind::Shards).unwrap().split_tail(0.2).unwrap().1;
        let second = TokenStream::open(&files[2..], SourceKind::Shards).unwrap().split_tail(0.2).unwrap().1;
        let both = TokenStream::concat([first, second]);
        assert_eq!((all(&both), origins(&both)), (all(&val), origins(&val)));
        let (train_again, none) = train.split_tail(0.0).unwrap();
        assert_eq!((train_again.len(), none.len()), (26, 0));
        for bad in [1.0, -0.1, f64::NAN] {
            let stream = TokenStream::open(&files, SourceKind::Shards).unwrap();
            let err = stream.split_tail(bad).err().unwrap().to_string();
            assert!(err.contains("[0, 1)"), "{err}");
        }
    }

    #[test]
    fn byte_text_files_are_documents_closed_by_end_of_text() {
        let dir = tempfile::tempdir().unwrap();
        let korean = "제1조 ① 대한민국은 민주공화국이다.\n";
        std::fs::write(dir.path().join("ko.txt"), korean).unwrap();
        std::fs::write(dir.path().join("en.txt"), "Hi").unwrap();
        let stream =
            TokenStream::open(&[dir.path().join("ko.txt"), dir.path().join("en.txt")], SourceKind::ByteText).unwrap();
        assert_eq!(stream.len(), korean.len() + 1 + 2 + 1);
        let tokens = all(&stream);
        let eot = ByteTokenizer::EOT;
        assert_eq!((tokens[korean.len()], tokens[tokens.len() - 1]), (eot, eot));
        assert_eq!(ByteTokenizer::with_eot_marker("|").decode(&tokens), format!("{korean}|Hi|"));

        // A read that starts inside a document and ends on its end-of-text.
        let mut tail = [0; 3];
        stream.read(korean.len() - 2, &mut tail);
        assert_eq!(tail, [b'.'.into(), b'\n'.into(), eot]);
    }

    #[test]
    fn invalid_utf8_is_refused_with_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = "한글".as_bytes().to_vec();
        bytes.extend_from_slice(&[b'x', 0xFF, b'y']);
        std::fs::write(dir.path().join("bad.txt"), bytes).unwrap();
        let err = TokenStream::open(&[dir.path().join("bad.txt")], SourceKind::ByteText).unwrap_err().to_string();
        assert!(err.contains("bad.txt") && err.contains("byte offset 7"), "{err}");
        let err = TokenStream::open(&[dir.path().join("none.txt")], SourceKind::ByteText).unwrap_err().to_string();
        assert!(err.contains("none.txt"), "{err}");
        let err = TokenStream::open(&[], SourceKind::Shards).unwrap_err().to_string();
        assert!(err.contains("no data files"), "{err}");
    }

    #[test]
    fn globs_resolve_sort_dedup_and_name_missing_patterns() {
        // A base directory with glob metacharacters in its name must match literally.
        let dir = tempfile::Builder::new().prefix("globs[1]").tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        for name in ["train_002.bin", "train_001.bin", "val_000.bin", "sub/train_003.bin", "notes [1].bin"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let patterns = |ps: &[&str]| ps.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        let absolute = format!("{}/val_*.bin", glob::Pattern::escape(dir.path().to_str().unwrap()));
        let spelled = ["./train_001.bin", "*/*.bin", "notes [1].bin", "sub/../train_002.bin"];
        let files =
            expand_globs(&patterns(&[&[absolute.as_str(), "train_*.bin"], &spelled[..]].concat()), dir.path()).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.strip_prefix(dir.path()).unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["val_000.bin", "train_001.bin", "train_002.bin", "sub/train_003.bin", "notes [1].bin"]);

        let err = expand_globs(&patterns(&["train_*.bin", "fineweb_*.bin"]), dir.path()).unwrap_err().to_string();
        assert!(err.contains("`fineweb_*.bin`") && err.contains("matches no file"), "{err}");
        let err = expand_globs(&patterns(&["train_[.bin"]), dir.path()).unwrap_err().to_string();
        assert!(err.contains("`train_[.bin`") && err.contains("invalid pattern"), "{err}");
    }
}
