//! CPU time and resident memory of a process or thread, read from `/proc`.

use std::path::Path;

/// A process's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ProcSample {
    /// User plus system CPU seconds since the process started (all threads).
    pub cpu_s: f64,
    /// Resident set size in bytes.
    pub rss_bytes: u64,
}

/// Parses utime + stime (clock ticks) from a `/proc/.../stat` line. The command name in
/// parentheses may contain spaces, so fields are counted after the last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3 of the man page, utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Parses `VmRSS:` (kB) from `/proc/.../status`, in bytes.
pub fn parse_status_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn ticks_per_second() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
}

/// CPU seconds and RSS of process `pid`, if it exists.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let dir = format!("/proc/{pid}");
    sample_dir(Path::new(&dir))
}

/// CPU seconds of thread `tid` of this process (RSS is the whole process's).
pub fn sample_thread(tid: i32) -> Option<ProcSample> {
    let dir = format!("/proc/self/task/{tid}");
    sample_dir(Path::new(&dir))
}

fn sample_dir(dir: &Path) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    Some(ProcSample {
        cpu_s: parse_stat_ticks(&stat)? as f64 / ticks_per_second(),
        rss_bytes: parse_status_rss(&status).unwrap_or(0),
    })
}

/// The calling thread's id, to sample it later with [`sample_thread`].
pub fn current_tid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "1234 (peer line) S 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 1 0";
        assert_eq!(parse_stat_ticks(line), Some(175));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn rss_comes_from_vmrss_in_kilobytes() {
        let status = "Name:\tx\nVmRSS:\t    2048 kB\nThreads:\t1\n";
        assert_eq!(parse_status_rss(status), Some(2048 * 1024));
        assert_eq!(parse_status_rss("Name: x\n"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0);
        assert!(sample_thread(current_tid()).is_some());
    }
}
