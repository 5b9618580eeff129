//! Every kernel family compiles with NVRTC, the way the binary compiles them at run time,
//! for Ampere and Hopper. NVRTC needs no GPU: CI puts the wheel's libnvrtc on
//! LD_LIBRARY_PATH (scripts/cuda-toolchain.sh); without it the test says so and skips.

use ondol_cuda::{FAMILIES, compile_cubin, nvrtc_available};

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
