//! `peerline-lab`: the NAT lab from the command line.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use peerline_lab::{check_environment, cleanup_stale, probe, Lab, NatType};
use std::process::ExitCode;

/// Namespaces made by this binary are named `plab{pid}-{seq}-{name}`.
const PREFIX: &str = "plab";

#[derive(Parser)]
#[command(
    name = "peerline-lab",
    version,
    about = "Peerline's NAT lab: hosts behind real NATs in network namespaces (needs root)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Say whether this machine can run the lab (root, nft, ip).
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Build one NAT of every type, probe its mapping and filtering, print a table, clean up.
    Probe {
        #[arg(long)]
        json: bool,
    },
    /// Remove namespaces left behind by crashed runs (those whose process is gone).
    Cleanup {
        /// Namespace name prefix (the tests use "pltest").
        #[arg(long, default_value = PREFIX)]
        prefix: String,
    },
    // `Matrix { .. }` (Peerline clients behind every pair of NAT types) goes here, built on
    // the library's `Lab`, `Host::command` and `probe`.
}

/// One line of `probe --json`: fields in reading order (serde_json's `json!` would sort them).
#[derive(serde::Serialize)]
struct Row<'a> {
    nat: NatType,
    expected_mapping: probe::Mapping,
    expected_filtering: probe::Filtering,
    classified: Option<NatType>,
    observed: &'a probe::ProbeReport,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("peerline-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Check { json } => {
            let env = check_environment();
            if json {
                println!("{}", serde_json::to_string_pretty(&env)?);
            } else {
                let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "missing".into());
                println!("root: {}", if env.root { "yes" } else { "no" });
                println!("nft:  {}", show(&env.nft));
                println!("ip:   {}", show(&env.ip));
            }
            Ok(match env.require() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("peerline-lab: {e}");
                    ExitCode::FAILURE
                }
            })
        }
        Cmd::Probe { json } => {
            let reports = {
                let mut lab = Lab::new(PREFIX)?;
                probe::probe_all(&mut lab).context("probing")?
                // `lab` dropped here: namespaces removed before printing.
            };
            if json {
                let rows: Vec<Row> = reports
                    .iter()
                    .map(|(nat, observed)| Row {
                        nat: *nat,
                        expected_mapping: nat.expected().0,
                        expected_filtering: nat.expected().1,
                        classified: observed.classify(),
                        observed,
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", probe::table(&reports));
            }
            let all_ok = reports.iter().all(|(t, r)| r.classify() == Some(*t));
            Ok(if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Cleanup { prefix } => {
            for name in cleanup_stale(&prefix)? {
                println!("removed {name}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
