//! The `keyfront` command; everything lives in the library's `cli` module.

// Measured (docs/BENCHMARKS.md): glibc malloc's arena locks showed up in the request path's
// profile; mimalloc's thread-local heaps do not contend.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keyfront::cli::main()
}
