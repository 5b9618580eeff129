//! How a kernel file becomes one self-contained source: shared by the run-time compile
//! (`compile.rs`, NVRTC) and the emulator's build (`build.rs`, the host C++ compiler).

/// `source` with common.cuh pasted in place of its include (NVRTC is given no include path),
/// without its include guard.
pub fn with_common(source: &str, common: &str) -> String {
    source.replace("#include \"common.cuh\"", &common.replace("#pragma once", ""))
}
