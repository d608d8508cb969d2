//! The `edgeward` binary: everything lives in the library.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    edgeward::runtime::allocator::tune();
    edgeward::cli::main()
}
