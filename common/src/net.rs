//! Loopback ports for listeners that a program (or a test) starts after choosing the port, and accepting
//! connections on a listener that must keep serving.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// First port handed out by [`unused_loopback_port`].
const FIRST: u32 = 20_000;
/// How many ports [`unused_loopback_port`] cycles through: up to 31,999, below Linux's default ephemeral range
/// (32768–60999), so that no outgoing connection of this machine takes a chosen port before its listener binds.
const SPAN: u32 = 12_000;

/// A 127.0.0.1 port that nothing listens on now and that this process has not handed out before.
///
/// Binding port 0 and closing the socket is racy when the port is bound again later: the kernel hands the same
/// ephemeral port to the next `bind(0)` or to an outgoing connection in between. Ports here come from below
/// the ephemeral range instead, each at most once per process, starting at a point derived from the process id
/// so that two processes seldom probe the same ports.
///
/// # Panics
/// When every port of the range is taken.
pub fn unused_loopback_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + (start + n) % SPAN;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + SPAN);
}

/// The next connection on `listener`. A failed accept (out of file descriptors and the like) is logged with
/// `what` naming the listener and retried after 100 ms instead of spinning or ending the server.
pub async fn accept(listener: &tokio::net::TcpListener, what: &str) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return stream,
            Err(e) => {
                tracing::warn!("{what}: cannot accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_below_the_ephemeral_range_and_bindable() {
        let ports: Vec<u16> = (0..200).map(|_| unused_loopback_port()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice");
        for &p in &ports {
            assert!((20_000..32_000).contains(&p), "{p}");
        }
        TcpListener::bind(("127.0.0.1", ports[0])).expect("the port binds");
    }
}
