//! Data-preparation throughput: `cargo bench -p ondol-data --bench data_prepare [-- --mb 20]`.
//!
//! Builds a corpus of about `--mb` MB from data/sample: copy `c` of every file has each letter
//! shifted by `c` (Latin letters rotate within the alphabet, Hangul syllables move by `c`
//! initial consonants), so copies are distinct documents with the statistics of the original
//! rather than duplicates that dedup would drop before the expensive stages. Paragraphs are the
//! documents. A tokenizer (vocabulary `--vocab`, default 8192) is trained on the sample, then
//! `data prepare` runs end to end with and without near-dedup; throughput is input MB/s.
//!
//! `-- encode TEXT_FILE TOKENIZER_JSON` instead measures the tokenizer's encode throughput on the
//! paragraphs of TEXT_FILE (used by benches/tokenizer-vs-python.sh) and prints one JSON line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ondol_data::input::{DocSplit, InputOptions};
use ondol_data::prepare::{PrepareConfig, prepare};
use ondol_data::tokenizer::{self, EOT_TOKEN, TextTokenizer, TrainConfig};

fn shift(text: &str, c: u32) -> String {
    text.chars()
        .map(|ch| {
            let u = ch as u32;
            let shifted = match ch {
                'a'..='z' => (u - 97 + c) % 26 + 97,
                'A'..='Z' => (u - 65 + c) % 26 + 65,
                '\u{AC00}'..='\u{D7A3}' => 0xAC00 + (u - 0xAC00 + c * 588) % 11172,
                _ => u,
            };
            char::from_u32(shifted).unwrap_or(ch)
        })
        .collect()
}

fn arg(args: &[String], name: &str, default: f64) -> f64 {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// CPU seconds (user + system, all threads) this process has used, from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0 // utime, stime (fields 14 and 15), at USER_HZ = 100
}

fn encode(text_file: &str, tokenizer_file: &str) {
    let text = std::fs::read_to_string(text_file).expect("read the text file");
    let docs: Vec<&str> = text.split("\n\n").filter(|d| !d.trim().is_empty()).collect();
    let tok = TextTokenizer::from_file(Path::new(tokenizer_file), EOT_TOKEN).expect("load the tokenizer");
    let (mut best, mut best_cpu) = (f64::MAX, f64::MAX);
    let mut tokens = 0;
    for _ in 0..3 {
        let (start, cpu) = (Instant::now(), cpu_seconds());
        let ids = tok.encode_batch(docs.clone()).expect("encode");
        best = best.min(start.elapsed().as_secs_f64());
        best_cpu = best_cpu.min(cpu_seconds() - cpu);
        tokens = ids.iter().map(Vec::len).sum::<usize>();
    }
    let mb = text.len() as f64 / 1e6;
    println!(
        "{{\"impl\": \"ondol\", \"docs\": {}, \"mb\": {mb:.2}, \"tokens\": {tokens}, \"seconds\": {best:.3}, \
         \"mb_per_s\": {:.2}, \"cpu_seconds\": {best_cpu:.2}, \"mb_per_cpu_s\": {:.2}}}",
        docs.len(),
        mb / best,
        mb / best_cpu
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "encode") {
        return encode(&args[i + 1], &args[i + 2]);
    }
    let mb = arg(&args, "--mb", 20.0);
    let vocab = arg(&args, "--vocab", 8192.0) as usize;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample");
    let work = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-data-prepare");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("corpus")).unwrap();
    let mut sample: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    sample.sort();
    let texts: Vec<String> = sample.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect();
    let per_copy: usize = texts.iter().map(String::len).sum();
    let copies = ((mb * 1e6) / per_copy as f64).ceil() as u32;
    let mut inputs = Vec::new();
    for c in 0..copies {
        for (p, text) in sample.iter().zip(&texts) {
            let path = work.join("corpus").join(format!("{c:02}-{}", p.file_name().unwrap().to_string_lossy()));
            std::fs::write(&path, shift(text, c)).unwrap();
            inputs.push(path);
        }
    }
    let total = per_copy as f64 * copies as f64 / 1e6;
    let options = InputOptions { doc_split: DocSplit::BlankLine, ..InputOptions::default() };
    let start = Instant::now();
    let cfg = TrainConfig { vocab_size: vocab, ..Default::default() };
    let (tok, _) = tokenizer::train(sample.clone(), &options, &cfg).unwrap();
    tok.save(&work.join("tokenizer.json")).unwrap();
    println!(
        "tokenizer: {vocab} tokens trained on {:.2} MB in {:.2} s",
        per_copy as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    println!(
        "corpus: {total:.1} MB ({copies} shifted copies of data/sample), paragraphs as documents, {} threads",
        rayon::current_num_threads()
    );
    for near in [true, false] {
        let mut cfg = PrepareConfig::new(inputs.clone(), work.join("tokenizer.json"), work.join("out"));
        (cfg.input, cfg.overwrite, cfg.progress) = (options.clone(), true, false);
        if !near {
            cfg.near_dedup = None;
        }
        let (start, cpu) = (Instant::now(), cpu_seconds());
        let m = prepare(&cfg, vec![], "bench").unwrap();
        let (secs, cpu) = (start.elapsed().as_secs_f64(), cpu_seconds() - cpu);
        println!(
            "data prepare, near-dedup {}: {:.2} s, {:.2} MB/s ({:.2} MB per CPU-second); {} documents read, {} kept, {} tokens",
            if near { "on " } else { "off" },
            secs,
            total / secs,
            total / cpu,
            m.documents.read,
            m.documents.kept,
            m.tokens["train"] + m.tokens["val"]
        );
    }
}
