//! The `keyfront` command; everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    keyfront::cli::main()
}
