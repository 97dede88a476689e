//! Idle-priority busy loops that keep every CPU out of its idle state while the benchmarks run.
//!
//! On a virtual machine an idle vCPU halts, and waking it again (an interrupt through the
//! hypervisor) can take from a hundred microseconds to several milliseconds. A request through a
//! gateway crosses more processes than a direct one, so it pays more of these wake-ups, and at
//! low request rates they swamp the sub-millisecond differences the benchmarks are after. A
//! loaded production host rarely idles, so the suite runs one `SCHED_IDLE` spinner per CPU
//! (through `chrt --idle 0`): the scheduler preempts it the moment any normal thread wants the
//! CPU, so it takes no time from the measured processes, only the idle state away.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Running spinner processes; they stop when this is dropped (and by themselves when the
/// benchmark process disappears or `max` passes).
pub struct Spinners {
    children: Vec<tokio::process::Child>,
}

impl Spinners {
    /// Starts `count` spinners running `exe spin --max <max>` at idle priority. Fails when
    /// `chrt` cannot be started.
    pub fn start(exe: &Path, count: usize, max: Duration) -> std::io::Result<Self> {
        let mut children = Vec::with_capacity(count);
        let max = humantime::format_duration(max).to_string();
        for _ in 0..count {
            let child = tokio::process::Command::new("chrt")
                .args(["--idle", "0"])
                .arg(exe)
                .args(["spin", "--max", &max])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()?;
            children.push(child);
        }
        Ok(Self { children })
    }

    pub fn count(&self) -> usize {
        self.children.len()
    }

    /// Stops them and waits until they are gone.
    pub async fn stop(mut self) {
        for child in &mut self.children {
            let _ = child.kill().await;
        }
    }
}

/// The body of a spinner process: burn CPU until `max` passes or the parent goes away.
pub fn spin(max: Duration) {
    let parent = std::os::unix::process::parent_id();
    let end = Instant::now() + max;
    let mut turns: u64 = 0;
    loop {
        std::hint::spin_loop();
        turns = turns.wrapping_add(1);
        if turns.is_multiple_of(1 << 22)
            && (Instant::now() > end || std::os::unix::process::parent_id() != parent)
        {
            return;
        }
    }
}
