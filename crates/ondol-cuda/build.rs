//! Builds the SIMT emulator (emu/): every kernels/*.cu file (and emu/selftest.cu, the
//! emulator's own test kernels) compiled as host C++, with a thunk per kernel that unpacks a
//! cuLaunchKernel-style argument array, and a table per family, so `src/emu.rs` can launch
//! any kernel by family and name on the CPU.
//!
//! Per family: the source (common.cuh pasted in, as NVRTC gets it) goes into a namespace of
//! its own (templates of the same name in two files stay apart); `extern __shared__` arrays
//! become pointers to the block's dynamic shared memory, and each static `__shared__` array
//! is poisoned once per block (see [`static_shared`]); the host compiler's preprocessor,
//! with `__global__` left as a marker, expands the kernel macros so the `extern "C"` kernel
//! signatures can be read off; then the thunks and the table are appended.

#[path = "src/source.rs"]
mod source;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let kernels = manifest.join("../../kernels");
    let emu = manifest.join("emu");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for dir in [&kernels, &emu] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    let common = read(&kernels.join("common.cuh"));
    let mut families: Vec<(String, PathBuf)> = std::fs::read_dir(&kernels)
        .expect("kernels/ exists")
        .filter_map(|e| {
            let path = e.ok()?.path();
            println!("cargo:rerun-if-changed={}", path.display());
            if path.extension()? != "cu" {
                return None;
            }
            Some((path.file_stem()?.to_string_lossy().into_owned(), path))
        })
        .collect();
    families.sort();
    // Kernels with the faults the emulator must catch, for its own tests (src/emu.rs); the
    // GPU never compiles them.
    families.push(("emu_selftest".into(), emu.join("selftest.cu")));

    let mut build = cc::Build::new();
    build.cpp(true).std("c++17").opt_level(2).warnings(false).flag("-w").include(&emu).file(emu.join("emu.cpp"));
    let compiler = build.get_compiler();
    let mut registry = String::from("#include \"emu.h\"\n#include <cstring>\n");
    let mut lookup = String::new();
    for (family, path) in &families {
        let body = format!(
            "#include \"emu.h\"\nnamespace ondol_family_{family} {{\n{}\n",
            static_shared(&dynamic_shared(&source::with_common(&read(path), &common)))
        );
        // The kernel signatures, from the preprocessed source (the macros expanded).
        let probe = out.join(format!("probe_{family}.cpp"));
        write(&probe, &format!("{body}}}\n"));
        let expanded = Command::new(compiler.path())
            .args(compiler.args())
            .args(["-E", "-P", "-D__global__=ONDOL_KERNEL", "-DONDOL_EMU_PROBE", "-I"])
            .arg(&emu)
            .arg(&probe)
            .output()
            .expect("the host C++ compiler runs");
        if !expanded.status.success() {
            panic!("preprocessing {} failed:\n{}", path.display(), String::from_utf8_lossy(&expanded.stderr));
        }
        let signatures = kernel_signatures(&String::from_utf8_lossy(&expanded.stdout));
        assert!(!signatures.is_empty(), "{} defines no extern \"C\" __global__ kernel", path.display());
        let mut unit = body;
        for k in &signatures {
            let args: Vec<String> = k.types.iter().enumerate().map(|(i, t)| format!("*({t}*)p[{i}]")).collect();
            writeln!(unit, "static void thunk_{}(void** p) {{ {}({}); }}", k.name, k.name, args.join(", ")).unwrap();
        }
        writeln!(unit, "extern \"C\" const OndolEmuKernel ondol_emu_table_{family}[] = {{").unwrap();
        for k in &signatures {
            let bound = k.max_threads.as_deref().unwrap_or("1024");
            writeln!(unit, "    {{\"{}\", thunk_{}, (unsigned)({bound})}},", k.name, k.name).unwrap();
        }
        unit.push_str("    {nullptr, nullptr, 0}};\n}\n");
        let unit_path = out.join(format!("emu_{family}.cpp"));
        write(&unit_path, &unit);
        build.file(&unit_path);
        writeln!(registry, "extern \"C\" const OndolEmuKernel ondol_emu_table_{family}[];").unwrap();
        writeln!(lookup, "    if (!std::strcmp(family, \"{family}\")) return ondol_emu_table_{family};").unwrap();
    }
    registry.push_str("extern \"C\" const OndolEmuKernel* ondol_emu_family(const char* family) {\n");
    registry.push_str(&lookup);
    registry.push_str("    return nullptr;\n}\n");
    let path = out.join("emu_registry.cpp");
    write(&path, &registry);
    build.file(&path);
    build.compile("ondol_emu");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// `extern __shared__ T name[];` becomes `T* name = (T*)ondol_emu_dynamic_smem();`.
fn dynamic_shared(src: &str) -> String {
    const DECL: &str = "extern __shared__";
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(at) = rest.find(DECL) {
        out.push_str(&rest[..at]);
        let after = &rest[at + DECL.len()..];
        let end = after.find(';').expect("an extern __shared__ declaration ends with ;");
        let decl = after[..end].trim();
        let decl = match decl.find("__align__(") {
            Some(a) => {
                let close = a + decl[a..].find(')').expect("__align__( closes");
                format!("{}{}", &decl[..a], &decl[close + 1..])
            }
            None => decl.to_string(),
        };
        let decl = decl.trim().strip_suffix("[]").expect("an extern __shared__ array is declared with []").trim();
        let split = decl.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).expect("a type before the name");
        let (ty, name) = (decl[..=split].trim(), &decl[split + 1..]);
        write!(out, "{ty}* {name} = ({ty}*)ondol_emu_dynamic_smem()").unwrap();
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// After each `__shared__ T a[..], b[..];` (the static arrays, once [`dynamic_shared`] has
/// rewritten the extern ones), `ondol_emu_static_shared(a, sizeof(a));` for every array: the
/// emulator fills it with 0xff bytes once per block, as a GPU leaves it undefined.
fn static_shared(src: &str) -> String {
    const DECL: &str = "__shared__";
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(at) = rest.find(DECL) {
        let end = at + rest[at..].find(';').expect("a __shared__ declaration ends with ;");
        out.push_str(&rest[..=end]);
        let declarators = rest[at + DECL.len()..end].trim();
        for (i, decl) in declarators.split(',').enumerate() {
            // The first declarator follows the type: its name is the last word before '['.
            let decl = decl.split('[').next().expect("split yields a first piece").trim();
            let name = if i == 0 { decl.rsplit(char::is_whitespace).next().expect("a name") } else { decl };
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_'),
                "a __shared__ declaration this rewrite does not understand: {}",
                &rest[at..=end]
            );
            write!(out, " ondol_emu_static_shared({name}, sizeof({name}));").unwrap();
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// A kernel as the emulator's table lists it.
struct Signature {
    name: String,
    /// Each parameter's type.
    types: Vec<String>,
    /// The expression of its `__launch_bounds__`' thread count, if it has them.
    max_threads: Option<String>,
}

/// Every `extern "C" __global__ void [__launch_bounds__(n)] name(params)` of the preprocessed
/// source (with `__global__` as ONDOL_KERNEL and the bounds as ONDOL_BOUNDS(n)).
fn kernel_signatures(src: &str) -> Vec<Signature> {
    const MARK: &str = "ONDOL_KERNEL void ";
    const BOUNDS: &str = "ONDOL_BOUNDS(";
    let mut found = Vec::new();
    let mut rest = src;
    while let Some(at) = rest.find(MARK) {
        let mut after = rest[at + MARK.len()..].trim_start();
        let mut max_threads = None;
        if let Some(bounds) = after.strip_prefix(BOUNDS) {
            // The thread count's expression, up to the parenthesis that closes the bounds.
            let mut depth = 1;
            let end = bounds
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '(' => 1,
                        ')' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .expect("__launch_bounds__ closes")
                .0;
            max_threads = Some(bounds[..end].to_string());
            after = &bounds[end + 1..];
        }
        let open = after.find('(').expect("a kernel's parameter list");
        let close = open + after[open..].find(')').expect("a kernel's parameter list closes");
        let name = after[..open].trim().to_string();
        let types = after[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty() && *p != "void")
            .map(|p| {
                let split = p.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).expect("a parameter has a type");
                p[..=split].replace("__restrict", "").trim().to_string()
            })
            .collect();
        found.push(Signature { name, types, max_threads });
        rest = &after[close..];
    }
    found
}
