//! The user-space impairment stage: an NFQUEUE reader in a router's namespace that gives each
//! forwarded packet its verdict after the delay the [`Schedule`] draws, or drops it. This
//! kernel has no netem (`shared/LAB.md`); out-of-order verdicts give jitter and reordering.
//!
//! The stage is a thread of the lab's process that enters the router's namespace, binds the
//! queue there (queue numbers are per namespace) and then adds the iptables rule that feeds
//! it (`mangle FORWARD`, priority -150: before the lab's own chains). Stopping it removes the
//! rule first, then accepts whatever it still holds, then unbinds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nfq::{Queue, Verdict};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

use crate::impair::{ImpairConfig, Schedule, StageStats};
use crate::LabError;

/// The queue the stage binds in its router's namespace.
const QUEUE_NUM: u16 = 7;
/// Packets the kernel queues for the stage before it drops new ones.
const KERNEL_QUEUE_LEN: u32 = 4096;
/// Packets the stage holds at once (memory bound: each is a small metadata message).
const MAX_HELD: usize = 4096;
/// The stage wakes at least this often to release packets and to notice a stop.
const TICK: Duration = Duration::from_millis(1);

/// The iptables rule feeding the stage (its queue number is `QUEUE_NUM`).
fn rule(action: &'static str) -> [&'static str; 9] {
    [
        "iptables",
        "-t",
        "mangle",
        action,
        "FORWARD",
        "-j",
        "NFQUEUE",
        "--queue-num",
        "7",
    ]
}

/// A running stage.
pub(crate) struct Stage {
    netns: String,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<StageStats>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Stage {
    /// Binds the queue inside `netns`, starts the thread, then feeds it with the iptables
    /// rule (in that order, so no packet meets a rule without a reader).
    pub(crate) fn start(netns: &str, cfg: ImpairConfig, seed: u64) -> Result<Stage, LabError> {
        cfg.validate().map_err(LabError::Invalid)?;
        let path = format!("/var/run/netns/{netns}");
        let file = std::fs::File::open(&path).map_err(LabError::io(format!("opening {path}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(StageStats::default()));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
        let thread = {
            let (stop, stats) = (stop.clone(), stats.clone());
            std::thread::Builder::new()
                .name(format!("impair-{netns}"))
                .spawn(move || {
                    realtime_priority();
                    let queue = (|| -> std::io::Result<Queue> {
                        use std::os::fd::AsFd as _;
                        move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))?;
                        let mut q = Queue::open()?;
                        q.bind(QUEUE_NUM)?;
                        // Verdicts need only the packet id: copy no payload.
                        q.set_copy_range(QUEUE_NUM, 0)?;
                        q.set_queue_max_len(QUEUE_NUM, KERNEL_QUEUE_LEN)?;
                        q.set_nonblocking(true);
                        Ok(q)
                    })();
                    let mut queue = match queue {
                        Ok(q) => {
                            let _ = ready_tx.send(Ok(()));
                            q
                        }
                        Err(e) => {
                            let msg = format!("binding NFQUEUE {QUEUE_NUM}: {e}");
                            let _ = ready_tx.send(Err(msg.clone()));
                            return Err(msg);
                        }
                    };
                    run(
                        &mut queue,
                        Schedule::new(cfg, seed, MAX_HELD),
                        &stop,
                        &stats,
                    )
                    .map_err(|e| format!("impairment stage: {e}"))
                })
                .map_err(LabError::io("starting the impairment stage"))?
        };
        let mut stage = Stage {
            netns: netns.to_owned(),
            stop,
            stats,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(LabError::Invalid(e)),
            Err(_) => return Err(LabError::Invalid("the impairment stage died".into())),
        }
        if let Err(e) = crate::lab::run_in(netns, &rule("-A")) {
            let _ = stage.stop_thread();
            return Err(e);
        }
        Ok(stage)
    }

    pub(crate) fn stats(&self) -> StageStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Removes the rule, lets the thread accept what it holds, and returns its figures.
    pub(crate) fn stop(mut self) -> Result<StageStats, LabError> {
        let removed = crate::lab::run_in(&self.netns, &rule("-D"));
        let ran = self.stop_thread();
        removed?;
        ran.map_err(LabError::Invalid)?;
        Ok(self.stats())
    }

    fn stop_thread(&mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("the impairment stage panicked".into()),
            None => Ok(()),
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        // The namespace goes away with the lab; the rule with it. Only the thread is ours.
        let _ = self.stop_thread();
    }
}

/// Best effort: the stage stands in for a kernel qdisc, so other load on the box must not
/// delay its verdicts. SCHED_FIFO for this thread alone (`chrt` on its thread id; the
/// workspace has no unsafe code for sched_setscheduler). Without it the stage still works,
/// with the box's scheduling noise added to the asked-for jitter.
fn realtime_priority() {
    let tid = rustix::thread::gettid().as_raw_nonzero().to_string();
    let _ = std::process::Command::new("chrt")
        .args(["-f", "-p", "30", &tid])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

fn run(
    queue: &mut Queue,
    mut schedule: Schedule<nfq::Message>,
    stop: &AtomicBool,
    stats: &Mutex<StageStats>,
) -> std::io::Result<()> {
    let verdict = |queue: &mut Queue, mut msg: nfq::Message, v: Verdict| {
        msg.set_verdict(v);
        queue.verdict(msg)
    };
    while !stop.load(Ordering::Relaxed) {
        loop {
            match queue.recv() {
                Ok(msg) => {
                    if let Some(msg) = schedule.arrive(Instant::now(), msg) {
                        verdict(queue, msg, Verdict::Drop)?;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let now = Instant::now();
        while let Some(msg) = schedule.release(now) {
            verdict(queue, msg, Verdict::Accept)?;
        }
        if let Ok(mut s) = stats.lock() {
            *s = schedule.stats();
        }
        let wait = schedule.next_due().map_or(TICK, |at| {
            at.saturating_duration_since(Instant::now()).min(TICK)
        });
        std::thread::sleep(wait);
    }
    // Stopping: the rule is gone, so nothing new arrives; let what is queued or held through.
    loop {
        match queue.recv() {
            Ok(msg) => verdict(queue, msg, Verdict::Accept)?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    for msg in schedule.drain() {
        verdict(queue, msg, Verdict::Accept)?;
    }
    let _ = queue.unbind(QUEUE_NUM);
    Ok(())
}
