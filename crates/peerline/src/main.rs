//! `peerline`: the user's command-line client and agent.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    peerline_net::files::private_umask();
    match peerline::cli::run(peerline::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peerline: {e:#}");
            ExitCode::FAILURE
        }
    }
}
