//! Running the real binaries in end-to-end tests: spawn, forward their logs, find their ports.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("could not start {bin}: {source}")]
    Spawn { bin: String, source: std::io::Error },
    #[error("no `{what}` line within {timeout:?}; output so far:\n{output}")]
    Timeout {
        what: String,
        timeout: Duration,
        output: String,
    },
    #[error("process closed its output before logging `{what}`; output:\n{output}")]
    Exited { what: String, output: String },
    #[error("waiting for the process failed: {0}")]
    Wait(std::io::Error),
    #[error("could not signal the process: {0}")]
    Signal(String),
}

/// A child process whose stdout and stderr are forwarded, line by line, to the test's stderr
/// (prefixed with the binary name) and kept for [`Child::wait_for_line`]. Killed when dropped.
pub struct Child {
    name: String,
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Count of lines seen, and whether both pipes have closed.
    progress: watch::Receiver<(usize, bool)>,
}

/// Starts `bin` with `args` and extra environment `envs` (the test's environment is inherited).
pub fn spawn<I, S, E, K, V>(bin: impl AsRef<Path>, args: I, envs: E) -> Result<Child, ProcessError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
    E: IntoIterator<Item = (K, V)>,
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let mut command = tokio::process::Command::new(bin.as_ref());
    command.args(args).envs(envs);
    spawn_command(bin.as_ref(), command)
}

/// [`spawn`], with the child leading a process group of its own (its id is the group's), as
/// a shell starts a job: a signal sent to the group, as a terminal's Ctrl-C sends SIGINT,
/// reaches it and whatever it started in its group, and not the test.
#[cfg(unix)]
pub fn spawn_group_leader<I, S, E, K, V>(
    bin: impl AsRef<Path>,
    args: I,
    envs: E,
) -> Result<Child, ProcessError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
    E: IntoIterator<Item = (K, V)>,
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let mut command = tokio::process::Command::new(bin.as_ref());
    command.args(args).envs(envs).process_group(0);
    spawn_command(bin.as_ref(), command)
}

fn spawn_command(bin: &Path, mut command: tokio::process::Command) -> Result<Child, ProcessError> {
    let name = bin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "child".to_owned());
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProcessError::Spawn {
            bin: bin.display().to_string(),
            source,
        })?;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, progress) = watch::channel((0, false));
    let tx = Arc::new(tx);
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(2));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    for pipe in [
        stdout.map(|p| Box::new(p) as Box<dyn AsyncRead + Send + Unpin>),
        stderr.map(|p| Box::new(p) as _),
    ] {
        let (lines, tx, open, name) = (
            Arc::clone(&lines),
            Arc::clone(&tx),
            Arc::clone(&open),
            name.clone(),
        );
        tokio::spawn(async move {
            if let Some(pipe) = pipe {
                let mut reader = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    eprintln!("[{name}] {line}");
                    let count = match lines.lock() {
                        Ok(mut lines) => {
                            lines.push(strip_ansi(&line));
                            lines.len()
                        }
                        Err(_) => break,
                    };
                    tx.send_modify(|p| p.0 = count);
                }
            }
            if open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
                tx.send_modify(|p| p.1 = true);
            }
        });
    }
    Ok(Child {
        name,
        child,
        lines,
        progress,
    })
}

impl Child {
    /// The OS process id (None once it has been waited for).
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Every output line so far (ANSI escapes stripped).
    pub fn output(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits for an output line (ANSI escapes stripped) for which `find` returns `Some`, looking at
    /// earlier lines too. `what` names the awaited line in the error.
    pub async fn wait_for_line<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut find: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, ProcessError> {
        let mut progress = self.progress.clone();
        let mut seen = 0;
        let search = async {
            loop {
                let (count, closed) = *progress.borrow_and_update();
                let found = self.lines.lock().ok().and_then(|lines| {
                    let found = lines
                        .get(seen..count)
                        .into_iter()
                        .flatten()
                        .find_map(|l| find(l));
                    seen = count;
                    found
                });
                if found.is_some() || closed || progress.changed().await.is_err() {
                    return found;
                }
            }
        };
        let output = || self.output().join("\n");
        let what = what.to_owned();
        match tokio::time::timeout(timeout, search).await {
            Ok(Some(found)) => Ok(found),
            Ok(None) => Err(ProcessError::Exited {
                what,
                output: output(),
            }),
            Err(_) => Err(ProcessError::Timeout {
                what,
                timeout,
                output: output(),
            }),
        }
    }

    /// Waits for `"<listener> listening on <addr>"` (listener `http` or `grpc`) and returns the address.
    pub async fn wait_for_listening(
        &self,
        listener: &str,
        timeout: Duration,
    ) -> Result<SocketAddr, ProcessError> {
        let what = format!("{listener} listening on");
        self.wait_for_line(&what, timeout, |line| listening_addr(line, listener))
            .await
    }

    /// Sends SIGTERM (through `kill(1)`, as this crate has no unsafe code).
    pub async fn terminate(&self) -> Result<(), ProcessError> {
        let pid = self
            .id()
            .ok_or_else(|| ProcessError::Signal(format!("{} has already exited", self.name)))?;
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .map_err(|e| ProcessError::Signal(e.to_string()))?;
        if status.success() {
            Ok(())
        } else {
            Err(ProcessError::Signal(format!("kill exited with {status}")))
        }
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> Result<ExitStatus, ProcessError> {
        self.child.wait().await.map_err(ProcessError::Wait)
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub async fn kill(&mut self) -> Result<(), ProcessError> {
        self.child.kill().await.map_err(ProcessError::Wait)
    }

    /// The underlying tokio child.
    pub fn inner(&mut self) -> &mut tokio::process::Child {
        &mut self.child
    }
}

/// [`Child::wait_for_listening`] as a free function.
pub async fn wait_for_listening(
    child: &Child,
    listener: &str,
    timeout: Duration,
) -> Result<SocketAddr, ProcessError> {
    child.wait_for_listening(listener, timeout).await
}

/// The address in a `"<listener> listening on <addr>"` log line, text or JSON.
pub fn listening_addr(line: &str, listener: &str) -> Option<SocketAddr> {
    let needle = format!("{listener} listening on ");
    let start = line.find(&needle)? + needle.len();
    let addr: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    addr.parse().ok()
}

/// Removes ANSI escape sequences (CSI `ESC [ … final`, and two-byte `ESC x`).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // CSI sequences run to a final byte in '@'..='~'; other escapes are two characters.
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// The path of workspace binary `name`, next to the running test executable
/// (`target/<profile>/deps/<test>-<hash>` → `target/<profile>/<name>`).
///
/// # Panics
/// When it is not there: build it first with `cargo build --workspace --bins`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        panic!(
            "binary {name} not found at {}: run `cargo build --workspace --bins` first",
            path.display()
        );
    }
    path
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn finds_addresses_in_text_and_json_lines() {
        let text = strip_ansi(
            "\u{1b}[2m2025-01-01T00:00:00Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m sluice_mock: http listening on 127.0.0.1:43121",
        );
        assert_eq!(
            listening_addr(&text, "http"),
            Some("127.0.0.1:43121".parse().unwrap())
        );
        let json = r#"{"level":"INFO","fields":{"message":"grpc listening on [::1]:50051"}}"#;
        assert_eq!(
            listening_addr(json, "grpc"),
            Some("[::1]:50051".parse().unwrap())
        );
        assert_eq!(listening_addr(json, "http"), None);
    }
}
