//! Lines for the person watching a command: notes, warnings and progress, on standard error.

use std::io::Write;

/// Writes `args` and a newline to standard error in one `write_all` (so a rank the launcher
/// stops meanwhile leaves all of a short line or none), and goes on where it cannot be written:
/// a full disk or a closed pipe under the log must not end a training run, as `eprintln!`
/// would by panicking.
pub fn line(args: std::fmt::Arguments) {
    let mut text = args.to_string();
    text.push('\n');
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// [`line`] with `format!`'s arguments: `say!("wrote {}", path.display())`.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say::line(format_args!($($arg)*))
    };
}
