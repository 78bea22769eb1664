//! What every gridforge program needs, so that the agent and the coordinator do it one way: the gRPC client
//! with its endpoint and mutual TLS rules, TLS and PKI files and the `pki` command-line arguments, systemd
//! notifications and the watchdog, progress events, and one-line error chains.

pub mod client;
pub mod config;
pub mod net;
pub mod pki;
pub mod progress;
pub mod systemd;
pub mod tls;

/// Runs a daemon's main future on its own multi-threaded runtime (threads named `thread_name`) and returns its
/// output. Blocking work still running at the end (a job thread stuck in a system call) gets one second,
/// then the process may exit past it.
pub fn run_daemon<F: std::future::Future>(thread_name: &str, main: F) -> std::io::Result<F::Output> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().thread_name(thread_name).build()?;
    let output = runtime.block_on(main);
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(output)
}

/// An error and its causes as one line, `error: cause: cause's cause`. A cause whose text already appears in
/// the line (an error that embeds its source in its own message, or a wrapper that repeats it) is left out,
/// so every cause is printed once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    with_causes(e.to_string(), e.source())
}

/// `message` followed by `cause` and its causes, by the rules of [`error_chain`]: for an error whose own
/// text is not the one to show (a gRPC status: its message, not its debug-like Display).
pub fn with_causes(mut message: String, mut cause: Option<&dyn std::error::Error>) -> String {
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot read /etc/x.toml")]
        Read(#[source] std::io::Error),
        #[error("cannot read /etc/x.toml: {0}")]
        Embeds(#[source] std::io::Error),
        #[error("loading the config")]
        Wraps(#[source] Box<Outer>),
        #[error(transparent)]
        Transparent(std::io::Error),
    }

    fn missing() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)")
    }

    #[test]
    fn each_cause_is_printed_once() {
        let cause = "No such file or directory (os error 2)";
        assert_eq!(error_chain(&Outer::Read(missing())), format!("cannot read /etc/x.toml: {cause}"));
        // A message that already holds its source's text does not get it a second time.
        assert_eq!(error_chain(&Outer::Embeds(missing())), format!("cannot read /etc/x.toml: {cause}"));
        assert_eq!(
            error_chain(&Outer::Wraps(Box::new(Outer::Read(missing())))),
            format!("loading the config: cannot read /etc/x.toml: {cause}")
        );
        assert_eq!(
            error_chain(&Outer::Wraps(Box::new(Outer::Embeds(missing())))),
            format!("loading the config: cannot read /etc/x.toml: {cause}")
        );
        // `transparent` forwards source() to the inner error's source, which here is none.
        assert_eq!(error_chain(&Outer::Transparent(missing())), cause);
    }

    #[test]
    fn an_error_without_causes_is_its_message() {
        assert_eq!(error_chain(&missing()), "No such file or directory (os error 2)");
    }
}
