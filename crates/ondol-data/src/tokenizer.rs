//! Byte-level BPE tokenizers: training with the Hugging Face `tokenizers` crate, and
//! [`TextTokenizer`], the loaded form that data preparation and the trainer use.
//!
//! A trained tokenizer is the GPT-2 / Llama 3 design: NFC normalisation (so Hangul typed as
//! decomposed jamo encodes exactly like the composed syllables), the byte-level pre-tokenizer
//! (its regex splits words, numbers and punctuation; every byte maps to one of 256 base
//! symbols, so there is no unknown token and any UTF-8 text round-trips), BPE merges learnt on
//! top, special tokens (`<|endoftext|>` by default) and the byte-level decoder. It is saved as
//! a standard `tokenizer.json`, which `tokenizers.Tokenizer.from_file` and `transformers`'
//! `PreTrainedTokenizerFast(tokenizer_file=...)` load as they are.
//!
//! Training streams the documents (the `tokenizers` trainer counts words in parallel; its word
//! table is what grows with the corpus). A slice of every input is held out from training (the
//! tail of each document, up to a budget per file) and used afterwards to report fertility:
//! tokens per character and per whitespace-separated word, per input, so one sees at a glance
//! how well the vocabulary serves each language.

use std::path::{Path, PathBuf};

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::DataError;
use crate::input::{DocReader, InputOptions, Item, Problem};

/// The default end-of-text token, GPT-2's spelling.
pub const EOT_TOKEN: &str = "<|endoftext|>";

/// The files transformers reads beside a tokenizer.json (special tokens, the chat template),
/// which go wherever it is copied.
pub const COMPANION_FILES: [&str; 3] = ["tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];

/// `tokenizer` as `tokenizer.json`, and the [`COMPANION_FILES`] beside it, as (name, source)
/// pairs of the files that exist.
pub fn tokenizer_files(tokenizer: &Path) -> Vec<(String, PathBuf)> {
    let companions = COMPANION_FILES.iter().map(|name| (name.to_string(), tokenizer.with_file_name(name)));
    std::iter::once(("tokenizer.json".to_string(), tokenizer.to_path_buf()))
        .chain(companions.filter(|(_, source)| source.is_file()))
        .collect()
}

/// Tokenizer training settings; each has a `tokenizer train` flag.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Total vocabulary: 256 byte symbols + merges + special tokens.
    pub vocab_size: usize,
    /// Special tokens, given ids 0.. in this order; the first is the end-of-text token.
    pub special_tokens: Vec<String>,
    /// A merge must occur at least this often.
    pub min_frequency: u64,
    /// Fraction of every document (its tail) held out for the fertility report.
    pub heldout_fraction: f64,
    /// Hold out tails from an input file until they reach this many bytes.
    pub heldout_chars: usize,
    /// Fail on the first malformed input instead of skipping it.
    pub strict: bool,
    /// Show a progress bar (bytes, documents per second) when stderr is a terminal.
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            special_tokens: vec![EOT_TOKEN.into()],
            min_frequency: 2,
            heldout_fraction: 0.05,
            heldout_chars: 100_000,
            strict: false,
            progress: true,
        }
    }
}

/// Fertility of the trained vocabulary on one input's held-out text.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Fertility {
    pub path: PathBuf,
    /// The most frequent script among the letters: "Hangul", "Latin", "Han", "Kana" or "other".
    pub script: &'static str,
    pub chars: usize,
    pub words: usize,
    pub tokens: usize,
}

impl Fertility {
    pub fn tokens_per_char(&self) -> f64 {
        self.tokens as f64 / self.chars.max(1) as f64
    }
    pub fn tokens_per_word(&self) -> f64 {
        self.tokens as f64 / self.words.max(1) as f64
    }
}

/// What a training run did.
#[derive(Debug)]
pub struct TrainReport {
    pub documents: u64,
    pub problems: Vec<Problem>,
    pub vocab_size: usize,
    pub fertility: Vec<Fertility>,
}

/// The pipeline of a fresh byte-level BPE tokenizer (before training).
fn untrained() -> Tokenizer {
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer
        .with_normalizer(Some(NFC))
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::new(false, true, true)));
    tokenizer
}

/// Trains a tokenizer on the documents of `inputs` and measures its fertility (module docs).
pub fn train(
    inputs: Vec<PathBuf>,
    options: &InputOptions,
    cfg: &TrainConfig,
) -> Result<(TextTokenizer, TrainReport), DataError> {
    let minimum = 256 + cfg.special_tokens.len();
    if cfg.vocab_size < minimum {
        return Err(DataError::Invalid(format!(
            "--vocab-size {}: a byte-level BPE vocabulary needs at least {minimum} \
             (256 byte symbols + {} special tokens)",
            cfg.vocab_size,
            cfg.special_tokens.len()
        )));
    }
    // Beyond the largest vocabularies in use (Gemma's 256k) by far; the trainer allocates
    // tables of this size up front.
    const MAXIMUM: usize = 1 << 22;
    if cfg.vocab_size > MAXIMUM {
        return Err(DataError::Invalid(format!(
            "--vocab-size {}: at most {MAXIMUM} (byte-level BPE vocabularies in use reach 256k)",
            cfg.vocab_size
        )));
    }
    if cfg.special_tokens.is_empty() || cfg.special_tokens.iter().any(String::is_empty) {
        return Err(DataError::Invalid(format!(
            "--special-tokens {:?} has an empty token: at least the end-of-text token (e.g. {EOT_TOKEN}) is \
             needed, and every token needs some text",
            cfg.special_tokens.join(",")
        )));
    }
    if let Some(twice) = cfg.special_tokens.iter().enumerate().find(|(i, t)| cfg.special_tokens[..*i].contains(t)) {
        return Err(DataError::Invalid(format!("--special-tokens names `{}` twice", twice.1)));
    }
    if !(0.0..1.0).contains(&cfg.heldout_fraction) {
        return Err(DataError::Invalid(format!(
            "--heldout-fraction {} is out of range: it must be in [0, 1)",
            cfg.heldout_fraction
        )));
    }
    let mut tokenizer = untrained();
    let special: Vec<AddedToken> = cfg.special_tokens.iter().map(|t| AddedToken::from(t.clone(), true)).collect();
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(cfg.vocab_size)
        .min_frequency(cfg.min_frequency)
        .special_tokens(special)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build()
        .into();

    let reader = DocReader::new(inputs.clone(), options.clone());
    let bar = crate::prepare::progress_bar_for(&inputs, cfg.progress);
    let bytes_read = reader.bytes_read.clone();
    let start = std::time::Instant::now();
    // Per input, the held-out tails, each from a word's leading space to its document's end.
    let mut heldout: Vec<Vec<String>> = vec![Vec::new(); inputs.len()];
    let mut heldout_bytes = vec![0usize; inputs.len()];
    let mut problems = Vec::new();
    let mut documents = 0u64;
    let mut failed: Option<Problem> = None;
    let text_field = options.text_field.clone();
    let docs = reader.map_while(|item| {
        let problem = match item {
            Item::Doc(raw) => {
                let input = raw.input;
                match raw.into_text(&inputs, &text_field) {
                    Ok(mut text) => {
                        documents += 1;
                        if let Some(bar) = bar.as_ref().filter(|_| documents.is_multiple_of(256)) {
                            bar.set_position(bytes_read.load(std::sync::atomic::Ordering::Relaxed));
                            let rate = documents as f64 / start.elapsed().as_secs_f64().max(1e-9);
                            bar.set_message(format!("{documents} docs ({rate:.0}/s) counted"));
                        }
                        if heldout_bytes[input] < cfg.heldout_chars && cfg.heldout_fraction > 0.0 {
                            let cut = tail_start(&text, cfg.heldout_fraction);
                            if cut < text.len() {
                                heldout_bytes[input] += text.len() - cut;
                                heldout[input].push(text[cut..].to_string());
                                text.truncate(cut);
                            }
                        }
                        return Some(text);
                    }
                    Err(p) => p,
                }
            }
            Item::Problem(p) => p,
        };
        if cfg.strict {
            failed = Some(problem);
            return None;
        }
        problems.push(problem);
        Some(String::new())
    });
    tokenizer.train(&mut trainer, docs).map_err(|e| DataError::Invalid(format!("tokenizer training failed: {e}")))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(p) = failed {
        return Err(DataError::Invalid(format!("{p} (--strict stops at the first malformed input)")));
    }
    if documents == 0 {
        return Err(DataError::Invalid(format!(
            "no document could be read from the {} input file(s); nothing to train on",
            inputs.len()
        )));
    }
    let tokenizer = TextTokenizer::new(tokenizer, &cfg.special_tokens[0])?;
    // A special token that plain text also encodes to (a byte symbol like `a`, or a merge the
    // text made) would mark document boundaries in the middle of text.
    for special in &cfg.special_tokens {
        let id = tokenizer.inner.token_to_id(special);
        if let Some(id) = id.filter(|id| tokenizer.encode(special).is_ok_and(|ids| ids.contains(id))) {
            return Err(DataError::Invalid(format!(
                "--special-tokens: `{special}` is also a token of plain text (id {id}), so text would read as the \
                 special token; choose one that text cannot spell, like <|{special}|>"
            )));
        }
    }
    // Each tail is encoded on its own, as it stands in its document: no token joins two.
    let fertility = inputs
        .iter()
        .zip(&heldout)
        .filter(|(_, tails)| tails.iter().any(|t| !t.trim().is_empty()))
        .map(|(path, tails)| {
            let pieces: Vec<&str> = tails.iter().map(String::as_str).collect();
            let tokens = tokenizer.encode_batch(pieces)?.iter().map(Vec::len).sum();
            Ok(Fertility {
                path: path.clone(),
                script: dominant_script(&tails.concat()),
                chars: tails.iter().map(|t| t.chars().count()).sum(),
                words: tails.iter().map(|t| t.split_whitespace().count()).sum(),
                tokens,
            })
        })
        .collect::<Result<_, DataError>>()?;
    let vocab_size = tokenizer.vocab_size();
    Ok((tokenizer, TrainReport { documents, problems, vocab_size, fertility }))
}

/// Where the held-out tail of a document begins: about `fraction` of its bytes from the end,
/// at the whitespace before a word, so that the tail holds whole words as running text has
/// them: the next word start within 200 characters; in text without spaces (Chinese,
/// Japanese, Thai: none within 200 characters either way), the cut itself; else (the cut in a
/// paragraph's last word) the end: nothing held out.
fn tail_start(text: &str, fraction: f64) -> usize {
    let mut cut = text.len() - (text.len() as f64 * fraction) as usize;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    let after = text[cut..].char_indices().take(200).find(|(_, c)| c.is_whitespace()).map(|(i, _)| cut + i);
    let spaced_before = || text[..cut].chars().rev().take(200).any(char::is_whitespace);
    match after {
        Some(i) if !text[i..].trim().is_empty() => i,
        None if !spaced_before() => cut,
        _ => text.len(),
    }
}

fn dominant_script(text: &str) -> &'static str {
    let mut counts = [0usize; 5];
    for c in text.chars().filter(|c| c.is_alphabetic()) {
        let i = match c as u32 {
            0xAC00..=0xD7A3 | 0x1100..=0x11FF | 0x3130..=0x318F => 0,
            0x41..=0x5A | 0x61..=0x7A | 0xC0..=0x24F => 1,
            0x4E00..=0x9FFF | 0x3400..=0x4DBF => 2,
            0x3040..=0x30FF => 3,
            _ => 4,
        };
        counts[i] += 1;
    }
    let best = (0..5).max_by_key(|&i| counts[i]).unwrap_or(4);
    ["Hangul", "Latin", "Han", "Kana", "other"][best]
}

/// The vocabulary size (special tokens included) of the `tokenizer.json` at `path`.
pub fn vocab_size_of_file(path: &Path) -> Result<usize, DataError> {
    if !path.is_file() {
        return Err(DataError::format(path, "no such tokenizer file (train one with `ondol tokenizer train`)"));
    }
    let tokenizer = Tokenizer::from_file(path)
        .map_err(|e| DataError::format(path, format!("not a valid Hugging Face tokenizer.json: {e}")))?;
    Ok(tokenizer.get_vocab_size(true))
}

fn load(path: &Path) -> Result<Tokenizer, DataError> {
    if !path.is_file() {
        return Err(DataError::Format {
            path: path.into(),
            message: "no such tokenizer file (train one with `ondol tokenizer train`)".into(),
        });
    }
    Tokenizer::from_file(path).map_err(|e| {
        // The tokenizers crate reports JSON of another shape as a syntax error.
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let json: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        let message = match json {
            Some(json) if json.get("model").is_none() => {
                "valid JSON, but not a Hugging Face tokenizer.json (it has no \"model\")".to_string()
            }
            _ => format!("not a valid Hugging Face tokenizer.json: {e}"),
        };
        DataError::Format { path: path.into(), message }
    })
}

/// A loaded `tokenizer.json` with its end-of-text id: what data preparation encodes with.
pub struct TextTokenizer {
    inner: Tokenizer,
    eot: u32,
    /// What the post-processor puts before a text (Gemma's and Llama 3's BOS): the start of
    /// every document. What it puts after (an EOS) is left out: the end-of-text written
    /// between documents ends them.
    document_start: Vec<u32>,
    /// `inner` reading special tokens in the text as themselves, for markup (made at first
    /// use: see [`Self::encode_markup_with_starts`]).
    markup: std::sync::OnceLock<Tokenizer>,
}

/// `text` encoded by `tokenizer` (nothing added): each token's id and the byte it starts at.
fn with_starts(tokenizer: &Tokenizer, text: &str) -> Result<Vec<(u32, usize)>, DataError> {
    let encoding =
        tokenizer.encode(text, false).map_err(|e| DataError::Invalid(format!("tokenizer failed to encode: {e}")))?;
    Ok(encoding.get_ids().iter().zip(encoding.get_offsets()).map(|(&id, &(start, _))| (id, start)).collect())
}

/// The special tokens `inner`'s post-processor puts before a text.
fn leading_special_tokens(inner: &Tokenizer) -> Vec<u32> {
    let (Ok(with), Ok(without)) = (inner.encode_fast("a", true), inner.encode_fast("a", false)) else {
        return Vec::new();
    };
    let (with, without) = (with.get_ids(), without.get_ids());
    let start = (0..=with.len().saturating_sub(without.len())).find(|&i| with[i..].starts_with(without));
    start.map_or(Vec::new(), |i| with[..i].to_vec())
}

impl TextTokenizer {
    fn new(mut inner: Tokenizer, eot_token: &str) -> Result<Self, DataError> {
        let eot = inner.token_to_id(eot_token).ok_or_else(|| {
            DataError::Invalid(format!(
                "the tokenizer has no end-of-text token `{eot_token}`: name the one it has (`data prepare \
                 --eot-token`, or data.eot_token in a run config)"
            ))
        })?;
        // Document text that happens to contain "<|endoftext|>" is encoded as plain text, never
        // as the special token, so no document can forge a boundary.
        inner.set_encode_special_tokens(true);
        let document_start = leading_special_tokens(&inner);
        Ok(Self { inner, eot, document_start, markup: Default::default() })
    }

    /// Loads `path` (any Hugging Face `tokenizer.json`); `eot_token` must be in its vocabulary.
    pub fn from_file(path: &Path, eot_token: &str) -> Result<Self, DataError> {
        let inner = load(path)?;
        Self::new(inner, eot_token).map_err(|e| DataError::Format { path: path.into(), message: e.to_string() })
    }

    /// Loads `path` with the end-of-text a model config names (`eos_token_id`), for
    /// tokenizers whose end-of-text is not `<|endoftext|>` (Llama's `</s>`, say); without an
    /// id, `<|endoftext|>`.
    pub fn from_file_with_eot_id(path: &Path, eot_id: Option<u32>) -> Result<Self, DataError> {
        let Some(id) = eot_id else { return Self::from_file(path, EOT_TOKEN) };
        let mut inner = load(path)?;
        if inner.id_to_token(id).is_none() {
            return Err(DataError::Format {
                path: path.into(),
                message: format!("end-of-text id {id} is not in the vocabulary"),
            });
        }
        inner.set_encode_special_tokens(true);
        let document_start = leading_special_tokens(&inner);
        Ok(Self { inner, eot: id, document_start, markup: Default::default() })
    }

    /// Whether the tokenizer's own normaliser is NFC (ondol's are): it normalises whatever
    /// the cleaning left.
    pub fn normalizes_to_nfc(&self) -> bool {
        matches!(self.inner.get_normalizer(), Some(tokenizers::NormalizerWrapper::NFC(_)))
    }

    /// For text that is already NFC: drops the tokenizer's normaliser when it is exactly NFC,
    /// which changes no token (NFC is idempotent) and saves 5-10% of encoding time. Returns
    /// whether it did. Data preparation calls it when its cleaning normalises to NFC.
    pub fn skip_nfc_normalizer(&mut self) -> bool {
        let nfc = self.normalizes_to_nfc();
        if nfc {
            self.inner.with_normalizer(None::<tokenizers::NormalizerWrapper>);
        }
        nfc
    }

    /// Vocabulary size including special (added) tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eot_id(&self) -> u32 {
        self.eot
    }

    /// The id of `token` (a special token's text, say), if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The end-of-text token as text.
    pub fn eot_token(&self) -> String {
        self.inner.id_to_token(self.eot).expect("the end-of-text id is in the vocabulary")
    }

    /// The token ids of each text (no special tokens added), encoded in parallel.
    pub fn encode_batch(&self, texts: Vec<&str>) -> Result<Vec<Vec<u32>>, DataError> {
        let encodings = self
            .inner
            .encode_batch_fast(texts, false)
            .map_err(|e| DataError::Invalid(format!("tokenizer failed to encode: {e}")))?;
        Ok(encodings.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// The token ids of a document: as transformers' tokenizer encodes it by default, starting
    /// with the special tokens its post-processor puts first (the BOS of Gemma's and Llama 3's
    /// tokenizers; none in ondol's own), but without any it puts last.
    pub fn encode_document(&self, text: &str) -> Result<Vec<u32>, DataError> {
        Ok([self.document_start.clone(), self.encode(text)?].concat())
    }

    /// What [`Self::encode_document`] puts before each document.
    pub fn document_start(&self) -> &[u32] {
        &self.document_start
    }

    /// The token ids of one text (no special tokens added), on this thread.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| DataError::Invalid(format!("tokenizer failed to encode: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The tokens of markup (a chat template's output, whose special tokens the template
    /// wrote): each id, and the byte of `text` where the token starts. Special tokens spelt in
    /// the text are those tokens, as transformers encodes a template's output (a message that
    /// spells one gets it too, as there); nothing is added before or after.
    pub fn encode_markup_with_starts(&self, text: &str) -> Result<Vec<(u32, usize)>, DataError> {
        let markup = self.markup.get_or_init(|| {
            let mut markup = self.inner.clone();
            markup.set_encode_special_tokens(false);
            markup
        });
        with_starts(markup, text)
    }

    /// The tokens of one text as [`Self::encode`] makes them, each with the byte of `text`
    /// where it starts.
    pub fn encode_with_starts(&self, text: &str) -> Result<Vec<(u32, usize)>, DataError> {
        with_starts(&self.inner, text)
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        self.inner.decode(ids, false).map_err(|e| DataError::Invalid(format!("tokenizer failed to decode: {e}")))
    }

    /// Writes the tokenizer as a `tokenizer.json` (atomically: a sibling temporary, then rename).
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let mut inner = self.inner.clone();
        inner.set_encode_special_tokens(false); // the saved file behaves like any other
        let json =
            inner.to_string(true).map_err(|e| DataError::Invalid(format!("cannot serialize the tokenizer: {e}")))?;
        crate::prepare::write_atomic(path, json.as_bytes())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use unicode_normalization::UnicodeNormalization;

    /// A small tokenizer trained on the shipped sample text (Korean and English).
    pub(crate) fn sample_tokenizer(dir: &Path) -> TextTokenizer {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample");
        let inputs = vec![root.join("ko-constitution.txt"), root.join("en-alice-in-wonderland.txt")];
        let cfg = TrainConfig { vocab_size: 600, ..Default::default() };
        let (tok, report) = train(inputs, &InputOptions::default(), &cfg).unwrap();
        assert_eq!(report.documents, 2);
        assert_eq!(report.vocab_size, 600);
        let scripts: Vec<_> = report.fertility.iter().map(|f| f.script).collect();
        assert_eq!(scripts, ["Hangul", "Latin"]);
        // Even a 600-entry vocabulary needs fewer tokens than UTF-8 bytes (3 per syllable).
        let (ko, en) = (&report.fertility[0], &report.fertility[1]);
        assert!(ko.tokens_per_char() < 2.0 && en.tokens_per_char() < 0.6, "{ko:?} {en:?}");
        assert!(ko.tokens_per_word() > 1.0 && en.tokens_per_word() > 1.0, "{ko:?} {en:?}");
        tok.save(&dir.join("tokenizer.json")).unwrap();
        tok
    }

    /// Fertility measures whole words as running text holds them, however the documents are
    /// cut: a paragraph's 5% tail is a word or two, which must not come out as word fragments
    /// and newline tokens (blank-line documents reported 0.68 tok/char where whole files gave
    /// 0.44, the same tokenizer). Text without spaces is still measured.
    /// JSON that is no tokenizer is called that, not a syntax error.
    #[test]
    fn json_of_another_shape_is_no_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(&path, r#"{"a": 1}"#).unwrap();
        let err = TextTokenizer::from_file(&path, EOT_TOKEN).err().unwrap().to_string();
        assert!(err.contains("valid JSON, but not a Hugging Face tokenizer.json"), "{err}");
        std::fs::write(&path, r#"{"a": "#).unwrap();
        let err = TextTokenizer::from_file(&path, EOT_TOKEN).err().unwrap().to_string();
        assert!(err.contains("not a valid Hugging Face tokenizer.json: "), "{err}");
    }

    /// Special tokens must be text of their own: not empty, not twice, and not what plain text
    /// encodes to (`a`, a byte symbol, took the letter's id: every `a` read as end-of-text).
    #[test]
    fn special_tokens_that_text_can_spell_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("a.txt");
        std::fs::write(&input, "a banana and a papaya, and another banana").unwrap();
        let refused = |specials: &[&str]| {
            let cfg = TrainConfig {
                vocab_size: 300,
                special_tokens: specials.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            };
            train(vec![input.clone()], &InputOptions::default(), &cfg).err().map(|e| e.to_string())
        };
        let err = refused(&["a"]).expect("a byte symbol as a special token");
        assert!(err.contains("`a` is also a token of plain text") && err.contains("<|a|>"), "{err}");
        assert!(refused(&[""]).expect("an empty token").contains("empty token"));
        assert!(refused(&[EOT_TOKEN, ""]).expect("an empty second token").contains("empty token"));
        assert!(refused(&[EOT_TOKEN, "<|pad|>", EOT_TOKEN]).expect("a token twice").contains("twice"));
        assert_eq!(refused(&[EOT_TOKEN, "<|pad|>"]), None);
    }

    #[test]
    fn fertility_does_not_depend_on_how_documents_are_cut() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample");
        let inputs = vec![root.join("en-alice-in-wonderland.txt")];
        let cfg = TrainConfig { vocab_size: 600, ..Default::default() };
        let fertility = |doc_split| {
            let options = InputOptions { doc_split, ..InputOptions::default() };
            train(inputs.clone(), &options, &cfg).unwrap().1.fertility[0].tokens_per_char()
        };
        use crate::input::DocSplit;
        let (file, paragraphs) = (fertility(DocSplit::File), fertility(DocSplit::BlankLine));
        assert!((paragraphs / file - 1.0).abs() < 0.1, "tok/char {paragraphs} by paragraph, {file} by file");
        for (text, fraction, tail) in [
            ("the quick brown fox jumps over the lazy dog", 0.2, " dog"),
            ("the quick brown fox jumps over the lazy dog", 0.05, ""),
            ("天地玄黃宇宙洪荒日月盈昃辰宿列張寒來暑往秋收冬藏", 0.05, "藏"),
        ] {
            assert_eq!(&text[tail_start(text, fraction)..], tail, "{text} {fraction}");
        }
    }

    #[test]
    fn any_utf8_round_trips_through_nfc_and_jamo_encode_like_syllables() {
        let dir = tempfile::tempdir().unwrap();
        let tok = sample_tokenizer(dir.path());
        assert_eq!(tok.eot_id(), 0);
        let mut rng = ondol_core::Rng::new(3);
        let mut samples: Vec<String> = [
            "대한민국은 민주공화국이다.",
            "All in the golden afternoon.",
            "한국어와 English가 섞인 문장, 123개!",
            "emoji 🌡️🔥👩‍👩‍👧 and 🇰🇷 flags",
            "tabs\tand\nnewlines\r\n  spaces   ",
            "Café, naïve, \u{65}\u{301}, Ω, ﬁ, 𝕏",
            "",
        ]
        .map(String::from)
        .to_vec();
        for _ in 0..200 {
            let len = rng.below(40) as usize;
            samples.push(
                (0..len)
                    .map(|_| {
                        loop {
                            let c = match rng.below(4) {
                                0 => rng.below(0x80) as u32,
                                1 => 0xAC00 + rng.below(11172) as u32,
                                2 => 0x1100 + rng.below(0x100) as u32,
                                _ => rng.below(0x11_0000) as u32,
                            };
                            if let Some(c) = char::from_u32(c) {
                                break c;
                            }
                        }
                    })
                    .collect(),
            );
        }
        for text in &samples {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text.nfc().collect::<String>(), "{text:?}");
        }
        // 한국어 typed as conjoining jamo: the same tokens as the composed syllables.
        let composed = "한국어 자모";
        let decomposed: String = composed.nfd().collect();
        assert_ne!(composed, decomposed);
        assert_eq!(tok.encode(&decomposed).unwrap(), tok.encode(composed).unwrap());
        // A forged end-of-text in the text is text, not the special token.
        assert!(!tok.encode("a <|endoftext|> b").unwrap().contains(&tok.eot_id()));

        // Without the normaliser, NFC text encodes the same (prepare's cleaning does NFC).
        let mut skip = TextTokenizer::from_file(&dir.path().join("tokenizer.json"), EOT_TOKEN).unwrap();
        assert!(skip.skip_nfc_normalizer());
        for text in &samples {
            let nfc: String = text.nfc().collect();
            assert_eq!(skip.encode(&nfc).unwrap(), tok.encode(text).unwrap(), "{text:?}");
        }

        // The saved file loads again and encodes the same.
        let again = TextTokenizer::from_file(&dir.path().join("tokenizer.json"), EOT_TOKEN).unwrap();
        assert_eq!(again.encode(composed).unwrap(), tok.encode(composed).unwrap());
        let err = TextTokenizer::from_file(&dir.path().join("tokenizer.json"), "<eos>").err().unwrap().to_string();
        assert!(err.contains("tokenizer.json") && err.contains("--eot-token"), "{err}");
        std::fs::write(dir.path().join("bad.json"), "{").unwrap();
        let err = TextTokenizer::from_file(&dir.path().join("bad.json"), EOT_TOKEN).err().unwrap().to_string();
        assert!(err.contains("bad.json") && err.contains("not a valid"), "{err}");
    }

    /// A document starts as transformers' tokenizer starts it: with the BOS that a
    /// post-processor adds (Gemma's, Llama 3's), and with nothing in ondol's own tokenizers;
    /// an EOS a post-processor adds after a text is left to the end-of-text between documents.
    #[test]
    fn documents_take_the_special_tokens_of_the_tokenizers_post_processor() {
        use tokenizers::processors::template::TemplateProcessing;
        let dir = tempfile::tempdir().unwrap();
        let tok = sample_tokenizer(dir.path());
        let text = "대한민국 and Alice";
        assert_eq!(tok.encode_document(text).unwrap(), tok.encode(text).unwrap());
        let mut inner = tok.inner.clone();
        inner.add_special_tokens(&[AddedToken::from("<bos>", true), AddedToken::from("<end>", true)]);
        let [bos, end] = ["<bos>", "<end>"].map(|t| inner.token_to_id(t).unwrap());
        for (template, first) in [("<bos> $A", true), ("<bos> $A <end>", true), ("$A <end>", false)] {
            let template = TemplateProcessing::builder()
                .try_single(template)
                .unwrap()
                .special_tokens(vec![("<bos>", bos), ("<end>", end)])
                .build()
                .unwrap();
            inner.with_post_processor(Some(template));
            let templated = TextTokenizer::new(inner.clone(), EOT_TOKEN).unwrap();
            // The start a template gives, not the end: the end-of-text between documents ends them.
            let start: &[u32] = if first { &[bos] } else { &[] };
            assert_eq!(templated.encode_document(text).unwrap(), [start, &tok.encode(text).unwrap()].concat());
            assert_eq!(templated.encode_document("").unwrap(), start);
        }
    }

    #[test]
    fn bad_settings_name_their_flag() {
        let inputs = vec![PathBuf::from("x.txt")];
        let cfg = TrainConfig { vocab_size: 100, ..Default::default() };
        let err = train(inputs, &InputOptions::default(), &cfg).err().unwrap().to_string();
        assert!(err.contains("--vocab-size 100") && err.contains("257"), "{err}");
    }
}
