//! The `deem` binary: parses the command line and hands it to `deem_actors::cli::run`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = deem_actors::cli::Cli::parse();
    match deem_actors::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
