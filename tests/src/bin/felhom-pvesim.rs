//! `felhom-pvesim`: a Proxmox VE node in one process. (Issue 2.)

fn main() -> std::process::ExitCode {
    eprintln!("felhom-pvesim: not built yet");
    std::process::ExitCode::from(2)
}
