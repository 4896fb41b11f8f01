//! `peerline-lab`: the NAT lab from the command line.
#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use peerline_lab::{check_environment, cleanup_stale, matrix, probe, quality, Lab, NatType};
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
    /// Call quality over impaired paths: a speech call between two public hosts while the
    /// router between them delays, jitters and drops (clean; 0, 3 and 10 % random loss
    /// with 30 ms jitter; bursty loss), scored with PESQ (needs python3 with pesq, numpy,
    /// scipy; espeak-ng unless --speech is given; iptables).
    CallQuality {
        #[arg(long)]
        json: bool,
        /// Directory holding `peerlined` and `peerline` (default: beside this binary).
        #[arg(long)]
        bin_dir: Option<std::path::PathBuf>,
        /// Two WAV files, alice's speech and bob's (default: Harvard sentences spoken by
        /// espeak-ng).
        #[arg(long, value_delimiter = ',', num_args = 2)]
        speech: Vec<std::path::PathBuf>,
        /// Keep recordings and reports here (default: a temporary directory, removed).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Seed of the impairment stage's draws.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Only the cases whose name contains one of these (comma-separated).
        #[arg(long, value_delimiter = ',')]
        cases: Vec<String>,
    },
    /// Remove namespaces left behind by crashed runs (those whose process is gone).
    Cleanup {
        /// Namespace name prefix (the tests use "pltest").
        #[arg(long, default_value = PREFIX)]
        prefix: String,
    },
    /// Two Peerline users behind every pair of NAT types: the path and setup time of their
    /// first message, then of a 3 s call (needs the peerlined and peerline binaries).
    Matrix {
        #[arg(long)]
        json: bool,
        /// Directory holding `peerlined` and `peerline` (default: beside this binary).
        #[arg(long)]
        bin_dir: Option<std::path::PathBuf>,
        /// Only these NAT types (comma-separated; default: all).
        #[arg(long, value_delimiter = ',')]
        types: Vec<NatType>,
        /// Exit non-zero unless every pair's message and call take the path this build is
        /// expected to find.
        #[arg(long)]
        check: bool,
    },
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
                println!("iptables (delay and jitter): {}", show(&env.iptables));
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
        Cmd::Matrix {
            json,
            bin_dir,
            types,
            check,
        } => {
            let bins = matrix::Binaries::in_dir(&bin_dir_or_default(bin_dir)?)?;
            check_environment().require()?;
            let types = if types.is_empty() {
                NatType::ALL.to_vec()
            } else {
                types
            };
            let work = std::env::temp_dir().join(format!("peerline-matrix-{}", std::process::id()));
            let mut cases: Vec<(NatType, NatType, bool)> = matrix::pairs(&types)
                .into_iter()
                .map(|(a, b)| (a, b, false))
                .collect();
            cases.push((NatType::PortRestricted, NatType::PortRestricted, true));
            let mut results = Vec::new();
            for (i, (a, b, same)) in cases.iter().enumerate() {
                let label = format!(
                    "[{}/{}] {a} x {b}{}",
                    i + 1,
                    cases.len(),
                    if *same { " (same NAT)" } else { "" }
                );
                // Progress on one line in a terminal, one line per pair in a log.
                if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    eprint!("\r{label}          ");
                } else {
                    eprintln!("{label}");
                }
                results.push(matrix::run_pair(PREFIX, *a, *b, *same, &bins, &work));
            }
            eprintln!();
            let _ = std::fs::remove_dir_all(&work);
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                print!("{}", matrix::table(&results));
            }
            // A pair that could not even be set up is a lab failure; a pair without a
            // peer path is a result, unless `--check` expects otherwise.
            // The call must take the same path as the message.
            let unexpected: Vec<&matrix::PairResult> = results
                .iter()
                .filter(|r| {
                    let want = matrix::expected_path(r.a, r.b, r.same_nat);
                    r.path != want || r.call_path != want
                })
                .collect();
            for r in &unexpected {
                eprintln!(
                    "peerline-lab: {} x {}: path {}, call path {}, expected {}",
                    r.a,
                    r.b,
                    r.path,
                    r.call_path,
                    matrix::expected_path(r.a, r.b, r.same_nat)
                );
            }
            Ok(
                if results.iter().any(|r| r.error.is_some()) || (check && !unexpected.is_empty()) {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                },
            )
        }
        Cmd::CallQuality {
            json,
            bin_dir,
            speech,
            out,
            seed,
            cases,
        } => {
            let bins = matrix::Binaries::in_dir(&bin_dir_or_default(bin_dir)?)?;
            check_environment().require_iptables()?;
            quality::check_scorer()?;
            let work = out.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("peerline-quality-{}", std::process::id()))
            });
            std::fs::create_dir_all(&work)
                .with_context(|| format!("creating {}", work.display()))?;
            let speech = match <[std::path::PathBuf; 2]>::try_from(speech) {
                Ok(s) => s,
                Err(_) => quality::synthesize_speech(&work)?,
            };
            let opts = quality::Options {
                bins,
                speech,
                work: work.clone(),
                seed,
                only: cases,
            };
            let results = quality::run(PREFIX, &opts, |name| eprintln!("call: {name}"));
            if out.is_none() {
                let _ = std::fs::remove_dir_all(&work);
            }
            let results = results?;
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                print!("{}", quality::table(&results));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cleanup { prefix } => {
            for name in cleanup_stale(&prefix)? {
                println!("removed {name}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `--bin-dir`, else the directory of this executable.
fn bin_dir_or_default(dir: Option<std::path::PathBuf>) -> anyhow::Result<std::path::PathBuf> {
    match dir {
        Some(d) => Ok(d),
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .parent()
            .map(std::path::Path::to_path_buf)
            .context("this executable has no directory"),
    }
}
