//! How p2pvm's long-running binaries (`p2pd`, `p2pvmm`, `p2p-frontend`) stop:
//! SIGTERM or Ctrl-C cancels one shutdown token, which every task of the
//! binary watches, so a stop is orderly however it is asked for.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A token cancelled at the first SIGTERM or SIGINT (Ctrl-C). Call it from
/// inside a Tokio runtime; the handlers are installed before it returns.
///
/// # Panics
/// If the signal handlers cannot be installed (no Tokio runtime, or the
/// process may not handle signals): a daemon that cannot be stopped cleanly
/// should not start.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).expect("install a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install a SIGINT handler");
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("interrupted: shutting down"),
        }
        cancel.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sigterm_cancels_the_token() {
        let token = shutdown_on_signals();
        assert!(!token.is_cancelled());
        // The test process signals itself: the handler installed above takes
        // it instead of the default action, which would end the test run.
        let pid = std::process::id();
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        tokio::time::timeout(std::time::Duration::from_secs(5), token.cancelled())
            .await
            .expect("the token is cancelled after SIGTERM");
    }
}
