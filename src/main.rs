fn main() {
    keep_frame_buffers_in_the_heap();
    std::process::exit(mybox::cli::main());
}

/// Network frames (1-16 MiB) are allocated and freed all the time. Above glibc's default mmap
/// threshold each one was a fresh mapping: unmapped when freed, then faulted in and zeroed page
/// by page the next time (a third of the page faults of an initial sync's receiver, slower still
/// on a VM that hands free pages back to its host). In the heap, freed frames are reused warm.
/// The heap is still trimmed once 32 MiB at its top are free.
fn keep_frame_buffers_in_the_heap() {
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}
