//! The byte-level tokenizer: every UTF-8 byte is its own token (ids 0..=255) and id 256 is
//! end-of-text. It needs no training and no vocabulary file, and it reads any language (a
//! Korean syllable is its three UTF-8 bytes), so smoke runs and tests can train on raw text.

/// Byte-level tokenizer. `decode` renders end-of-text as `eot_marker` (empty by default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ByteTokenizer {
    eot_marker: String,
}

impl ByteTokenizer {
    /// 256 byte values + end-of-text.
    pub const VOCAB_SIZE: usize = 257;
    /// The end-of-text token that separates documents.
    pub const EOT: u32 = 256;

    /// A tokenizer that decodes end-of-text as nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tokenizer that decodes end-of-text as `marker` (e.g. `"<|endoftext|>"` or `"\n\n"`).
    pub fn with_eot_marker(marker: impl Into<String>) -> Self {
        Self { eot_marker: marker.into() }
    }

    /// The UTF-8 bytes of `text`, one token each; no end-of-text is appended.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    /// The text of `ids`. Each document (the run between end-of-text tokens) is decoded on its
    /// own, so a byte sequence never joins across a boundary; invalid UTF-8 and ids outside the
    /// vocabulary become U+FFFD, as generated samples may contain either.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut text = String::with_capacity(ids.len());
        let mut bytes = Vec::new();
        for &id in ids {
            if let Ok(byte) = u8::try_from(id) {
                bytes.push(byte);
                continue;
            }
            text.push_str(&String::from_utf8_lossy(&bytes));
            bytes.clear();
            text.push_str(if id == Self::EOT { &self.eot_marker } else { "\u{FFFD}" });
        }
        text.push_str(&String::from_utf8_lossy(&bytes));
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn korean_round_trips_and_eot_renders_as_the_marker() {
        let tok = ByteTokenizer::new();
        let text = "대한민국은 민주공화국이다. Hello!";
        let ids = tok.encode(text);
        assert_eq!(ids.len(), text.len());
        assert_eq!(&ids[..3], &[0xEB, 0x8C, 0x80]); // 대 = U+B300
        assert_eq!(tok.decode(&ids), text);

        let mut two_docs = tok.encode("가");
        two_docs.push(ByteTokenizer::EOT);
        two_docs.extend(tok.encode("나"));
        assert_eq!(tok.decode(&two_docs), "가나");
        assert_eq!(ByteTokenizer::with_eot_marker("<|eot|>").decode(&two_docs), "가<|eot|>나");
    }

    #[test]
    fn invalid_sequences_decode_lossily_per_document() {
        let tok = ByteTokenizer::new();
        // The first two bytes of 가 (EA B0 80), end-of-text, then its last byte: no 가 appears.
        assert_eq!(tok.decode(&[0xEA, 0xB0, ByteTokenizer::EOT, 0x80]), "\u{FFFD}\u{FFFD}");
        assert_eq!(tok.decode(&[b'a'.into(), 1000, b'b'.into()]), "a\u{FFFD}b");
    }
}
