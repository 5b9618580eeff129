//! The error type shared by the compute crates. Errors a user can cause carry enough
//! context (file, field, offset) to be fixed without reading the code.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value that cannot work; `key` is the dotted config path.
    #[error("invalid value for `{key}`: {message}")]
    Config { key: String, message: String },
    /// An input file or its contents cannot be used; the message names the file.
    #[error("{0}")]
    Input(String),
    /// Training cannot go on (e.g. the loss diverged); the message says what to change.
    #[error("{0}")]
    Training(String),
    /// The requested device or backend is not available on this machine.
    #[error("{0}")]
    Unavailable(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

impl Error {
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config { key: key.into(), message: message.into() }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
