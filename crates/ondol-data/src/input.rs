//! Reading raw corpora as documents: plain text (one document per file, or blank-line separated)
//! and JSON Lines (one document per line, text under a configurable field), each optionally
//! compressed with gzip (`.gz`) or zstd (`.zst`).
//!
//! Reading is streaming and sequential: [`DocReader`] yields [`RawDoc`]s (bytes not yet checked
//! as UTF-8 or parsed as JSON, so that the expensive checks run in parallel downstream with
//! [`RawDoc::into_text`]) and [`Problem`]s (an input that cannot be opened or read, an empty
//! file), each naming the file and line. Memory: one document at a time (a whole file in
//! `file` mode, one line or paragraph otherwise) plus a 256 KiB read buffer.
//!
//! While reading, every input's raw (still compressed) bytes are counted and hashed (SHA-256),
//! so the manifest can name exactly what went in without a second pass over the files.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::DataError;

/// How a plain-text file is cut into documents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DocSplit {
    /// The whole file is one document.
    #[default]
    File,
    /// Documents are separated by one or more blank lines.
    BlankLine,
}

impl std::str::FromStr for DocSplit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "file" => Ok(Self::File),
            "blank-line" => Ok(Self::BlankLine),
            other => Err(format!("`{other}` is not a document split; valid: file, blank-line")),
        }
    }
}

/// How inputs are read; the format of each file follows its name (see [`InputFormat::of`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct InputOptions {
    pub doc_split: DocSplit,
    /// The JSON Lines field that holds a document's text (a pair's prompt).
    pub text_field: String,
    /// Where given, every document is a prompt–completion pair: the prompt in `text_field`,
    /// the completion in this field (JSON Lines only).
    pub completion_field: Option<String>,
    /// Where given, every document is a conversation: a list of messages in this field (JSON
    /// Lines only).
    pub messages_field: Option<String>,
}

impl Default for InputOptions {
    fn default() -> Self {
        Self { doc_split: DocSplit::File, text_field: "text".into(), completion_field: None, messages_field: None }
    }
}

/// What an input file holds, from its name: `*.jsonl`, `*.ndjson`, `*.json` (each optionally
/// followed by `.gz` or `.zst`) are JSON Lines, everything else plain text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    Text,
    JsonLines,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

impl InputFormat {
    pub fn of(path: &Path) -> Self {
        let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        let name = name.strip_suffix(".gz").or_else(|| name.strip_suffix(".zst")).unwrap_or(&name);
        if [".jsonl", ".ndjson", ".json"].iter().any(|ext| name.ends_with(ext)) { Self::JsonLines } else { Self::Text }
    }
}

fn compression_of(path: &Path) -> Compression {
    match path.extension().and_then(|e| e.to_str()) {
        Some("gz") => Compression::Gzip,
        Some("zst") => Compression::Zstd,
        _ => Compression::None,
    }
}

/// Something wrong with one input, located by file and line (line 0: the file as a whole).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub path: PathBuf,
    pub line: u64,
    /// A key that counts problems of one kind in the report: `unreadable`, `empty_file`,
    /// `invalid_utf8`, `malformed_json`.
    pub kind: &'static str,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.message)
    }
}

/// One document as read: its bytes, where it came from, and how to turn it into text.
#[derive(Debug)]
pub struct RawDoc {
    /// Index of the input file in the list given to [`DocReader::new`].
    pub input: usize,
    /// 1-based line where the document starts.
    pub line: u64,
    pub bytes: Vec<u8>,
    json: bool,
}

impl RawDoc {
    /// The document's text: the bytes as UTF-8 (plain text) or the text field of the JSON
    /// object (JSON Lines). `Err` says which rule the document broke and where; `inputs` is the
    /// list the reader was made from, for naming the file.
    pub fn into_text(self, inputs: &[PathBuf], text_field: &str) -> Result<String, Problem> {
        if self.json {
            let value = self.json_value(inputs)?;
            return self.string_field(&value, text_field, "--text-field", inputs);
        }
        match std::str::from_utf8(&self.bytes) {
            Ok(_) => Ok(String::from_utf8(self.bytes).expect("checked UTF-8")),
            Err(e) => Err(self.invalid_utf8(e, inputs)),
        }
    }

    /// A prompt–completion pair: the strings in `text_field` and `completion_field` of the
    /// JSON object (JSON Lines only; a plain-text document is a problem).
    pub fn into_pair(
        self,
        inputs: &[PathBuf],
        text_field: &str,
        completion_field: &str,
    ) -> Result<(String, String), Problem> {
        if !self.json {
            let message = "plain text holds no prompt-completion pairs (--completion-field reads JSON Lines)";
            return Err(self.problem(inputs, self.line, "malformed_json", message.into()));
        }
        let value = self.json_value(inputs)?;
        let prompt = self.string_field(&value, text_field, "--text-field", inputs)?;
        Ok((prompt, self.string_field(&value, completion_field, "--completion-field", inputs)?))
    }

    /// A conversation: the list of messages in `field` of the JSON object, each an object with
    /// a string `role` (JSON Lines only).
    pub fn into_messages(self, inputs: &[PathBuf], field: &str) -> Result<Vec<serde_json::Value>, Problem> {
        let malformed = |message: String| Err(self.problem(inputs, self.line, "malformed_json", message));
        if !self.json {
            return malformed("plain text holds no conversations (--messages-field reads JSON Lines)".into());
        }
        let messages = match self.json_value(inputs)?.get_mut(field).map(serde_json::Value::take) {
            Some(serde_json::Value::Array(messages)) => messages,
            Some(other) => {
                return malformed(format!("field `{field}` is not a list of messages but {}", json_kind(&other)));
            }
            None => {
                return malformed(format!("no field `{field}` (set --messages-field to the field of the messages)"));
            }
        };
        if let Some(i) = messages.iter().position(|m| !m["role"].is_string()) {
            return malformed(format!("message {i} of `{field}` is not an object with a string `role`"));
        }
        Ok(messages)
    }

    fn problem(&self, inputs: &[PathBuf], line: u64, kind: &'static str, message: String) -> Problem {
        Problem { path: inputs[self.input].clone(), line, kind, message }
    }

    fn invalid_utf8(&self, e: std::str::Utf8Error, inputs: &[PathBuf]) -> Problem {
        let at = e.valid_up_to();
        let line = self.line + self.bytes[..at].iter().filter(|&&b| b == b'\n').count() as u64;
        let message = format!("invalid UTF-8 (byte 0x{:02X}); the document is skipped", self.bytes[at]);
        self.problem(inputs, line, "invalid_utf8", message)
    }

    fn json_value(&self, inputs: &[PathBuf]) -> Result<serde_json::Value, Problem> {
        let text = std::str::from_utf8(&self.bytes).map_err(|e| self.invalid_utf8(e, inputs))?;
        // (serde's "at line 1 column N" counts within this one line: the column is what helps.
        // Without its line end, an unterminated string ends the line, not a control character.)
        serde_json::from_str(text.trim_end_matches(['\n', '\r'])).map_err(|e| {
            let what = e.to_string();
            let what = what.split(" at line ").next().unwrap_or(&what).to_string();
            let message = format!("malformed JSON line: {what} at column {}", e.column());
            self.problem(inputs, self.line, "malformed_json", message)
        })
    }

    /// The string in `field` of `value`; `flag` names the option that chose the field.
    fn string_field(
        &self,
        value: &serde_json::Value,
        field: &str,
        flag: &str,
        inputs: &[PathBuf],
    ) -> Result<String, Problem> {
        let message = match value.get(field) {
            Some(serde_json::Value::String(s)) => return Ok(s.clone()),
            Some(other) => format!("field `{field}` is not a string but {}", json_kind(other)),
            None => format!("no field `{field}` (set {flag} to the field that holds the text)"),
        };
        Err(self.problem(inputs, self.line, "malformed_json", message))
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// One item of a [`DocReader`].
#[derive(Debug)]
pub enum Item {
    Doc(RawDoc),
    Problem(Problem),
}

/// What was read from one input: raw bytes (as stored, before decompression) and their SHA-256.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct InputStats {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub documents: u64,
}

/// Counts and hashes the raw bytes that pass through it, into state shared with the reader.
struct Hashing<R> {
    inner: R,
    state: Arc<Mutex<(Sha256, u64)>>,
    progress: Arc<AtomicU64>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut state = self.state.lock().expect("hash state lock");
        state.0.update(&buf[..n]);
        state.1 += n as u64;
        self.progress.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The file currently being read.
struct Open {
    reader: Box<dyn BufRead + Send>,
    /// Shared with the boxed reader's innermost layer: the hash and count of raw bytes read.
    hashed: Arc<Mutex<(Sha256, u64)>>,
    format: InputFormat,
    line: u64,
    documents: u64,
}

/// Streams the documents of `inputs` in order; see the module docs.
pub struct DocReader {
    inputs: Vec<PathBuf>,
    options: InputOptions,
    next_input: usize,
    current: Option<Open>,
    stats: Vec<InputStats>,
    /// Raw bytes read so far over all inputs (for progress bars).
    pub bytes_read: Arc<AtomicU64>,
    line_buf: Vec<u8>,
}

impl DocReader {
    pub fn new(inputs: Vec<PathBuf>, options: InputOptions) -> Self {
        let stats = inputs.iter().map(|p| InputStats { path: p.clone(), ..Default::default() }).collect();
        Self { inputs, options, next_input: 0, current: None, stats, bytes_read: Arc::default(), line_buf: Vec::new() }
    }

    pub fn inputs(&self) -> &[PathBuf] {
        &self.inputs
    }

    /// Per-input byte counts, hashes and document counts (complete once the reader is exhausted).
    pub fn stats(&self) -> &[InputStats] {
        &self.stats
    }

    fn open(&mut self, index: usize) -> Result<Open, Problem> {
        let path = &self.inputs[index];
        let unreadable = |e: std::io::Error| Problem {
            path: path.clone(),
            line: 0,
            kind: "unreadable",
            message: format!("cannot open: {e}"),
        };
        let file = File::open(path).map_err(unreadable)?;
        if file.metadata().map_err(unreadable)?.is_dir() {
            return Err(unreadable(std::io::Error::other("is a directory")));
        }
        let hashed = Arc::new(Mutex::new((Sha256::new(), 0)));
        let raw = Hashing { inner: file, state: Arc::clone(&hashed), progress: self.bytes_read.clone() };
        const BUF: usize = 256 << 10;
        let reader: Box<dyn BufRead + Send> = match compression_of(path) {
            Compression::None => Box::new(BufReader::with_capacity(BUF, raw)),
            Compression::Gzip => {
                Box::new(BufReader::with_capacity(BUF, flate2::read::MultiGzDecoder::new(BufReader::new(raw))))
            }
            Compression::Zstd => {
                let decoder = zstd::stream::read::Decoder::new(raw).map_err(unreadable)?;
                Box::new(BufReader::with_capacity(BUF, decoder))
            }
        };
        Ok(Open { reader, hashed, format: InputFormat::of(path), line: 0, documents: 0 })
    }

    /// Reads the next document of the open file; `Ok(None)` at its end.
    fn read_doc(&mut self, input: usize) -> std::io::Result<Option<RawDoc>> {
        let split = self.options.doc_split;
        let open = self.current.as_mut().expect("a file is open");
        // A UTF-8 byte-order mark (Windows editors write one) is no part of the text.
        if open.line == 0 && open.reader.fill_buf()?.starts_with(UTF8_BOM) {
            open.reader.consume(UTF8_BOM.len());
        }
        match (open.format, split) {
            (InputFormat::Text, DocSplit::File) => {
                if open.line > 0 {
                    return Ok(None);
                }
                let mut bytes = Vec::new();
                open.reader.read_to_end(&mut bytes)?;
                open.line = 1;
                // A blank file is an empty one (reported as such), not a document too short to keep.
                let blank = bytes.iter().all(u8::is_ascii_whitespace);
                Ok((!blank).then_some(RawDoc { input, line: 1, bytes, json: false }))
            }
            (InputFormat::JsonLines, _) => loop {
                self.line_buf.clear();
                if open.reader.read_until(b'\n', &mut self.line_buf)? == 0 {
                    return Ok(None);
                }
                open.line += 1;
                if self.line_buf.iter().all(|b| b.is_ascii_whitespace()) {
                    continue; // blank lines between records are not records
                }
                return Ok(Some(RawDoc { input, line: open.line, bytes: self.line_buf.clone(), json: true }));
            },
            (InputFormat::Text, DocSplit::BlankLine) => {
                let mut bytes = Vec::new();
                let mut start = 0;
                loop {
                    self.line_buf.clear();
                    if open.reader.read_until(b'\n', &mut self.line_buf)? == 0 {
                        break;
                    }
                    open.line += 1;
                    let blank = self.line_buf.iter().all(|b| b.is_ascii_whitespace());
                    if blank && !bytes.is_empty() {
                        break;
                    }
                    if !blank {
                        if bytes.is_empty() {
                            start = open.line;
                        }
                        bytes.extend_from_slice(&self.line_buf);
                    }
                }
                // The last line's end, LF or CRLF (a lone CR left would become a newline).
                if bytes.last() == Some(&b'\n') {
                    bytes.pop();
                    if bytes.last() == Some(&b'\r') {
                        bytes.pop();
                    }
                }
                Ok((!bytes.is_empty()).then_some(RawDoc { input, line: start, bytes, json: false }))
            }
        }
    }

    fn close(&mut self, index: usize) {
        if let Some(open) = self.current.take() {
            let stats = &mut self.stats[index];
            stats.documents = open.documents;
            drop(open.reader);
            let (hasher, bytes) = std::mem::take(&mut *open.hashed.lock().expect("hash state lock"));
            stats.bytes = bytes;
            stats.sha256 = hex(&hasher.finalize());
        }
    }
}

impl Iterator for DocReader {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        loop {
            let index = self.next_input.checked_sub(1);
            if let (Some(index), true) = (index, self.current.is_some()) {
                match self.read_doc(index) {
                    Ok(Some(doc)) => {
                        self.current.as_mut().expect("open").documents += 1;
                        return Some(Item::Doc(doc));
                    }
                    Ok(None) => {
                        let empty = self.current.as_ref().is_some_and(|o| o.documents == 0);
                        self.close(index);
                        if empty {
                            let path = self.inputs[index].clone();
                            let message = "the file holds no document (it is empty or blank)".to_string();
                            return Some(Item::Problem(Problem { path, line: 0, kind: "empty_file", message }));
                        }
                    }
                    Err(e) => {
                        let line = self.current.as_ref().map_or(0, |o| o.line + 1);
                        self.close(index);
                        let path = self.inputs[index].clone();
                        let message = format!("read error, the rest of the file is skipped: {e}");
                        return Some(Item::Problem(Problem { path, line, kind: "unreadable", message }));
                    }
                }
            }
            let index = self.next_input;
            if index >= self.inputs.len() {
                return None;
            }
            self.next_input += 1;
            match self.open(index) {
                Ok(open) => self.current = Some(open),
                Err(problem) => return Some(Item::Problem(problem)),
            }
        }
    }
}

/// Lower-case hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Expands input patterns: like [`crate::expand_globs`] (sorted matches, duplicates dropped, a
/// pattern that matches nothing is an error); a plain path (no `*?[`) must exist, and is kept
/// even when it cannot be opened, so that the reader reports it as a problem with its name.
pub fn expand_inputs(patterns: &[String]) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for pattern in patterns {
        // (A directory is a pattern that matches no file, which expand_globs says. A file named
        // like a glob, `notes [1].txt`, is that file.)
        if Path::new(pattern).is_file() {
            files.push(PathBuf::from(pattern));
        } else if pattern.contains(['*', '?', '[']) || Path::new(pattern).is_dir() {
            files.extend(crate::expand_globs(std::slice::from_ref(pattern), Path::new("."))?);
        } else if Path::new(pattern).exists() {
            files.push(PathBuf::from(pattern));
        } else {
            // A named file that is not there is a typo, found before hours of preparation.
            return Err(DataError::Invalid(format!("{pattern}: no such file or directory")));
        }
    }
    // The same file however it is spelled (`x.txt`, `./x.txt`) is read once.
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(crate::stream::file_identity(f)));
    if files.is_empty() {
        return Err(DataError::Invalid("no input given: pass --input FILE or GLOB at least once".into()));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn texts(reader: DocReader, field: &str) -> (Vec<String>, Vec<Problem>) {
        let inputs = reader.inputs().to_vec();
        let (mut docs, mut problems) = (Vec::new(), Vec::new());
        for item in reader {
            match item {
                Item::Doc(d) => match d.into_text(&inputs, field) {
                    Ok(t) => docs.push(t),
                    Err(p) => problems.push(p),
                },
                Item::Problem(p) => problems.push(p),
            }
        }
        (docs, problems)
    }

    /// A file is one input however spelled, and a file named like a glob is that file.
    #[test]
    fn inputs_are_files_once_whatever_their_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let at = |n: &str| format!("{}/{n}", dir.path().display());
        std::fs::write(at("a.txt"), "a").unwrap();
        std::fs::write(at("notes [1].txt"), "n").unwrap();
        let files = expand_inputs(&[at("a.txt"), at("./a.txt"), at("notes [1].txt"), at("*.txt")]).unwrap();
        assert_eq!(files, [PathBuf::from(at("a.txt")), PathBuf::from(at("notes [1].txt"))]);
    }

    #[test]
    fn reads_text_jsonl_gzip_and_zstd_and_reports_bad_input_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("a.txt"), "첫 문단\n둘째 줄\n\n\n second paragraph\n").unwrap();
        let jsonl = "{\"text\": \"문서 하나\"}\n\n{\"text\": 3}\n{broken\n{\"body\": \"x\"}\n{\"text\": \"two\"}\n{\"text\": \"open\n";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(jsonl.as_bytes()).unwrap();
        gz.write_all(b"{\"text\": \"bad \xFF\"}\n").unwrap();
        std::fs::write(p("b.jsonl.gz"), gz.finish().unwrap()).unwrap();
        std::fs::write(p("c.txt.zst"), zstd::encode_all("zstd text".as_bytes(), 1).unwrap()).unwrap();
        std::fs::write(p("crlf.txt"), "\u{FEFF}one\r\ntwo\r\n\r\nthree\r\n").unwrap();
        std::fs::write(p("bom.jsonl"), "\u{FEFF}{\"text\": \"marked\"}\n").unwrap();
        std::fs::write(p("empty.txt"), "").unwrap();
        std::fs::write(p("bad.txt"), b"ok\nstill ok\nbad \xFF here\n").unwrap();
        std::fs::write(p("corrupt.txt.gz"), b"not gzip at all").unwrap();
        let names = [
            "a.txt",
            "b.jsonl.gz",
            "c.txt.zst",
            "crlf.txt",
            "bom.jsonl",
            "empty.txt",
            "bad.txt",
            "missing.txt",
            "corrupt.txt.gz",
        ];
        let inputs: Vec<PathBuf> = names.iter().map(|n| p(n)).collect();
        let options = InputOptions { doc_split: DocSplit::BlankLine, ..InputOptions::default() };
        let reader = DocReader::new(inputs.clone(), options);
        let (docs, problems) = texts(reader, "text");
        // A CRLF document ends without its line end, as an LF one does (cleaning turns the
        // CRLFs inside into LFs); a file's byte-order mark is no part of its first document.
        let want =
            ["첫 문단\n둘째 줄", " second paragraph", "문서 하나", "two", "zstd text", "one\r\ntwo", "three", "marked"];
        assert_eq!(docs, want);
        let found: Vec<(String, u64, &str)> = problems
            .iter()
            .map(|p| (p.path.file_name().unwrap().to_string_lossy().into_owned(), p.line, p.kind))
            .collect();
        let expect = |n: &str, l, k| (n.to_string(), l, k);
        assert_eq!(
            found,
            [
                expect("b.jsonl.gz", 3, "malformed_json"),
                expect("b.jsonl.gz", 4, "malformed_json"),
                expect("b.jsonl.gz", 5, "malformed_json"),
                expect("b.jsonl.gz", 7, "malformed_json"),
                expect("b.jsonl.gz", 8, "invalid_utf8"),
                expect("empty.txt", 0, "empty_file"),
                expect("bad.txt", 3, "invalid_utf8"),
                expect("missing.txt", 0, "unreadable"),
                expect("corrupt.txt.gz", 1, "unreadable"),
            ]
        );
        assert!(problems[2].message.contains("--text-field"), "{}", problems[2]);
        assert!(problems[3].message.ends_with("EOF while parsing a string at column 14"), "{}", problems[3]);
        // The broken line's column, not serde's "line 1" of a one-line document.
        assert!(
            problems[1].message.ends_with("at column 2") && !problems[1].message.contains("line 1"),
            "{}",
            problems[1]
        );

        // Stats: raw bytes and SHA-256 of what was stored on disk.
        let mut reader = DocReader::new(inputs[..1].to_vec(), InputOptions::default());
        assert_eq!(reader.by_ref().count(), 1);
        let raw = std::fs::read(&inputs[0]).unwrap();
        assert_eq!(reader.stats()[0].bytes, raw.len() as u64);
        let sha: String = Sha256::digest(&raw).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(reader.stats()[0].sha256, sha);

        // A file of one document that is blank is empty too, as it is split at blank lines.
        std::fs::write(p("blank.txt"), " \n\t\r\n").unwrap();
        let options = InputOptions { doc_split: DocSplit::File, ..InputOptions::default() };
        let (docs, problems) = texts(DocReader::new(vec![p("blank.txt"), p("c.txt.zst")], options), "text");
        assert_eq!(docs, ["zstd text"]);
        assert_eq!(problems.iter().map(|p| p.kind).collect::<Vec<_>>(), ["empty_file"]);
    }
}
