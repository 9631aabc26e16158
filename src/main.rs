//! The `gpulease` binary: the allocator, and [`gpulease::run`].

/// jemalloc, because it gives memory back: after a burst of thousands of
/// waiters, glibc's allocator keeps the broker at its peak for good, while
/// jemalloc's background threads return the freed pages within seconds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    gpulease::run()
}
