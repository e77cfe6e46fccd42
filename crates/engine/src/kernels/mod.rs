//! batchlab's own CPU kernels, apart from the model code that calls them: the packed integer
//! matrix product ([`packed`], on AVX2, AVX-512 VNNI and AMX tiles), the gated MLP activations
//! ([`activation`]) and attention's inner loops over the f16 cache ([`attention`]). Each
//! kernel asks [`cpu_features`] which code path this CPU runs; none detects features itself.
//!
//! This is where the engine's `unsafe` code lives (SIMD intrinsics, inline assembly, threads
//! writing disjoint parts of one buffer, one system call): the `unsafe_code` lint, denied
//! everywhere else, is allowed module by module below, and every block says why it is sound.

// AVX-512 intrinsics and threads writing disjoint chunks of one buffer, each block with its reason.
#[allow(unsafe_code)]
pub(crate) mod activation;
// AVX-512 intrinsics over slices whose lengths are checked first.
#[allow(unsafe_code)]
pub(crate) mod attention;
// One system call: asking Linux for the AMX tile state (see the module's docs).
#[allow(unsafe_code)]
pub(crate) mod cpu_features;
// SIMD intrinsics, AMX assembly and threads writing disjoint parts of one buffer; every block
// says why it is sound.
#[allow(unsafe_code)]
pub(crate) mod packed;

/// Whether this CPU runs batchlab's packed integer kernel (AVX-512 with VNNI, or AVX2 with
/// FMA and F16C): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q4_K weights are then repacked at load and
/// every matmul row goes through it (whole tiles of 16 rows on AMX where the CPU has it);
/// elsewhere candle's kernels run them.
pub fn packed_kernel() -> bool {
    packed::Isa::best().is_some()
}

/// The contiguous data of a CPU tensor, as its storage and layout describe it (from the
/// layout's start offset): the kernels read their inputs in place, without copying them out.
pub(crate) fn cpu_slice<'a, T: candle_core::WithDType>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("a contiguous tensor is needed here")
    };
    match storage {
        candle_core::Storage::Cpu(cpu) => Ok(&cpu.as_slice::<T>()?[start..end]),
        _ => candle_core::bail!("a CPU tensor is needed here"),
    }
}

/// Raw pointer that the threads of one kernel call write disjoint parts of (the packed matmul's
/// output columns, the activations' chunks).
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32);
// SAFETY: every user writes only the elements of its own work item.
#[allow(unsafe_code)] // Sharing the pointer across threads; see the SAFETY note above.
unsafe impl Send for Out {}
// SAFETY: as for `Send`: no two work items touch the same element.
#[allow(unsafe_code)] // Sharing the pointer across threads; see the SAFETY note above.
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so that closures capture the whole `Out`, which is `Sync`).
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}
