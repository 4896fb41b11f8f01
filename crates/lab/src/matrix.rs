//! The connectivity matrix: two Peerline users behind every pair of NAT types, with a
//! real `peerlined` on the public segment and real `peerline` agents in the hosts.
//!
//! For each pair the run registers both users, makes them contacts, and times the first
//! message from the first to the second. The path is what the sender's agent reports:
//! `direct` (a hole-punched peer session), `relay`, or `failed` when no peer session
//! could be made (the message then still arrives through the supernode's mailbox, which
//! is reported as `via`). Then the first calls the second for [`CALL_SECONDS`] with a
//! generated test signal, the second answering with `peerline calls wait --accept`; the
//! call's path and setup time are what the caller's call statistics say.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{Host, Lab, LabError, NatType};

/// Port the supernode listens on (UDP and TCP): 443 passes even `udp-blocked` NATs' TCP rule.
pub const SUPERNODE_PORT: u16 = 443;
/// Port of the co-located TURN relay (UDP and TCP): 80, the other port `udp-blocked` lets out.
pub const RELAY_PORT: u16 = 80;

/// Length of each pair's call, seconds.
pub const CALL_SECONDS: f64 = 3.0;
/// The callee must have played at least this many 20 ms frames of the caller's audio for
/// the call to count: a second, which proves media flowed on that path; a loaded CI box
/// delays the agents' 20 ms ticks, so no more is asked.
const MIN_FRAMES_HEARD: u64 = 50;

/// One cell of the matrix.
#[derive(Debug, Clone, Serialize)]
pub struct PairResult {
    /// The sender's NAT.
    pub a: NatType,
    /// The recipient's NAT.
    pub b: NatType,
    /// Both behind the same NAT (the same-LAN case).
    pub same_nat: bool,
    /// `direct`, `relay` or `failed`.
    pub path: String,
    /// Wall time of the first message, connection setup included (ms).
    pub setup_ms: Option<u64>,
    /// How the first message travelled: `direct`, `relay` or `offline` (mailbox).
    pub via: Option<String>,
    /// The call's media path: `direct`, `relay`, or `failed` (no call, or no audio).
    pub call_path: String,
    /// From the caller's invite to an active call (ringing and answer included), ms.
    pub call_setup_ms: Option<u64>,
    /// Seconds of the caller's audio the callee played (decoded or recovered frames).
    pub call_audio_s: Option<f64>,
    /// Why the call failed, if it did.
    pub call_error: Option<String>,
    /// What went wrong, if the pair could not be run at all.
    pub error: Option<String>,
}

/// Where the Peerline binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `peerlined`.
    pub peerlined: PathBuf,
    /// `peerline`.
    pub peerline: PathBuf,
}

impl Binaries {
    /// Both binaries in `dir`, checked to exist.
    pub fn in_dir(dir: &Path) -> Result<Self, LabError> {
        let b = Binaries {
            peerlined: dir.join("peerlined"),
            peerline: dir.join("peerline"),
        };
        for p in [&b.peerlined, &b.peerline] {
            if !p.exists() {
                return Err(LabError::Invalid(format!(
                    "{} is missing: build the workspace first (cargo build --workspace) or pass --bin-dir",
                    p.display()
                )));
            }
        }
        Ok(b)
    }
}

fn run(cmd: &mut std::process::Command, what: &str) -> Result<Output, LabError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(LabError::io(what.to_string()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(LabError::Invalid(format!("{what}: {}", err.trim())));
    }
    Ok(out)
}

/// SCHED_FIFO priority of real-time users (low: above every normal process, below the
/// kernel's own real-time threads).
const REALTIME_PRIORITY: &str = "20";

pub(crate) struct User<'a> {
    pub(crate) name: &'static str,
    pub(crate) host: &'a Host,
    pub(crate) profile: PathBuf,
    pub(crate) bins: &'a Binaries,
    /// Run the agent (and the CLI) at real-time priority (`chrt -f`), so that other load
    /// on the box cannot stall its 20 ms audio clock: the call-quality benchmark measures
    /// the network's effect, as an audio stack with real-time threads would hear it.
    pub(crate) realtime: bool,
}

impl User<'_> {
    pub(crate) fn cli(&self, args: &[&str]) -> std::process::Command {
        let mut c = if self.realtime {
            let mut c = std::process::Command::new("chrt");
            c.args([
                "-f",
                REALTIME_PRIORITY,
                "ip",
                "netns",
                "exec",
                &self.host.netns,
            ])
            .arg(&self.bins.peerline);
            c
        } else {
            self.host.command(&self.bins.peerline)
        };
        c.arg("--profile").arg(&self.profile).args(args);
        c.env("PEERLINE_PASSWORD", format!("{}-lab-password", self.name));
        c
    }

    pub(crate) fn ok(&self, args: &[&str]) -> Result<Output, LabError> {
        run(
            &mut self.cli(args),
            &format!("{} {}", self.name, args.join(" ")),
        )
    }
}

/// Kills the supernode when the pair is done, whatever happened.
pub(crate) struct Daemon(pub(crate) Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn start_supernode(
    sn: &Host,
    data: &Path,
    bins: &Binaries,
) -> Result<(Daemon, String), LabError> {
    let listen = format!("{}", sn.socket_addr(SUPERNODE_PORT));
    run(
        sn.command(&bins.peerlined)
            .arg("init")
            .arg("--data")
            .arg(data)
            .args(["--listen", &listen]),
        "peerlined init",
    )?;
    std::fs::write(
        data.join("peerlined.toml"),
        format!(
            "listen = \"{listen}\"\nadmin = \"off\"\nrelay_listen = \"{}\"\n",
            sn.socket_addr(RELAY_PORT)
        ),
    )
    .map_err(LabError::io("writing peerlined.toml"))?;
    let child = sn
        .command(&bins.peerlined)
        .arg("run")
        .arg("--data")
        .arg(data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(LabError::io("starting peerlined"))?;
    let daemon = Daemon(child);
    let start = Instant::now();
    while !data.join("peerlined.pid").exists() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(LabError::Invalid("peerlined did not start".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let bootstrap = std::fs::read_to_string(data.join("bootstrap"))
        .map_err(LabError::io("reading the bootstrap entry"))?
        .trim()
        .to_string();
    Ok((daemon, bootstrap))
}

/// Runs one pair in a fresh lab (no conntrack state is shared between pairs).
pub fn run_pair(
    prefix: &str,
    a: NatType,
    b: NatType,
    same_nat: bool,
    bins: &Binaries,
    dir: &Path,
) -> PairResult {
    let mut result = PairResult {
        a,
        b,
        same_nat,
        path: "failed".into(),
        setup_ms: None,
        via: None,
        call_path: "failed".into(),
        call_setup_ms: None,
        call_audio_s: None,
        call_error: None,
        error: None,
    };
    match pair_inner(prefix, a, b, same_nat, bins, dir) {
        Ok(PairOutcome { via, ms, call }) => {
            result.path = if via == "offline" {
                "failed".into()
            } else {
                via.clone()
            };
            result.via = Some(via);
            result.setup_ms = Some(ms);
            match call {
                Ok(c) => {
                    result.call_path = c.path;
                    result.call_setup_ms = c.setup_ms;
                    result.call_audio_s = Some(c.audio_s);
                }
                Err(e) => result.call_error = Some(e.to_string()),
            }
        }
        Err(e) => result.error = Some(e.to_string()),
    }
    result
}

/// A pair that ran: its first message (`via`, ms) and its call.
struct PairOutcome {
    via: String,
    ms: u64,
    call: Result<CallOutcome, LabError>,
}

/// What the matrix keeps of a call.
struct CallOutcome {
    path: String,
    setup_ms: Option<u64>,
    audio_s: f64,
}

/// `alice` calls `bob` for [`CALL_SECONDS`], playing a test signal; `bob` answers. The
/// call counts when both report the same path and `bob` decoded most of the audio.
fn hold_call(alice: &User, bob: &User, work: &Path) -> Result<CallOutcome, LabError> {
    let tone = work.join("tone.wav");
    crate::wav::write_test_signal(&tone, CALL_SECONDS + 0.5)
        .map_err(LabError::io("writing the test signal"))?;
    let tone = tone.to_string_lossy().into_owned();
    let callee = bob
        .cli(&["calls", "wait", "--accept", "--json", "--timeout", "20"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(LabError::io("starting peerline calls wait"))?;
    let callee = Daemon(callee);
    let secs = CALL_SECONDS.to_string();
    let caller = alice.ok(&[
        "call",
        "bob",
        "--duration",
        &secs,
        "--json",
        "--play",
        &tone,
    ]);
    let mut callee = callee;
    let callee_out = wait_output(
        &mut callee.0,
        Duration::from_secs(15),
        "peerline calls wait",
    );
    let caller = caller?;
    let callee_out = callee_out?;
    let report = |bytes: &[u8], who: &str| -> Result<serde_json::Value, LabError> {
        serde_json::from_slice(bytes)
            .map_err(|e| LabError::Invalid(format!("bad call report from {who}: {e}")))
    };
    let c = report(&caller.stdout, "the caller")?;
    let r = report(&callee_out, "the callee")?;
    let path = c["via"].as_str().unwrap_or("none").to_string();
    if r["via"].as_str() != Some(path.as_str()) {
        return Err(LabError::Invalid(format!(
            "caller says {path}, callee says {}",
            r["via"]
        )));
    }
    // Frames played from the peer's packets: decoded, recovered from redundancy or FEC, or
    // comfort noise for its silences (DTX); not concealed ones.
    let rx = &r["media"]["receive"];
    let heard: u64 = [
        "frames_decoded",
        "frames_recovered_red",
        "frames_recovered_fec",
        "frames_dtx",
    ]
    .iter()
    .filter_map(|k| rx[*k].as_u64())
    .sum();
    if heard < MIN_FRAMES_HEARD {
        return Err(LabError::Invalid(format!(
            "the callee played {heard} frames (20 ms) of a {CALL_SECONDS} s call"
        )));
    }
    Ok(CallOutcome {
        path,
        setup_ms: c["setup_ms"].as_u64(),
        audio_s: heard as f64 * 0.02,
    })
}

/// Waits for a child's exit and its stdout, at most `limit` (then kills it).
pub(crate) fn wait_output(
    child: &mut Child,
    limit: Duration,
    what: &str,
) -> Result<Vec<u8>, LabError> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = Vec::new();
                let mut err = Vec::new();
                if let Some(mut o) = child.stdout.take() {
                    let _ = std::io::Read::read_to_end(&mut o, &mut out);
                }
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_end(&mut e, &mut err);
                }
                if !status.success() {
                    return Err(LabError::Invalid(format!(
                        "{what}: {}",
                        String::from_utf8_lossy(&err).trim()
                    )));
                }
                return Ok(out);
            }
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                return Err(LabError::Invalid(format!("{what} did not return")));
            }
            Err(e) => return Err(LabError::io(format!("waiting for {what}"))(e)),
        }
    }
}

fn pair_inner(
    prefix: &str,
    a: NatType,
    b: NatType,
    same_nat: bool,
    bins: &Binaries,
    dir: &Path,
) -> Result<PairOutcome, LabError> {
    let mut lab = Lab::new(prefix)?;
    let sn = lab.add_public_host("sn")?;
    let nat_a = lab.add_nat("nata", a)?;
    let host_a = lab.add_host_behind(&nat_a, "ha")?;
    let host_b = if same_nat {
        lab.add_host_behind(&nat_a, "hb")?
    } else {
        let nat_b = lab.add_nat("natb", b)?;
        lab.add_host_behind(&nat_b, "hb")?
    };
    let work = dir.join(format!("{}-{}-{}", a.as_str(), b.as_str(), same_nat));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(LabError::io("creating the pair's directory"))?;
    let (_daemon, bootstrap) = start_supernode(&sn, &work.join("sn"), bins)?;
    let alice = User {
        name: "alice",
        host: &host_a,
        profile: work.join("alice"),
        bins,
        realtime: false,
    };
    let bob = User {
        name: "bob",
        host: &host_b,
        profile: work.join("bob"),
        bins,
        realtime: false,
    };
    let outcome = (|| {
        for u in [&alice, &bob] {
            u.ok(&["register", u.name, "--server", &bootstrap])?;
            u.ok(&["up"])?;
        }
        alice.ok(&["contacts", "add", "bob"])?;
        bob.ok(&["contacts", "accept", "alice"])?;
        let start = Instant::now();
        let out = alice.ok(&["msg", "send", "bob", "hello across the NATs", "--json"])?;
        let ms = start.elapsed().as_millis() as u64;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| LabError::Invalid(format!("bad msg send output: {e}")))?;
        let via = v["via"].as_str().unwrap_or("unknown").to_string();
        Ok((via, ms))
    })();
    let outcome = outcome.map(|(via, ms)| PairOutcome {
        via,
        ms,
        call: hold_call(&alice, &bob, &work),
    });
    for u in [&alice, &bob] {
        let _ = u.cli(&["down"]).output();
    }
    outcome
}

/// The path this build should find for a pair: direct wherever hole punching or the
/// birthday technique works, and the supernode's co-located relay for symmetric facing
/// symmetric and for UDP-blocked hosts (which reach the supernode and the relay over TCP).
/// No pair fails.
pub fn expected_path(a: NatType, b: NatType, same_nat: bool) -> &'static str {
    use NatType::*;
    if same_nat {
        return "direct";
    }
    // Symmetric with port-restricted meets through the birthday technique; with another
    // symmetric NAT the odds are hopeless and the relay carries the session.
    if a == UdpBlocked || b == UdpBlocked || (a == Symmetric && b == Symmetric) {
        "relay"
    } else {
        "direct"
    }
}

/// Every unordered pair of `types`, then the same-NAT case for `same_nat_type`.
pub fn pairs(types: &[NatType]) -> Vec<(NatType, NatType)> {
    let mut out = Vec::new();
    for (i, a) in types.iter().enumerate() {
        for b in &types[i..] {
            out.push((*a, *b));
        }
    }
    out
}

/// Text table of results.
pub fn table(results: &[PairResult]) -> String {
    let mut s = format!(
        "{:<16} {:<27} {:<8} {:>9}  {:<9} {:>13} {:>8}  {}\n",
        "a", "b", "path", "setup_ms", "call_path", "call_setup_ms", "audio_s", "note"
    );
    for r in results {
        let b = if r.same_nat {
            format!("{} (same NAT)", r.b)
        } else {
            r.b.to_string()
        };
        let mut note = match (&r.error, &r.via) {
            (Some(e), _) => e.clone(),
            (None, Some(v)) if v == "offline" => "delivered through the supernode's mailbox".into(),
            _ => String::new(),
        };
        if let Some(e) = &r.call_error {
            note = if note.is_empty() {
                format!("call: {e}")
            } else {
                format!("{note}; call: {e}")
            };
        }
        let ms = r.setup_ms.map_or("-".to_string(), |m| m.to_string());
        let call_ms = r.call_setup_ms.map_or("-".to_string(), |m| m.to_string());
        let audio = r
            .call_audio_s
            .map_or("-".to_string(), |a| format!("{a:.2}"));
        s.push_str(&format!(
            "{:<16} {:<27} {:<8} {:>9}  {:<9} {:>13} {:>8}  {}\n",
            r.a.to_string(),
            b,
            r.path,
            ms,
            r.call_path,
            call_ms,
            audio,
            note
        ));
    }
    s
}
