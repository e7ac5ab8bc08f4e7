//! `felhom-agent`: thin binary; everything lives in the library so tests can drive it.

fn main() -> std::process::ExitCode {
    felhom_agent::cli::main()
}
