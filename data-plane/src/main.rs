//! `sluice-proxy`: parse the configuration, set up logging, run until SIGTERM or SIGINT.

use std::process::ExitCode;

use sluice_proxy::Config;

/// One thread is enough here: it accepts connections and reports usage; requests are served
/// on threads of their own, and snapshots decoded and applied on another (`server.rs`).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let sluice_config::Parsed {
        options: config,
        overridden,
    } = Config::load();
    let _log = match sluice_proxy::logging::init(config.log_format, config.log_buffer_lines) {
        Ok(log) => log,
        Err(err) => return refused(&format!("cannot set up logging: {err}")),
    };
    overridden.iter().for_each(sluice_config::Overridden::warn);
    #[cfg(unix)]
    match sluice_listener::raise_open_files_limit() {
        // Each client connection serving a request holds an upstream connection too: past
        // half the limit, the replica runs out of descriptors before it refuses a client with
        // the connection limit's 503, and new clients wait unanswered in the listen queue.
        Ok(limit) if (config.max_connections as u64).saturating_mul(2) > limit => {
            tracing::warn!(
                max_connections = config.max_connections,
                open_files_limit = limit,
                "--max-connections is more than half the open-files limit: raise the limit \
                 (ulimit -n, LimitNOFILE) or lower --max-connections"
            );
        }
        Ok(limit) => tracing::debug!(limit, "open files"),
        Err(err) => tracing::warn!(error = %err, "cannot raise the open-files limit"),
    }
    // Before anything else (a spool to replay, the listener to bind): a SIGTERM that comes
    // while the process starts must stop it cleanly, not be lost (as PID 1 in a container,
    // a signal without a handler is dropped, and the orchestrator waits for its SIGKILL).
    let shutdown = match shutdown_signal() {
        Ok(shutdown) => shutdown,
        Err(err) => return refused(&format!("cannot listen for signals: {err}")),
    };
    match sluice_proxy::run(config, shutdown).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        // Each error's text names its cause already: one readable line.
        Err(err) => refused(&err.to_string()),
    }
}

fn refused(why: &str) -> ExitCode {
    eprintln!("sluice-proxy: {why}");
    ExitCode::FAILURE
}

/// Completes on the first SIGTERM or SIGINT; a second one while the process drains stops it
/// at once (the usage not yet acked stays in the spool for the next start).
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tokio::spawn(async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                tracing::warn!("a second signal: stopping without waiting for the drain");
                std::process::exit(1);
            });
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
