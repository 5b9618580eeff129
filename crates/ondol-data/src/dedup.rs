//! Deduplication across all inputs: exact (a 128-bit hash of the cleaned text) and near
//! (MinHash signatures with locality-sensitive hashing in bands, Broder 1997 / Leskovec et
//! al., *Mining of Massive Datasets* ch. 3). The first document of a group is kept; later
//! ones are removed, so the result depends only on input order.
//!
//! Near-duplicates: a document's shingles are its overlapping `shingle`-character windows
//! after lower-casing and collapsing whitespace (characters, not words, so Korean, Chinese
//! and English are treated alike). `num_perm` hash functions `h_p(x) = (a_p x + b_p) >> 32`
//! (multiply-add-shift, with random odd `a_p`) each keep their minimum over the shingles; the
//! probability that two documents agree on one minimum is their Jaccard similarity J. The
//! signature is cut into `bands` bands of `rows` minima; two documents are candidates when
//! all rows of any one band agree, which happens with probability `1 - (1 - J^rows)^bands`.
//!
//! By default the bands are chosen from the threshold: the most rows per band (the steepest
//! S-curve) that still catch at least 95% of pairs at exactly the threshold. For the defaults
//! (threshold 0.8, 128 permutations) that is 18 bands of 7 rows: a pair at J = 0.8 is a
//! candidate with probability 0.986, but so is one at J = 0.7 with 0.79 and at 0.5 with 0.13.
//! So a candidate is removed only where the signatures confirm it: the share of minima the two
//! agree on estimates J with a standard deviation of sqrt(J (1 - J) / permutations) (0.035 at
//! 0.8), and must reach the threshold less 1.645 of those deviations, which 95% of the pairs at
//! the threshold do. Removed at the defaults (126 permutations in 18 bands of 7, 94 of them to
//! agree): ~93% of the pairs at J = 0.8, ~12% at 0.7, ~1% at 0.65, none measurable at 0.6
//! (a shared band alone removed 79% at 0.7, 57% at 0.65 and 40% at 0.6).
//!
//! Memory: the only state that grows with the corpus. Per kept document the exact index holds
//! one 16-byte hash in a hash set (load factor at most 7/8, one control byte per slot: about
//! (16 + 1) * 8/7 = 19 bytes), and the near index the signature (its minima cut to 16 bits: two
//! different minima agree in them once in 65536, no measurable bias; 2 bytes a permutation,
//! 252 at the defaults) and per band an 8-byte key with a 4-byte document number in a hash map
//! (bands * (12 + 1) * 8/7 = 267 bytes at 18 bands): ~540 bytes per kept document in the worst
//! case just after a rehash doubles a table (about twice that while it rehashes). A billion
//! documents need ~540 GB: shard the corpus and deduplicate within shards there.

use std::collections::{HashMap, HashSet};

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, xxh3_128};

use ondol_core::Rng;

/// Exact duplicates: a set of 128-bit hashes of the (trimmed) text.
#[derive(Debug, Default)]
pub struct ExactIndex {
    seen: HashSet<u128>,
}

impl ExactIndex {
    /// The key of `text`: its 128-bit XXH3 after trimming surrounding whitespace.
    pub fn key(text: &str) -> u128 {
        xxh3_128(text.trim().as_bytes())
    }

    /// Records `key`; true when it was already there (a duplicate).
    pub fn check_and_insert(&mut self, key: u128) -> bool {
        !self.seen.insert(key)
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// Near-duplicate settings; each has a `data prepare` flag of the same name.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct NearDedupConfig {
    /// Characters per shingle.
    pub shingle: usize,
    /// Hash functions (permutations) in a signature.
    pub num_perm: usize,
    /// Bands (None: chosen from the threshold, see the module docs).
    pub bands: Option<usize>,
    /// Jaccard similarity at and above which documents count as near-duplicates.
    pub threshold: f64,
    pub seed: u64,
}

impl Default for NearDedupConfig {
    fn default() -> Self {
        Self { shingle: 5, num_perm: 128, bands: None, threshold: 0.8, seed: 0x6f6e646f6c }
    }
}

/// Signatures and band keys for one configuration; shared by all threads.
#[derive(Clone, Debug)]
pub struct MinHasher {
    shingle: usize,
    bands: usize,
    rows: usize,
    /// The least share of agreeing minima that confirms a candidate (see the module docs).
    min_agreement: f64,
    /// (a_p, b_p) per permutation, a_p odd.
    perms: Vec<(u64, u64)>,
}

impl MinHasher {
    /// Validates `cfg` (an `Err` names the flag) and draws the hash functions from its seed.
    pub fn new(cfg: &NearDedupConfig) -> Result<Self, String> {
        if cfg.shingle == 0 {
            return Err("--shingle 0: a shingle needs at least 1 character".into());
        }
        if !(cfg.threshold > 0.0 && cfg.threshold <= 1.0) {
            return Err(format!("--near-threshold {} is out of range: it must be in (0, 1]", cfg.threshold));
        }
        let (bands, rows) = match cfg.bands {
            Some(b) if b == 0 || b > cfg.num_perm => {
                return Err(format!("--bands {b} must be between 1 and --num-perm ({})", cfg.num_perm));
            }
            Some(b) => (b, cfg.num_perm / b),
            None => {
                if cfg.num_perm == 0 {
                    return Err("--num-perm 0: MinHash needs at least 1 permutation".into());
                }
                // Most rows per band that still catch >= 95% of pairs at the threshold.
                (1..=cfg.num_perm)
                    .map(|r| (cfg.num_perm / r, r))
                    .rfind(|&(b, r)| candidate_probability(cfg.threshold, b, r) >= 0.95)
                    .unwrap_or((cfg.num_perm, 1))
            }
        };
        let mut rng = Rng::new(cfg.seed);
        let perms = (0..bands * rows).map(|_| (rng.next_u64() | 1, rng.next_u64())).collect();
        let t = cfg.threshold;
        let min_agreement = t - 1.645 * (t * (1.0 - t) / (bands * rows) as f64).sqrt();
        Ok(Self { shingle: cfg.shingle, bands, rows, min_agreement, perms })
    }

    pub fn bands(&self) -> usize {
        self.bands
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The 64-bit hashes of the distinct shingles of `text` (see the module docs).
    pub fn shingles(&self, text: &str) -> Vec<u64> {
        let mut norm = String::with_capacity(text.len());
        for word in text.split_whitespace() {
            if !norm.is_empty() {
                norm.push(' ');
            }
            norm.extend(word.chars().flat_map(char::to_lowercase));
        }
        let mut bounds: Vec<usize> = norm.char_indices().map(|(i, _)| i).collect();
        bounds.push(norm.len());
        let k = self.shingle.min(bounds.len() - 1).max(1);
        let mut hashes: Vec<u64> = bounds.windows(k + 1).map(|w| xxh3_64(&norm.as_bytes()[w[0]..w[k]])).collect();
        if hashes.is_empty() {
            hashes.push(xxh3_64(norm.as_bytes()));
        }
        hashes.sort_unstable();
        hashes.dedup();
        hashes
    }

    /// The MinHash signature of `text`: per permutation, the minimum over its shingles.
    pub fn signature(&self, text: &str) -> Vec<u32> {
        let mut mins = vec![u32::MAX; self.perms.len()];
        for x in self.shingles(text) {
            for (m, &(a, b)) in mins.iter_mut().zip(&self.perms) {
                *m = (*m).min((a.wrapping_mul(x).wrapping_add(b) >> 32) as u32);
            }
        }
        mins
    }

    /// What the near index needs of `text`: its band keys and its signature.
    pub fn near_key(&self, text: &str) -> NearKey {
        let sig = self.signature(text);
        let bands = sig
            .chunks_exact(self.rows)
            .enumerate()
            .map(|(band, rows)| {
                let bytes: Vec<u8> = rows.iter().flat_map(|r| r.to_le_bytes()).collect();
                xxh3_64_with_seed(&bytes, band as u64)
            })
            .collect();
        NearKey { bands, signature: sig.iter().map(|&m| m as u16).collect() }
    }
}

/// A document as the near index sees it: one key per band (a hash of the band's rows and its
/// index), and the signature's minima cut to 16 bits.
#[derive(Clone, Debug, PartialEq)]
pub struct NearKey {
    bands: Vec<u64>,
    signature: Vec<u16>,
}

/// The probability that a pair at Jaccard similarity `j` shares a band.
pub fn candidate_probability(j: f64, bands: usize, rows: usize) -> f64 {
    1.0 - (1.0 - j.powi(rows as i32)).powi(bands as i32)
}

/// Kept documents recorded under one band key, at most (the first and the most recent): a
/// cluster of merely similar documents shares bands without confirming, and each new one would
/// be compared with all of it. So a document is compared with at most `bands * MAX_PER_BAND`
/// others, and every kept one is found through its bands until later ones push it out.
const MAX_PER_BAND: usize = 16;

/// Every kept document's band keys (the band index is part of each key) and signature.
#[derive(Clone, Debug)]
pub struct NearIndex {
    min_agreement: f64,
    /// Band key -> the first kept document with it.
    first: HashMap<u64, u32>,
    /// Band key -> the later kept documents with it (rare: a band shared without confirmation).
    later: HashMap<u64, Vec<u32>>,
    /// The kept documents' signatures, one after another.
    signatures: Vec<u16>,
    docs: u32,
}

impl NearIndex {
    pub fn new(hasher: &MinHasher) -> Self {
        let (first, later) = (HashMap::new(), HashMap::new());
        Self { min_agreement: hasher.min_agreement, first, later, signatures: Vec::new(), docs: 0 }
    }

    /// True when a kept document shares a band with `key` and the signatures confirm it (a
    /// near-duplicate; nothing is inserted); otherwise records `key`.
    pub fn check_and_insert(&mut self, key: &NearKey) -> bool {
        let n = key.signature.len();
        let confirms = |doc: u32| {
            let theirs = &self.signatures[doc as usize * n..][..n];
            let agree = theirs.iter().zip(&key.signature).filter(|(a, b)| a == b).count();
            agree as f64 >= self.min_agreement * n as f64
        };
        let mut compared = Vec::new();
        for k in &key.bands {
            let later = self.later.get(k).map_or(&[][..], Vec::as_slice);
            for &doc in self.first.get(k).into_iter().chain(later) {
                if compared.contains(&doc) {
                    continue; // a candidate through several bands
                }
                if confirms(doc) {
                    return true;
                }
                compared.push(doc);
            }
        }
        // Past u32::MAX documents (some 2 TB of index) the rest go unrecorded.
        if self.docs == u32::MAX {
            return false;
        }
        let doc = self.docs;
        self.docs += 1;
        self.signatures.extend_from_slice(&key.signature);
        for &k in &key.bands {
            match self.first.entry(k) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(doc);
                }
                std::collections::hash_map::Entry::Occupied(_) => {
                    let later = self.later.entry(k).or_default();
                    if later.len() + 1 == MAX_PER_BAND {
                        later.remove(0);
                    }
                    later.push(doc);
                }
            }
        }
        false
    }

    /// Band keys held.
    pub fn len(&self) -> usize {
        self.first.len()
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_empty()
    }
}

/// The exact Jaccard similarity of the shingle sets of two texts (for tests and reports).
pub fn jaccard(hasher: &MinHasher, a: &str, b: &str) -> f64 {
    let (a, b) = (hasher.shingles(a), hasher.shingles(b));
    let b_set: HashSet<u64> = b.iter().copied().collect();
    let both = a.iter().filter(|x| b_set.contains(x)).count();
    both as f64 / (a.len() + b.len() - both) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A document of `n` words drawn from a Zipf-like vocabulary of 3000 pseudo-words, so
    /// distinct documents share common words as natural text does.
    fn words(rng: &mut Rng, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                let r = rng.next_u64() % 3000;
                let rank = (r * r) / 3000; // skewed towards frequent words
                let mut w = Rng::new(rank);
                let len = 2 + (w.next_u64() % 7) as usize;
                (0..len).map(|_| (b'a' + (w.next_u64() % 26) as u8) as char).collect()
            })
            .collect()
    }

    /// `doc` with words replaced until the true Jaccard to it falls into `range`; None where a
    /// replacement jumps past it.
    fn edited(hasher: &MinHasher, rng: &mut Rng, doc: &[String], range: std::ops::Range<f64>) -> Option<String> {
        let original = doc.join(" ");
        let mut copy = doc.to_vec();
        let mut j = 1.0;
        while j >= range.end {
            let i = (rng.next_u64() % copy.len() as u64) as usize;
            copy[i] = words(rng, 1).remove(0);
            j = jaccard(hasher, &original, &copy.join(" "));
        }
        (j >= range.start).then(|| copy.join(" "))
    }

    /// Near-duplicates at and just above the threshold are removed, those well below it kept
    /// (a shared band alone removed about half of the pairs in [0.6, 0.65)), and distinct
    /// documents are kept.
    #[test]
    fn near_duplicates_are_removed_and_merely_similar_documents_kept() {
        let cfg = NearDedupConfig::default();
        let hasher = MinHasher::new(&cfg).unwrap();
        assert_eq!((hasher.bands(), hasher.rows()), (18, 7));
        let mut rng = Rng::new(7);
        let originals: Vec<Vec<String>> = (0..600).map(|_| words(&mut rng, 120)).collect();

        let mut index = NearIndex::new(&hasher);
        let mut false_positives = 0;
        for doc in &originals {
            false_positives += usize::from(index.check_and_insert(&hasher.near_key(&doc.join(" "))));
        }
        assert!(false_positives <= originals.len() / 100, "{false_positives} distinct documents flagged");

        // The share of edited copies with J in `range` that the index removes.
        let mut removed = |range: std::ops::Range<f64>| {
            let (mut planted, mut caught) = (0, 0);
            for doc in originals.iter().take(300) {
                if let Some(copy) = edited(&hasher, &mut rng, doc, range.clone()) {
                    planted += 1;
                    caught += usize::from(index.clone().check_and_insert(&hasher.near_key(&copy)));
                }
            }
            assert!(planted >= 200, "only {planted} copies landed in {range:?}");
            caught as f64 / planted as f64
        };
        let recall = removed(cfg.threshold..cfg.threshold + 0.08);
        assert!(recall >= 0.95, "{recall:.3} of the copies at J in [0.8, 0.88) removed");
        let similar = removed(0.6..0.65);
        assert!(similar <= 0.05, "{similar:.3} of the copies at J in [0.6, 0.65) removed");
    }

    /// Documents that share bands without confirming are all kept, each recorded under a band
    /// with at most MAX_PER_BAND others, so a new one is compared with a bounded number.
    #[test]
    fn a_cluster_of_merely_similar_documents_stays_bounded() {
        let hasher = MinHasher::new(&NearDedupConfig::default()).unwrap();
        let mut index = NearIndex::new(&hasher);
        for doc in 0..100u16 {
            // The same bands, signatures that agree nowhere.
            let key = NearKey { bands: vec![7, 8, 9], signature: vec![doc; 126] };
            assert!(!index.check_and_insert(&key), "document {doc} removed without agreeing");
        }
        assert!(index.later.values().all(|docs| docs.len() < MAX_PER_BAND), "{:?}", index.later);
        assert_eq!(index.docs, 100);
        // The newest is still found: a copy of it is removed.
        assert!(index.check_and_insert(&NearKey { bands: vec![7, 8, 9], signature: vec![99; 126] }));
    }

    #[test]
    fn exact_keys_ignore_surrounding_whitespace_and_bands_follow_the_flags() {
        let mut exact = ExactIndex::default();
        assert!(!exact.check_and_insert(ExactIndex::key("같은 문서\n")));
        assert!(exact.check_and_insert(ExactIndex::key("  같은 문서")));
        assert!(!exact.check_and_insert(ExactIndex::key("다른 문서")));

        let h = MinHasher::new(&NearDedupConfig { bands: Some(16), ..Default::default() }).unwrap();
        assert_eq!((h.bands(), h.rows()), (16, 8));
        let h = MinHasher::new(&NearDedupConfig { threshold: 0.5, ..Default::default() }).unwrap();
        assert!(candidate_probability(0.5, h.bands(), h.rows()) >= 0.95);
        assert!(candidate_probability(0.5, 128 / (h.rows() + 1), h.rows() + 1) < 0.95);
        for bad in [
            NearDedupConfig { shingle: 0, ..Default::default() },
            NearDedupConfig { bands: Some(200), ..Default::default() },
            NearDedupConfig { threshold: 1.5, ..Default::default() },
        ] {
            assert!(MinHasher::new(&bad).unwrap_err().starts_with("--"));
        }
        // A text shorter than a shingle still has a signature, and identical texts agree.
        assert_eq!(h.near_key("ab"), h.near_key("AB"));
    }
}
