//! `felhom-privhelper`: the root side of the fence. (Filled by issue 3.)

fn main() -> std::process::ExitCode {
    eprintln!("felhom-privhelper: not built yet");
    std::process::ExitCode::from(2)
}
