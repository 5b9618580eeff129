//! Run-time dispatch to the widest vector instructions the CPU has. The crate is built for
//! baseline x86-64 (SSE2: 4 lanes), so binaries run anywhere; loops bound by arithmetic on
//! short vectors (the scans' `exp` over the states) gain 2-4x from AVX2 or AVX-512.
//!
//! [`dispatched!`] defines a function whose body runs through copies compiled with `avx512f`
//! and with `avx2,fma`, chosen by CPU detection (cached by std). All that inlines into a copy
//! gets its instructions (so the helpers it calls are `#[inline(always)]`); no fused
//! multiply-adds are formed (Rust never contracts `a * b + c`), so every copy gives the same
//! bits.

/// `dispatched! { fn name(args) -> Ret { body } }` defines `name`, whose body runs compiled
/// for the widest of AVX-512, AVX2 with FMA and the baseline that the CPU has. Arguments are
/// plain names (destructure in the body).
macro_rules! dispatched {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) -> $ret {
            // The copies mirror the signature: the lints on it are the outer function's.
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn wide($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                fn middle($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vl") {
                    // SAFETY: the CPU has the instructions `wide` was compiled for.
                    return unsafe { wide($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for `middle`.
                    return unsafe { middle($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use dispatched;
