//! What every fuzz target shares: an allocator that treats a single allocation above
//! `LIMIT` as a crash, so that a length field read from the input (2³¹ in a header) cannot
//! make a decoder allocate gigabytes unnoticed. libFuzzer's own `-malloc_limit_mb` needs a
//! sanitizer's malloc hooks, which a `--sanitizer none` build does not have.

use std::alloc::{GlobalAlloc, Layout, System};

/// The largest single allocation a decoder may make for an input of a few kilobytes.
pub const LIMIT: usize = 64 << 20;

/// The system allocator, aborting on an allocation larger than `LIMIT`.
pub struct Limited;

fn too_large(size: usize) -> ! {
    use std::io::Write;
    // The backtrace's own allocations are small: they come back through here and pass.
    let trace = std::backtrace::Backtrace::force_capture();
    let _ = writeln!(
        std::io::stderr(),
        "allocation of {size} bytes, more than the fuzz limit of {LIMIT}\n{trace}"
    );
    std::process::abort()
}

// SAFETY: every call is passed on to the system allocator unchanged, or aborts.
unsafe impl GlobalAlloc for Limited {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LIMIT {
            too_large(layout.size());
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LIMIT {
            too_large(layout.size());
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > LIMIT {
            too_large(new_size);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
