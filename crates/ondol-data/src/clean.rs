//! Document cleaning: two repairs (NFC normalisation, control characters removed) and four
//! filters, each of which removes a whole document and is counted under its own name.
//!
//! The filters follow the Gopher rules (Rae et al. 2021, appendix A), measured on characters so
//! that they work for languages with long words (Korean) as well as for English:
//! - `too_short`: fewer than `min_chars` characters (after the repairs, whitespace trimmed);
//! - `repeated_lines`: more than `max_repeated_line_fraction` of the characters are in lines
//!   that already appeared earlier in the document (boilerplate, navigation, spam);
//! - `repeated_ngrams`: more than `max_repeated_ngram_fraction` of the characters are in words
//!   covered by a word `ngram`-gram that already appeared earlier in the document;
//! - `non_letter`: more than `max_non_letter_fraction` of the non-whitespace characters are not
//!   letters (tables of numbers, markup, encoded data).

use std::collections::HashSet;

use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfc_quick};
use xxhash_rust::xxh3::xxh3_64;

/// Cleaning settings; every field has a `data prepare` flag of the same name.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CleanConfig {
    /// Normalise to Unicode NFC (composed Hangul syllables, composed accents).
    pub nfc: bool,
    /// Remove control characters (Unicode Cc) other than newline and tab; `\r\n` becomes `\n`.
    pub strip_control: bool,
    pub min_chars: usize,
    pub max_repeated_line_fraction: f64,
    pub max_repeated_ngram_fraction: f64,
    /// Word n-gram length for the repeated n-gram rule.
    pub ngram: usize,
    pub max_non_letter_fraction: f64,
}

impl Default for CleanConfig {
    fn default() -> Self {
        Self {
            nfc: true,
            strip_control: true,
            min_chars: 50,
            max_repeated_line_fraction: 0.3,
            max_repeated_ngram_fraction: 0.3,
            ngram: 5,
            max_non_letter_fraction: 0.5,
        }
    }
}

/// Why a document was removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    TooShort,
    RepeatedLines,
    RepeatedNgrams,
    NonLetter,
}

impl Rule {
    pub const ALL: [Rule; 4] = [Rule::TooShort, Rule::RepeatedLines, Rule::RepeatedNgrams, Rule::NonLetter];

    /// The name used in reports and the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Self::TooShort => "too_short",
            Self::RepeatedLines => "repeated_lines",
            Self::RepeatedNgrams => "repeated_ngrams",
            Self::NonLetter => "non_letter",
        }
    }
}

/// A cleaned document, with which repairs changed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cleaned {
    pub text: String,
    pub nfc_changed: bool,
    pub control_removed: bool,
}

impl CleanConfig {
    /// Checks that fractions are in [0, 1] and the n-gram length is at least 1; `Err` names
    /// the flag.
    pub fn validate(&self) -> Result<(), String> {
        let fractions = [
            ("--max-repeated-line-fraction", self.max_repeated_line_fraction),
            ("--max-repeated-ngram-fraction", self.max_repeated_ngram_fraction),
            ("--max-non-letter-fraction", self.max_non_letter_fraction),
        ];
        for (flag, v) in fractions {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{flag} {v} is out of range: it must be in [0, 1] (1 turns the rule off)"));
            }
        }
        if self.ngram == 0 {
            return Err("--ngram 0: the n-gram length must be at least 1".into());
        }
        Ok(())
    }

    /// These repairs without the filters.
    pub fn repairs_only(&self) -> CleanConfig {
        CleanConfig {
            min_chars: 0,
            max_repeated_line_fraction: 1.0,
            max_repeated_ngram_fraction: 1.0,
            max_non_letter_fraction: 1.0,
            ..self.clone()
        }
    }

    /// Repairs `text` and applies the filters in the order of [`Rule::ALL`].
    pub fn clean(&self, text: String) -> Result<Cleaned, Rule> {
        let mut text = text;
        let mut nfc_changed = false;
        if self.nfc && is_nfc_quick(text.chars()) != IsNormalized::Yes {
            let normalized: String = text.nfc().collect();
            nfc_changed = normalized != text;
            text = normalized;
        }
        let mut control_removed = false;
        if self.strip_control && text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            let mut out = String::with_capacity(text.len());
            let mut chars = text.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '\r' && chars.peek() == Some(&'\n') {
                    continue;
                }
                if c.is_control() && c != '\n' && c != '\t' {
                    control_removed |= c != '\r';
                    if c == '\r' {
                        out.push('\n');
                    }
                    continue;
                }
                out.push(c);
            }
            control_removed = control_removed || out.len() != text.len();
            text = out;
        }
        let trimmed = text.trim();
        if trimmed.chars().count() < self.min_chars {
            return Err(Rule::TooShort);
        }
        if self.max_repeated_line_fraction < 1.0 && repeated_line_fraction(trimmed) > self.max_repeated_line_fraction {
            return Err(Rule::RepeatedLines);
        }
        if self.max_repeated_ngram_fraction < 1.0
            && repeated_ngram_fraction(trimmed, self.ngram) > self.max_repeated_ngram_fraction
        {
            return Err(Rule::RepeatedNgrams);
        }
        if self.max_non_letter_fraction < 1.0 && non_letter_fraction(trimmed) > self.max_non_letter_fraction {
            return Err(Rule::NonLetter);
        }
        Ok(Cleaned { text, nfc_changed, control_removed })
    }
}

/// The fraction of characters (of non-blank lines) in lines that appeared earlier.
pub fn repeated_line_fraction(text: &str) -> f64 {
    let mut seen = HashSet::new();
    let (mut total, mut repeated) = (0usize, 0usize);
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let n = line.chars().count();
        total += n;
        if !seen.insert(xxh3_64(line.as_bytes())) {
            repeated += n;
        }
    }
    if total == 0 { 0.0 } else { repeated as f64 / total as f64 }
}

/// The fraction of word characters in words covered by a word `n`-gram seen earlier.
pub fn repeated_ngram_fraction(text: &str, n: usize) -> f64 {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() < n {
        return 0.0;
    }
    let mut covered = vec![false; words.len()];
    let mut seen = HashSet::with_capacity(words.len());
    for (i, gram) in words.windows(n).enumerate() {
        let mut h = 0u64;
        for w in gram {
            h = h.rotate_left(17) ^ xxh3_64(w.as_bytes());
        }
        if !seen.insert(h) {
            covered[i..i + n].fill(true);
        }
    }
    let len = |w: &&str| w.chars().count();
    let total: usize = words.iter().map(len).sum();
    let repeated: usize = words.iter().zip(&covered).filter(|(_, c)| **c).map(|(w, _)| len(w)).sum();
    repeated as f64 / total.max(1) as f64
}

/// The fraction of non-whitespace characters that are not letters (Unicode alphabetic).
pub fn non_letter_fraction(text: &str) -> f64 {
    let (mut total, mut other) = (0usize, 0usize);
    for c in text.chars().filter(|c| !c.is_whitespace()) {
        total += 1;
        other += usize::from(!c.is_alphabetic());
    }
    if total == 0 { 0.0 } else { other as f64 / total as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repairs_and_each_filter_fire_on_their_cases_only() {
        let cfg = CleanConfig { min_chars: 10, ..Default::default() };
        let prose = "온돌은 바닥을 데우는 난방이다. The floor is warm and the room is quiet tonight.";
        let ok = cfg.clean(prose.into()).unwrap();
        assert_eq!(ok, Cleaned { text: prose.into(), nfc_changed: false, control_removed: false });

        // Decomposed jamo (ᄒ ᅡ ᆫ) become the syllable 한; control characters go, \r\n -> \n.
        let decomposed = format!("\u{1112}\u{1161}\u{11AB}글 {prose}\r\nend\u{0007}.");
        let fixed = cfg.clean(decomposed).unwrap();
        assert_eq!(fixed.text, format!("한글 {prose}\nend."));
        assert!(fixed.nfc_changed && fixed.control_removed);

        assert_eq!(cfg.clean("short".into()), Err(Rule::TooShort));
        let lines = "Subscribe to our newsletter now\n".repeat(5) + "one real line of text here";
        assert_eq!(cfg.clean(lines), Err(Rule::RepeatedLines));
        let spam = "buy cheap watches online today ".repeat(8);
        assert_eq!(cfg.clean(spam), Err(Rule::RepeatedNgrams));
        assert_eq!(cfg.clean("1234 5678 9012 3456 | ## {}: 99.5% letters".into()), Err(Rule::NonLetter));

        let off = CleanConfig {
            min_chars: 0,
            max_repeated_line_fraction: 1.0,
            max_repeated_ngram_fraction: 1.0,
            max_non_letter_fraction: 1.0,
            ..cfg.clone()
        };
        assert!(off.clean("1 1 1 1 1 1 1 1\n1 1 1 1 1 1 1 1".into()).is_ok());
        assert!(CleanConfig { max_non_letter_fraction: 1.5, ..cfg }.validate().unwrap_err().contains("--max-non"));
    }

    #[test]
    fn fractions_measure_characters() {
        assert_eq!(repeated_line_fraction("ab\ncd\nab\ncd\n\n"), 0.5);
        assert_eq!(non_letter_fraction("ab 12"), 0.5);
        // Words 0..5 repeat at 5..10: the second copy's five words are covered.
        assert_eq!(repeated_ngram_fraction("a b c d e a b c d e", 5), 0.5);
        assert_eq!(repeated_ngram_fraction("a b c", 5), 0.0);
    }
}
