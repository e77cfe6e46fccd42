//! batchlab's own CPU kernels, apart from the model code that calls them: the packed integer
//! matrix product ([`packed`], on AVX2, AVX-512 VNNI and AMX tiles), the gated MLP activations
//! ([`activation`]), attention's inner loops over the f16 cache ([`attention`]), and RMS norms,
//! rotary embeddings and residual sums ([`rowwise`]). Each kernel asks [`cpu_features`] which
//! code path this CPU runs; none detects features itself.
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
pub(crate) mod rowwise;

/// Whether this CPU runs batchlab's packed integer kernel (AVX-512 with VNNI, or AVX2 with
/// FMA and F16C): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q4_K weights are then repacked at load and
/// every matmul row goes through it (whole tiles of 16 rows on AMX where the CPU has it);
/// elsewhere candle's kernels run them.
pub fn packed_kernel() -> bool {
    packed::Isa::best().is_some()
}

thread_local! {
    /// Set while this thread runs one part of a forward pass that other threads run other
    /// parts of ([`side_by_side`]): its kernels then run on it alone.
    static THIS_THREAD_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` over the work items `0..n`, in chunks shared out to candle's CPU threads (its
/// barrier pool, this thread taking part); a single item, or every item inside
/// [`side_by_side`], runs on this thread without waking the others. Every kernel shares its
/// work out through here. A panic in `f` is raised here, never inside the pool ([`Caught`]).
pub(crate) fn chunked<F: Fn(std::ops::Range<usize>) + Sync>(n: usize, f: F) {
    if n == 0 {
        return;
    }
    if n == 1 || THIS_THREAD_ONLY.with(std::cell::Cell::get) {
        f(0..n);
    } else {
        let caught = Caught::default();
        candle_core::utils::barrier_pool().execute_chunked(n, |range| caught.run(|| f(range)));
        caught.raise();
    }
}

/// Runs `f(t)` once on each of the kernel threads, `t` in `0..threads()` (this thread is the
/// last), each with the kernels it calls ([`chunked`]) on its own thread: whole parts of a
/// forward pass side by side, rather than every kernel shared out in turn.
///
/// `f` holds candle's pool while it runs, so it must not hand work to it otherwise: no
/// candle quantized matmul, and no candle elementwise operation large enough for candle to
/// share out (see `Decoder::forward`). A panic in any call is raised here once all have
/// ended ([`Caught`]).
pub(crate) fn side_by_side(f: impl Fn(usize) + Sync) {
    let caught = Caught::default();
    candle_core::utils::barrier_pool().execute(|t| {
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                THIS_THREAD_ONLY.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(THIS_THREAD_ONLY.with(|c| c.replace(true)));
        caught.run(|| f(t));
    });
    caught.raise();
}

/// The kernel threads: candle's barrier pool and the thread calling into it.
pub(crate) fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// The first panic of work run on candle's pool, kept until the pool is done: a panic
/// reaching the pool poisons its lock, and every later call into it (every forward pass)
/// would then fail; raised afterwards it fails only the pass it happened in.
#[derive(Default)]
struct Caught(std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>);

impl Caught {
    /// Runs `f`, keeping its panic (the first one of all the calls) if it panics.
    fn run(&self, f: impl FnOnce()) {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(panic);
        }
    }

    /// Raises the panic kept, if any.
    fn raise(self) {
        if let Some(panic) = self.0.into_inner().unwrap_or_else(|e| e.into_inner()) {
            std::panic::resume_unwind(panic);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every kernel thread runs its call once; a panic in one is raised to the caller, and
    /// the pool still serves later calls (its lock not poisoned).
    #[test]
    fn side_by_side_runs_once_per_thread_and_survives_a_panic() {
        let seen = std::sync::Mutex::new(Vec::new());
        super::side_by_side(|t| seen.lock().unwrap().push(t));
        let mut seen = seen.into_inner().unwrap();
        seen.sort_unstable();
        assert_eq!(seen, (0..super::threads()).collect::<Vec<_>>());
        let caught = std::panic::catch_unwind(|| {
            // The calling thread's own part: a panic there, left to reach the pool, would
            // poison its lock.
            super::side_by_side(|t| {
                if t + 1 == super::threads() {
                    panic!("the caller's part failed");
                }
            })
        });
        let message = caught.expect_err("the panic is raised again");
        assert_eq!(
            message.downcast_ref::<&str>(),
            Some(&"the caller's part failed")
        );
        let sum = std::sync::atomic::AtomicUsize::new(0);
        super::chunked(100, |r| {
            sum.fetch_add(r.len(), std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(sum.into_inner(), 100);
        super::side_by_side(|_| {});
    }

    /// A kernel whose work panics fails its own call only: the panic is raised to the
    /// caller and the pool serves the next call.
    #[test]
    fn a_panicking_kernel_leaves_the_pool_serving() {
        let caught = std::panic::catch_unwind(|| super::chunked(8, |_| panic!("kernel failed")));
        assert!(caught.is_err());
        let sum = std::sync::atomic::AtomicUsize::new(0);
        super::chunked(100, |r| {
            sum.fetch_add(r.len(), std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(sum.into_inner(), 100);
    }
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
