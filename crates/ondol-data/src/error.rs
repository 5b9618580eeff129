//! The one error type of ondol-data. Every error a user can cause (a bad file, a pattern that
//! matches nothing, sizes that cannot work) names the file, the offset or field, and what
//! would have been valid, so it can be fixed without reading this crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file system refused `action` ("open", "read", "write", ...) on `path`.
    #[error("cannot {action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    /// A file whose contents are not what its kind requires; `message` says where and why.
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
    /// A data file pattern that is malformed or matches no file.
    #[error("data pattern `{pattern}`: {message}")]
    Pattern { pattern: String, message: String },
    /// Arguments that cannot work together (sizes, fractions, ranks, cursors, tokens).
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { action, path: path.into(), source }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Format { path: path.into(), message: message.into() }
    }
}

/// Data errors already name their file and offset; the rest of ondol reports them as
/// input errors, so `?` converts them.
impl From<DataError> for ondol_core::Error {
    fn from(e: DataError) -> Self {
        ondol_core::Error::Input(e.to_string())
    }
}
