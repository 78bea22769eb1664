//! gridforge-agent: the node agent's command line. A thin adapter: it parses arguments into engine calls.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
