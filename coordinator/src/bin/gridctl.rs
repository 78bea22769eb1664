//! gridctl: the grid's command line (see `gridctl --help`).

fn main() -> std::process::ExitCode {
    gridforge_coordinator::cli::main()
}
