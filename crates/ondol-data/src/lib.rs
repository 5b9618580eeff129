//! ondol-data: the data side of training.
//!
//! - [`shard`]: llm.c / modded-nanogpt token shards (memory-mapped reading, atomic writing).
//! - [`bytes`]: the byte-level tokenizer, for raw text without a trained vocabulary.
//! - [`stream`]: many shards or text files as one token sequence, with train/validation split
//!   and data file patterns.
//! - [`tokenizer`]: byte-level BPE training (Hugging Face `tokenizers`) and loading.
//! - [`chat`]: conversations rendered by a model's chat template, with the assistant's spans.
//! - [`input`], [`clean`], [`dedup`], [`prepare`]: raw corpora (text, JSON Lines, gzip, zstd)
//!   to cleaned, deduplicated token shards with a manifest (`ondol data prepare`).
//! - [`mask`]: loss masks beside shards (which targets are learned, for fine-tuning on
//!   completions).
//! - [`loader`]: seeded, rank-sharded batches of (inputs, targets) whose position is a
//!   two-number cursor saved with every checkpoint; [`mixture`]: several weighted sources.
//!
//! Every error a user can cause is a [`DataError`] that names the file and what was wrong.

pub mod bytes;
pub mod chat;
pub mod clean;
pub mod dedup;
mod error;
pub mod input;
pub mod loader;
pub mod mask;
pub mod mixture;
pub mod prepare;
pub mod shard;
pub mod stream;
pub mod tokenizer;

pub use bytes::ByteTokenizer;
pub use error::DataError;
pub use loader::{Cursor, Loader, Order};
pub use mixture::{Mixture, MixtureCursor};
pub use shard::{Shard, ShardVersion, write_shard};
pub use stream::{SourceKind, TokenStream, expand_globs, file_identity};
pub use tokenizer::TextTokenizer;
