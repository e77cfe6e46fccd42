//! What this CPU (and, for AMX, this process) can run: the one place the kernels ask.
//!
//! Each answer is computed once per process and cached. The kernels choose their code paths
//! from these answers only, so a CPU computes a model's numbers one way, whichever kernel asks:
//! the AVX-512 activations ([`super::activation`]) run exactly where the packed kernel
//! ([`super::packed`]) runs on AVX-512 VNNI, the packed kernel takes its AVX2 path only where
//! AVX-512 VNNI is missing, and AMX tiles only where AVX-512 VNNI runs the rest of its rows.
//!
//! AMX needs more than a CPUID bit: Linux hands out the 8 KB tile state only to processes that
//! ask for it (`arch_prctl`), and without the grant the first tile instruction kills the
//! process. [`amx_int8`] asks, once; that system call is the only `unsafe` code here.

use std::sync::OnceLock;

/// The vector instruction sets the kernels choose between, read from CPUID once.
struct Vector {
    avx2: bool,
    avx512_vnni: bool,
}

/// This CPU's [`Vector`] answers (computed on first use).
fn vector() -> &'static Vector {
    static DETECTED: OnceLock<Vector> = OnceLock::new();
    DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            Vector {
                avx2: has!("avx2") && has!("fma") && has!("f16c"),
                avx512_vnni: has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Vector {
                avx2: false,
                avx512_vnni: false,
            }
        }
    })
}

/// Whether this CPU has AVX-512 F, BW and VNNI (checked once): the packed integer kernel's
/// `vpdpbusd` dot products, and the AVX-512 activations, run where this is true.
pub(crate) fn avx512_vnni() -> bool {
    vector().avx512_vnni
}

/// Whether this CPU has AVX2, FMA and F16C (checked once): the packed kernel's AVX2 path runs
/// where this is true and [`avx512_vnni`] is not (x86-64-v3 machines such as AMD Zen 2 and 3).
pub(crate) fn avx2() -> bool {
    vector().avx2
}

/// Whether the packed kernel may run whole tiles of 16 rows on AMX (asked once): the CPU has
/// AVX-512 VNNI ([`avx512_vnni`], for the rows that do not fill a tile) and AMX int8 tiles,
/// and Linux granted this process their state.
pub(crate) fn amx_int8() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| avx512_vnni() && cpu_has_amx_int8() && tile_state_granted())
}

/// CPUID leaf 7: EDX bit 24 (AMX-TILE) and bit 25 (AMX-INT8).
#[cfg(target_arch = "x86_64")]
fn cpu_has_amx_int8() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    let leaf = __cpuid(0);
    if leaf.eax < 7 {
        return false;
    }
    let features = __cpuid_count(7, 0);
    features.edx & (1 << 24) != 0 && features.edx & (1 << 25) != 0
}

/// Other architectures have no AMX.
#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_amx_int8() -> bool {
    false
}

/// Asks Linux for the tile data state (`ARCH_REQ_XCOMP_PERM`, `XFEATURE_XTILEDATA`): without
/// it the first tile instruction kills the process. The grant covers every thread.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(unsafe_code)] // One system call (`libc::syscall` is an `unsafe fn`); see the SAFETY note.
fn tile_state_granted() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it touches no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

/// Other systems: not asked, not used.
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn tile_state_granted() -> bool {
    false
}

/// Why a test machine cannot run the kernel that `BATCHLAB_REQUIRE_KERNEL` names (`avx2`,
/// `vnni` or `amx`; unset or empty: none), given what the CPU has; `None` when it can. A test machine
/// bought for a kernel sets it, so that the kernel tests fail there instead of passing on a
/// slower path with the fast one unchecked.
#[cfg(test)]
fn required_kernel_missing(
    required: Option<&str>,
    avx2: bool,
    vnni: bool,
    amx: bool,
) -> Option<String> {
    match required.map(str::trim).unwrap_or("") {
        "" => None,
        "avx2" if avx2 => None,
        "vnni" if vnni => None,
        "amx" if amx => None,
        name @ ("avx2" | "vnni" | "amx") => Some(format!(
            "BATCHLAB_REQUIRE_KERNEL={name}, but this CPU (or process) runs: {}",
            describe()
        )),
        other => Some(format!(
            "BATCHLAB_REQUIRE_KERNEL={other:?} names no kernel: use avx2, vnni or amx"
        )),
    }
}

/// Fails the calling test when `BATCHLAB_REQUIRE_KERNEL` names a kernel this machine cannot
/// run (see [`required_kernel_missing`]); every kernel test calls it first, so none passes on
/// the portable path where a fast one was required. Prints the path it will check.
#[cfg(test)]
pub(crate) fn check_required_kernel() {
    eprintln!("CPU kernel path: {}", describe());
    let required = std::env::var("BATCHLAB_REQUIRE_KERNEL").ok();
    if let Some(why) =
        required_kernel_missing(required.as_deref(), avx2(), avx512_vnni(), amx_int8())
    {
        panic!("{why}");
    }
}

/// The kernel path this CPU takes, in words (the kernel tests print it).
#[cfg(test)]
pub(crate) fn describe() -> &'static str {
    match (avx512_vnni(), amx_int8(), avx2()) {
        (true, true, _) => "AMX int8 tiles for whole tiles of 16 rows, AVX-512 VNNI for the rest",
        (true, false, _) => "AVX-512 VNNI (no AMX)",
        (false, _, true) => "AVX2 (no AVX-512 VNNI)",
        (false, _, false) => "portable: candle's kernels (no AVX2)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AMX is only ever used alongside AVX-512 VNNI (the rows that do not fill a tile go
    /// through it), AVX-512 VNNI machines can run the AVX2 path, and the answers do not change
    /// once asked.
    #[test]
    fn amx_implies_avx512_vnni_and_answers_are_stable() {
        check_required_kernel();
        if amx_int8() {
            assert!(avx512_vnni());
        }
        // The tests run the AVX2 path on AVX-512 machines too.
        if avx512_vnni() {
            assert!(avx2());
        }
        assert_eq!(avx512_vnni(), avx512_vnni());
        assert_eq!(amx_int8(), amx_int8());
    }

    /// A required kernel the machine lacks, or a name that is no kernel, fails; nothing
    /// required, or what the machine has, passes.
    #[test]
    fn a_required_kernel_the_cpu_lacks_fails_the_kernel_tests() {
        assert_eq!(required_kernel_missing(None, false, false, false), None);
        assert_eq!(required_kernel_missing(Some(""), false, false, false), None);
        assert_eq!(
            required_kernel_missing(Some("avx2"), true, false, false),
            None
        );
        assert_eq!(
            required_kernel_missing(Some("vnni"), true, true, false),
            None
        );
        assert_eq!(required_kernel_missing(Some("amx"), true, true, true), None);
        let missing = required_kernel_missing(Some("amx"), true, true, false).unwrap();
        assert!(
            missing.starts_with("BATCHLAB_REQUIRE_KERNEL=amx, but"),
            "{missing}"
        );
        assert!(required_kernel_missing(Some("avx2"), false, false, false).is_some());
        assert!(required_kernel_missing(Some("vnni"), true, false, false).is_some());
        assert!(required_kernel_missing(Some("amx"), true, false, false).is_some());
        let unknown = required_kernel_missing(Some("sse2"), true, true, true).unwrap();
        assert!(unknown.contains("names no kernel"), "{unknown}");
    }
}
