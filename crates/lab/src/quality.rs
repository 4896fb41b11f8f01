//! Call quality over real impaired networks: two users on public addresses, each behind
//! its own plain router, a real `peerlined` on the public segment, and real `peerline`
//! agents holding a speech call while the first user's router delays, jitters and drops
//! everything it forwards (both directions: the call's media crosses it once each way).
//!
//! Each direction is scored with PESQ (ITU-T P.862.2 wide band, the Python `pesq`
//! package): both recordings are resampled to 16 kHz, and the degraded one is aligned to
//! its reference by cross-correlation and cut to the same length, as PESQ wants. The delay
//! Peerline adds (jitter buffer plus codec) and the bitrate come from the call's own
//! statistics. Loss is nftables' random loss ([`crate::Nat::set_loss`]) or the NFQUEUE
//! stage's Gilbert-Elliott model; delay and jitter are the stage's.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Serialize;

use crate::impair::{ImpairConfig, LossModel, StageStats};
use crate::matrix::{start_supernode, wait_output, Binaries, Daemon, User};
use crate::{Lab, LabError, NatType};

/// One network condition.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub name: String,
    /// nftables random loss on the router, percent.
    pub loss_percent: u8,
    /// The NFQUEUE stage on the router.
    pub stage: ImpairConfig,
}

/// Fixed one-way delay of every case, as in the media emulator's benchmark
/// (`scripts/call-quality.sh`), so the two benchmarks describe their paths alike.
pub const BASE_DELAY_MS: f64 = 40.0;
/// Jitter of the impaired cases: each packet's delay is the base plus a uniform 0..30 ms.
pub const JITTER_MS: f64 = 30.0;

/// The benchmark's cases (issue 3's: 0, 3 and 10 % random loss with 30 ms jitter, a clean
/// path, and a bursty one).
pub fn cases() -> Vec<Case> {
    let stage = |jitter_ms, loss| ImpairConfig {
        delay_ms: BASE_DELAY_MS,
        jitter_ms,
        loss,
    };
    let case = |name: &str, loss_percent, stage| Case {
        name: name.into(),
        loss_percent,
        stage,
    };
    vec![
        case("clean", 0, stage(0.0, LossModel::None)),
        case(
            "0% loss, 30 ms jitter",
            0,
            stage(JITTER_MS, LossModel::None),
        ),
        case(
            "3% loss, 30 ms jitter",
            3,
            stage(JITTER_MS, LossModel::None),
        ),
        case(
            "10% loss, 30 ms jitter",
            10,
            stage(JITTER_MS, LossModel::None),
        ),
        case(
            "5% bursty loss (mean burst 3), 30 ms jitter",
            0,
            stage(JITTER_MS, LossModel::bursty(0.05, 3.0)),
        ),
    ]
}

/// One direction of one case's call.
#[derive(Debug, Clone, Serialize)]
pub struct Direction {
    /// `alice->bob` (alice is behind the impaired router) or `bob->alice`.
    pub direction: &'static str,
    /// PESQ MOS-LQO, P.862.2 wide band.
    pub mos_lqo: f64,
    /// Jitter buffer (listener's mean playout delay) plus codec delay, ms.
    pub added_delay_ms: f64,
    /// The listener's mean playout delay, ms.
    pub playout_delay_ms: f64,
    /// Packetisation plus encoder lookahead, ms.
    pub codec_delay_ms: f64,
    /// What the talker sent, redundancy included, kb/s.
    pub send_kbps: f64,
    /// The talker's primary Opus frames alone, kb/s.
    pub opus_kbps: f64,
    /// Media packets the listener never got, fraction.
    pub loss_before_recovery: f64,
    /// Speech frames the listener had to conceal, fraction.
    pub loss_after_recovery: f64,
    /// Interarrival jitter at the listener, ms.
    pub jitter_ms: f64,
    /// Where the recording matched the reference best (network delay, jitter buffer and
    /// the offset between the two sides' starts), ms; negative when the listener's side
    /// went active after the talker had started (that start is scored as silence).
    pub alignment_ms: f64,
}

/// One case's call. Its `setup_ms` includes [`ANSWER_AFTER`] of ringing.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub case: Case,
    /// The call's path (`direct` expected: both users are on public addresses).
    pub via: Option<String>,
    /// The caller's setup time, ms.
    pub setup_ms: Option<u64>,
    /// Seconds of speech sent each way.
    pub speech_s: f64,
    pub directions: Vec<Direction>,
    /// What the router's NFQUEUE stage did (both directions, signalling included).
    pub stage: Option<StageStats>,
    /// Calls it took (see `ANSWER_AFTER`: a failed one is hung up and made again).
    pub attempts: u32,
}

/// What `call-quality` needs.
#[derive(Debug, Clone)]
pub struct Options {
    pub bins: Binaries,
    /// Alice's speech (any WAV the agent reads); bob's.
    pub speech: [PathBuf; 2],
    /// Working directory: recordings, reports and the supernode's data stay here.
    pub work: PathBuf,
    /// Seed of the NFQUEUE stage's draws (case i uses seed + i).
    pub seed: u64,
    /// Only cases whose name contains one of these (all when empty).
    pub only: Vec<String>,
}

/// Harvard sentences (IEEE 1969), list 1: phonetically balanced speech, five for each side.
pub const SENTENCES: [&str; 2] = [
    "The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background. \
     It is easy to tell the depth of a well. These days a chicken leg is a rare dish. \
     Rice is often served in round bowls.",
    "The juice of lemons makes fine punch. The box was thrown beside the parked truck. \
     The hogs were fed chopped corn and garbage. Four hours of steady work faced us. \
     A large size in stockings is hard to sell.",
];

/// Speaks [`SENTENCES`] into `dir` with espeak-ng: alice's and bob's WAV files.
pub fn synthesize_speech(dir: &Path) -> Result<[PathBuf; 2], LabError> {
    let mut out = [dir.join("speech-alice.wav"), dir.join("speech-bob.wav")];
    for (i, path) in out.iter_mut().enumerate() {
        let status = Command::new("espeak-ng")
            .args(["-v", "en-us", "-s", "150", "-w"])
            .arg(&*path)
            .arg(SENTENCES[i])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                return Err(LabError::Invalid(format!(
                    "espeak-ng failed ({s}) making the speech recording"
                )))
            }
            Err(_) => {
                return Err(LabError::MissingTool {
                    tool: "espeak-ng (or pass --speech A.wav,B.wav)",
                    package: "espeak-ng",
                })
            }
        }
    }
    Ok(out)
}

/// The PESQ scorer: `python3 -c SCORER REF DEG` prints `{"mos_lqo": .., "lag_ms": ..}`.
const SCORER: &str = r#"
import json, sys
import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly
from pesq import pesq

def load16k(path):
    rate, x = wavfile.read(path)
    x = x.astype(np.float64)
    if x.ndim > 1:
        x = x.mean(axis=1)
    g = np.gcd(rate, 16000)
    return resample_poly(x, 16000 // g, rate // g)

ref, deg = load16k(sys.argv[1]), load16k(sys.argv[2])
# Where the reference starts in the recording: the peak of their cross-correlation within
# +-3 s. Negative when the recording began after the talker started (the listener's side
# went active later): that start was never heard and counts as silence.
n = 1 << int(np.ceil(np.log2(len(ref) + len(deg))))
xc = np.fft.irfft(np.fft.rfft(deg, n) * np.conj(np.fft.rfft(ref, n)), n)
w = min(3 * 16000, len(deg) - 1, len(ref) - 1)
lags = np.concatenate([np.arange(-w, 0), np.arange(0, w + 1)])
lag = int(lags[np.argmax(np.concatenate([xc[n - w :], xc[: w + 1]]))])
aligned = deg[lag:] if lag >= 0 else np.concatenate([np.zeros(-lag), deg])
aligned = aligned[: len(ref)]
aligned = np.concatenate([aligned, np.zeros(len(ref) - len(aligned))])
print(json.dumps({"mos_lqo": float(pesq(16000, ref, aligned, "wb")), "lag_ms": lag / 16.0}))
"#;

/// Checks that python3 can score with PESQ, before any call is made.
pub fn check_scorer() -> Result<(), LabError> {
    let ok = Command::new("python3")
        .args(["-c", "import pesq, numpy, scipy"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(LabError::Invalid(
            "PESQ scoring needs python3 with pesq, numpy and scipy: python3 -m pip install pesq numpy scipy (scripts/call-quality-lab.sh does it)".into(),
        ))
    }
}

fn score(reference: &Path, degraded: &Path) -> Result<(f64, f64), LabError> {
    let out = Command::new("python3")
        .args(["-c", SCORER])
        .arg(reference)
        .arg(degraded)
        .stdin(Stdio::null())
        .output()
        .map_err(LabError::io("running python3 for PESQ"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").trim();
        return Err(LabError::Invalid(format!(
            "PESQ scoring of {} failed: {last}",
            degraded.display()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| LabError::Invalid(format!("bad PESQ scorer output: {e}")))?;
    match (v["mos_lqo"].as_f64(), v["lag_ms"].as_f64()) {
        (Some(m), Some(l)) => Ok((m, l)),
        _ => Err(LabError::Invalid(format!("bad PESQ scorer output: {v}"))),
    }
}

fn speech_seconds(path: &Path) -> Result<f64, LabError> {
    let bytes = std::fs::read(path).map_err(LabError::io(format!("reading {}", path.display())))?;
    crate::wav::duration(&bytes).map_err(|e| LabError::Invalid(format!("{}: {e}", path.display())))
}

/// Runs every case in one lab (one supernode, two agents; the router's impairment changes
/// between calls) and scores them. `progress` hears each case's name as it starts.
pub fn run(
    prefix: &str,
    opts: &Options,
    mut progress: impl FnMut(&str),
) -> Result<Vec<CaseResult>, LabError> {
    check_scorer()?;
    crate::check_environment().require_iptables()?;
    let speech_s = speech_seconds(&opts.speech[0])?.max(speech_seconds(&opts.speech[1])?);
    if !(1.0..=120.0).contains(&speech_s) {
        return Err(LabError::Invalid(format!(
            "speech of {speech_s:.1} s: use 1-120 s (10-20 s is the benchmark's length)"
        )));
    }
    std::fs::create_dir_all(&opts.work).map_err(LabError::io("creating the work directory"))?;
    let mut lab = Lab::new(prefix)?;
    let sn = lab.add_public_host("sn")?;
    let nat_a = lab.add_nat("routera", NatType::Public)?;
    let host_a = lab.add_host_behind(&nat_a, "alice")?;
    let nat_b = lab.add_nat("routerb", NatType::Public)?;
    let host_b = lab.add_host_behind(&nat_b, "bob")?;
    let (_daemon, bootstrap) = start_supernode(&sn, &opts.work.join("sn"), &opts.bins)?;
    let alice = User {
        name: "alice",
        host: &host_a,
        profile: opts.work.join("alice"),
        bins: &opts.bins,
        realtime: true,
    };
    let bob = User {
        name: "bob",
        host: &host_b,
        profile: opts.work.join("bob"),
        bins: &opts.bins,
        realtime: true,
    };
    let outcome = (|| {
        for u in [&alice, &bob] {
            u.ok(&["register", u.name, "--server", &bootstrap])?;
            u.ok(&["up"])?;
        }
        alice.ok(&["contacts", "add", "bob"])?;
        bob.ok(&["contacts", "accept", "alice"])?;
        let mut results = Vec::new();
        for (i, case) in cases().into_iter().enumerate() {
            if !opts.only.is_empty() && !opts.only.iter().any(|o| case.name.contains(o.as_str())) {
                continue;
            }
            progress(&case.name);
            nat_a.set_loss(case.loss_percent)?;
            // A case without delay, jitter or stage loss needs no stage.
            if case.stage != ImpairConfig::default() {
                lab.set_impairment(&nat_a, case.stage, opts.seed.wrapping_add(i as u64))?;
            }
            let mut attempts = 0;
            let call = loop {
                attempts += 1;
                match one_call(&alice, &bob, opts, i, speech_s) {
                    Ok(c) => break Ok(c),
                    Err(e) if attempts < ATTEMPTS => {
                        eprintln!("call: {}: attempt {attempts} failed: {e}", case.name);
                        hang_up_all([&alice, &bob]);
                        std::thread::sleep(Duration::from_secs(2));
                    }
                    Err(e) => break Err(e),
                }
            };
            let stage = lab.clear_impairment(&nat_a)?;
            nat_a.set_loss(0)?;
            let (caller, callee, recordings) = call?;
            let mut r = assess(case, caller, callee, recordings, opts, speech_s, stage)?;
            r.attempts = attempts;
            results.push(r);
        }
        Ok(results)
    })();
    for u in [&alice, &bob] {
        let _ = u.cli(&["down"]).output();
    }
    outcome
}

type CallReports = (serde_json::Value, serde_json::Value, [PathBuf; 2]);

/// The callee answers this long after the caller rang. An instant answer can make the call
/// active before the caller's agent has attached the call's media plan (what to play and
/// record, when to hang up): the agent's `place_call` registers the plan only once the
/// supernode has answered the invite, which loss and delay postpone. The call then runs
/// without the plan and the caller's report never comes; a ringing second avoids that.
const ANSWER_AFTER: Duration = Duration::from_secs(1);
/// Attempts per case before giving up (a failed attempt is hung up and reported).
const ATTEMPTS: u32 = 3;

/// Alice calls bob; both play their speech and record what they hear. Returns both
/// reports and the recordings (alice's, bob's).
fn one_call(
    alice: &User,
    bob: &User,
    opts: &Options,
    i: usize,
    speech_s: f64,
) -> Result<CallReports, LabError> {
    let heard = [
        opts.work.join(format!("case{i}-alice-heard.wav")),
        opts.work.join(format!("case{i}-bob-heard.wav")),
    ];
    let arg = |p: &Path| p.to_string_lossy().into_owned();
    let (play_a, play_b) = (arg(&opts.speech[0]), arg(&opts.speech[1]));
    let (rec_a, rec_b) = (arg(&heard[0]), arg(&heard[1]));
    // The speech, then time for the last packets to cross and play out. The callee hangs
    // up a little later by itself, should the caller's hang-up not come.
    let secs = format!("{:.1}", speech_s + 1.5);
    let callee_secs = format!("{:.1}", speech_s + 3.0);
    let spawn = |u: &User, args: &[&str], what: &str| {
        u.cli(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map(Daemon)
            .map_err(LabError::io(format!("starting {what}")))
    };
    let mut caller = spawn(
        alice,
        &[
            "call",
            "bob",
            "--duration",
            &secs,
            "--json",
            "--play",
            &play_a,
            "--record",
            &rec_a,
        ],
        "peerline call",
    )?;
    std::thread::sleep(ANSWER_AFTER);
    let mut callee = spawn(
        bob,
        &[
            "calls",
            "wait",
            "--accept",
            "--json",
            "--timeout",
            "10",
            "--duration",
            &callee_secs,
            "--play",
            &play_b,
            "--record",
            &rec_b,
        ],
        "peerline calls wait",
    )?;
    let limit = Duration::from_secs_f64(speech_s + 15.0);
    let caller_out = wait_output(&mut caller.0, limit, "peerline call");
    let callee_out = wait_output(
        &mut callee.0,
        Duration::from_secs(10),
        "peerline calls wait",
    );
    let (caller_out, callee_out) = (caller_out?, callee_out?);
    let parse = |b: &[u8], who: &str| -> Result<serde_json::Value, LabError> {
        serde_json::from_slice(b)
            .map_err(|e| LabError::Invalid(format!("bad call report from {who}: {e}")))
    };
    // The raw reports stay beside the recordings.
    let _ = std::fs::write(opts.work.join(format!("case{i}-alice.json")), &caller_out);
    let _ = std::fs::write(opts.work.join(format!("case{i}-bob.json")), &callee_out);
    Ok((
        parse(&caller_out, "the caller")?,
        parse(&callee_out, "the callee")?,
        heard,
    ))
}

/// Hangs up whatever call either agent still has (after a failed attempt).
fn hang_up_all(users: [&User; 2]) {
    for u in users {
        let Ok(out) = u.ok(&["calls", "list", "--json"]) else {
            continue;
        };
        let calls: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        for c in calls.as_array().into_iter().flatten() {
            if let Some(id) = c["call_id"].as_u64() {
                let _ = u.ok(&["calls", "hangup", &id.to_string()]);
            }
        }
    }
}

fn assess(
    case: Case,
    caller: serde_json::Value,
    callee: serde_json::Value,
    heard: [PathBuf; 2],
    opts: &Options,
    speech_s: f64,
    stage: Option<StageStats>,
) -> Result<CaseResult, LabError> {
    if let Some(e) = caller["media_error"]
        .as_str()
        .or(callee["media_error"].as_str())
    {
        return Err(LabError::Invalid(format!("{}: {e}", case.name)));
    }
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let mut directions = Vec::new();
    // (name, reference, recording, talker's report, listener's report)
    for (name, reference, recording, talker, listener) in [
        ("alice->bob", &opts.speech[0], &heard[1], &caller, &callee),
        ("bob->alice", &opts.speech[1], &heard[0], &callee, &caller),
    ] {
        let (mos_lqo, alignment_ms) = score(reference, recording)?;
        let (t, l) = (&talker["media"], &listener["media"]);
        let playout = f(&l["mean_playout_delay_ms"]);
        let codec = f(&l["codec_delay_ms"]);
        directions.push(Direction {
            direction: name,
            mos_lqo,
            added_delay_ms: playout + codec,
            playout_delay_ms: playout,
            codec_delay_ms: codec,
            send_kbps: f(&t["send_kbps"]),
            opus_kbps: f(&t["opus_kbps"]),
            loss_before_recovery: f(&l["loss_before_recovery"]),
            loss_after_recovery: f(&l["loss_after_recovery"]),
            jitter_ms: f(&l["jitter_ms"]),
            alignment_ms,
        });
    }
    Ok(CaseResult {
        case,
        via: caller["via"].as_str().map(str::to_owned),
        setup_ms: caller["setup_ms"].as_u64(),
        speech_s,
        directions,
        stage,
        attempts: 1,
    })
}

/// Text table of results.
pub fn table(results: &[CaseResult]) -> String {
    let mut s = format!(
        "{:<44} {:<11} {:>7} {:>11} {:>9} {:>9} {:>18} {:>9}  {}\n",
        "case",
        "direction",
        "MOS-LQO",
        "added ms",
        "sent kb/s",
        "Opus kb/s",
        "loss before/after",
        "jitter ms",
        "path"
    );
    for r in results {
        for d in &r.directions {
            s += &format!(
                "{:<44} {:<11} {:>7.2} {:>11.1} {:>9.1} {:>9.1} {:>8.1}% / {:>5.1}% {:>9.1}  {}\n",
                r.case.name,
                d.direction,
                d.mos_lqo,
                d.added_delay_ms,
                d.send_kbps,
                d.opus_kbps,
                100.0 * d.loss_before_recovery,
                100.0 * d.loss_after_recovery,
                d.jitter_ms,
                r.via.as_deref().unwrap_or("-")
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cases_are_issue_3s_with_valid_figures() {
        let c = cases();
        let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names.len(), 5);
        for c in &c {
            assert!(c.stage.validate().is_ok(), "{}", c.name);
            assert_eq!(c.stage.delay_ms, BASE_DELAY_MS);
        }
        let loss: Vec<u8> = c.iter().map(|c| c.loss_percent).collect();
        assert_eq!(loss, [0, 0, 3, 10, 0]);
        assert_eq!(c[0].stage.jitter_ms, 0.0);
        assert!(c[1..].iter().all(|c| c.stage.jitter_ms == JITTER_MS));
        assert!((c[4].stage.loss.mean_loss() - 0.05).abs() < 1e-9);
    }
}
