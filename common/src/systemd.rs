//! systemd's notification protocol (`Type=notify`) for the daemons: READY with the serving address,
//! STOPPING with a status line, and the watchdog. Every call does nothing without `NOTIFY_SOCKET`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// READY=1, with the status `serving on ADDR`.
pub fn notify_ready(addr: &SocketAddr) {
    let status = format!("serving on {addr}");
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// STOPPING=1, with `status` saying what the daemon waits for.
pub fn notify_stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// One watchdog ping, WATCHDOG=1.
pub fn notify_watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Half of `WATCHDOG_USEC` when systemd expects pings from this process. As sd_watchdog_enabled(3):
/// `WATCHDOG_PID`, when set, must be this process.
pub fn watchdog_interval() -> Option<Duration> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok().filter(|u| *u > 0)?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(10)))
}

/// When systemd expects watchdog pings ([`watchdog_interval`]), a task on the current tokio runtime that
/// pings at that interval while the daemon answers: each time, `probe` runs on the blocking pool and must
/// return within the interval, or the ping is withheld (logged as `WHAT did not answer`), so that systemd
/// restarts a wedged daemon. `what` names what the probe asks (`the job engine`). None without a watchdog.
pub fn spawn_watchdog<T, F>(what: &'static str, probe: F) -> Option<tokio::task::JoinHandle<()>>
where
    F: Fn() -> T + Send + Sync + 'static,
    T: Send + 'static,
{
    let interval = watchdog_interval()?;
    Some(tokio::spawn(watchdog(what, interval, Arc::new(probe))))
}

async fn watchdog<T, F>(what: &'static str, interval: Duration, probe: Arc<F>)
where
    F: Fn() -> T + Send + Sync + 'static,
    T: Send + 'static,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let answer = {
            let probe = probe.clone();
            tokio::task::spawn_blocking(move || probe())
        };
        match tokio::time::timeout(interval, answer).await {
            Ok(Ok(_)) => notify_watchdog(),
            _ => tracing::error!("{what} did not answer within {interval:?}; withholding the watchdog ping"),
        }
    }
}
