//! Every kernel family compiles with NVRTC, the way the binary compiles them at run time,
//! for Ampere and Hopper. NVRTC needs no GPU: CI puts the wheel's libnvrtc on
//! LD_LIBRARY_PATH (scripts/cuda-toolchain.sh); without it the test says so and skips.

use ondol_cuda::{FAMILIES, cached_cubin, compile_cubin, forget_cached, nvrtc_available};

#[test]
fn every_kernel_family_compiles_with_nvrtc() {
    if !nvrtc_available() {
        assert!(
            std::env::var_os("ONDOL_REQUIRE_GPU").is_none(),
            "ONDOL_REQUIRE_GPU is set but libnvrtc.so.13 is missing"
        );
        eprintln!("skipped: libnvrtc.so.13 is not on the library path (see scripts/cuda-toolchain.sh)");
        return;
    }
    for family in &FAMILIES {
        for arch in ["80", "90a"] {
            let cubin = compile_cubin(family, arch).unwrap_or_else(|e| panic!("{e}"));
            // An ELF image, not PTX text.
            assert_eq!(&cubin[..4], b"\x7fELF", "{} sm_{arch}", family.name);
        }
    }
}

/// The kernel cache hands back what it stored, and compiles anew once a cubin is forgotten
/// (as one the driver refused to load is). The only test here that sets the cache's place.
#[test]
fn the_kernel_cache_keeps_a_cubin_until_it_is_forgotten() {
    if !nvrtc_available() {
        eprintln!("skipped: libnvrtc.so.13 is not on the library path (see scripts/cuda-toolchain.sh)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ondol-kernel-cache-{}", std::process::id()));
    // SAFETY: no other test of this binary reads or writes the environment.
    unsafe { std::env::set_var("ONDOL_KERNEL_CACHE", &dir) };
    let family = FAMILIES.iter().find(|f| f.name == "rope").expect("the rope kernels");
    let fresh = cached_cubin(family, "80").unwrap();
    let stored: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(stored.len(), 1, "one cubin and no temporary file: {stored:?}");
    assert_eq!(std::fs::read(&stored[0]).unwrap(), fresh);
    // What is stored is what comes back, without compiling.
    std::fs::write(&stored[0], b"not a cubin").unwrap();
    assert_eq!(cached_cubin(family, "80").unwrap(), b"not a cubin");
    forget_cached(family, "80");
    assert!(!stored[0].exists());
    assert_eq!(cached_cubin(family, "80").unwrap(), fresh);
    std::fs::remove_dir_all(&dir).unwrap();
}
