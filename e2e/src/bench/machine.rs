//! What machine the figures come from, how busy it was, and how much memory a process holds
//! (all from `/proc`, Linux only; elsewhere the fields read "unknown").

use std::path::Path;
use std::process::Command;

/// The machine and build the report describes.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub memory: String,
    pub kernel: String,
    pub rustc: String,
    pub commit: String,
}

const UNKNOWN: &str = "unknown";

/// Reads the machine description; `repo` is where `git` looks for the commit.
pub fn describe(repo: &Path) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "model name").then(|| value.trim().to_owned())
        })
        .unwrap_or_else(|| UNKNOWN.to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| UNKNOWN.to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("Linux {}", s.trim()))
        .unwrap_or_else(|_| UNKNOWN.to_owned());
    let commit = match output(Command::new("git").arg("-C").arg(repo).args([
        "rev-parse",
        "--short=12",
        "HEAD",
    ])) {
        Some(hash) => {
            let dirty = output(Command::new("git").arg("-C").arg(repo).args([
                "status",
                "--porcelain",
                "--untracked-files=no",
            ]))
            .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{hash} (with uncommitted changes)")
            } else {
                hash
            }
        }
        None => UNKNOWN.to_owned(),
    };
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        memory,
        kernel,
        rustc: output(Command::new("rustc").arg("--version")).unwrap_or_else(|| UNKNOWN.to_owned()),
        commit,
    }
}

/// Trimmed stdout of a command that succeeded.
fn output(command: &mut Command) -> Option<String> {
    let out = command.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The 1, 5 and 15 minute load averages, e.g. `0.52 0.61 0.70`.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| UNKNOWN.to_owned())
}

/// The 1-minute load average.
pub fn load1() -> Option<f64> {
    loadavg().split_whitespace().next()?.parse().ok()
}

/// Resident memory of process `pid` (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

/// Peak resident memory of process `pid` since it started (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmHWM:")
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// CPU time (user + system) process `pid` has used, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it are plain numbers.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. the 12th and 13th after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux architecture that matters here.
    Some(std::time::Duration::from_millis(ticks * 10))
}

/// KiB as MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        let rss = rss_kib(pid).unwrap();
        assert!(rss > 0);
        assert!(peak_rss_kib(pid).unwrap() >= rss);
        assert_eq!(loadavg().split_whitespace().count(), 3);
        // Spin until the process's CPU time has grown by 20 ms: on shared cores that can
        // take far longer than 20 ms of wall time; the deadline only catches a stuck counter.
        let before = cpu_time(pid).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let target = before + std::time::Duration::from_millis(20);
        while cpu_time(pid).unwrap() < target {
            assert!(
                std::time::Instant::now() < deadline,
                "CPU time stuck at {before:?}"
            );
            for i in 0..100_000u64 {
                std::hint::black_box(i);
            }
        }
        let m = describe(Path::new("."));
        assert!(m.cores >= 1);
        assert_ne!(m.cpu_model, "");
    }
}
