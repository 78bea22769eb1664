//! The coordinator's HTTP/JSON API through `curl`, as a user's script would call it: TLS against the grid's
//! CA, with a bearer token, a client certificate or no credential at all.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::coordinator::Coordinator;

/// Longest one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How a client proves who it is.
#[derive(Clone, Debug)]
pub enum Credential {
    None,
    Token(String),
    /// A certificate and key of the grid's CA.
    Certificate(PathBuf, PathBuf),
}

#[derive(Clone, Debug)]
pub struct HttpClient {
    /// `https://127.0.0.1:PORT`.
    pub base: String,
    ca: PathBuf,
    credential: Credential,
}

/// An answer: the HTTP status and the body (JSON, or a string for anything else).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {} {}", self.status, self.body)
    }
}

impl HttpClient {
    pub fn new(c: &Coordinator, ca: PathBuf, credential: Credential) -> HttpClient {
        HttpClient { base: format!("https://{}", c.http), ca, credential }
    }

    fn curl(&self, path: &str) -> Command {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", &CALL_TIMEOUT.as_secs().to_string(), "--cacert"]).arg(&self.ca);
        match &self.credential {
            Credential::None => {}
            Credential::Token(t) => {
                cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
            }
            Credential::Certificate(cert, key) => {
                cmd.arg("--cert").arg(cert).arg("--key").arg(key);
            }
        }
        cmd.arg(format!("{}{path}", self.base));
        cmd
    }

    /// `POST /v1/METHOD` with `body` as it is (so that a test can send what is not JSON).
    pub fn post_raw(&self, method: &str, body: &str) -> Answer {
        let mut cmd = self.curl(&format!("/v1/{method}"));
        cmd.args(["-X", "POST", "-H", "Content-Type: application/json", "--data-binary", body]);
        run(cmd)
    }

    /// [`post_raw`](Self::post_raw) with one more header (`Name: value`).
    pub fn post_with(&self, method: &str, header: &str, body: &str) -> Answer {
        let mut cmd = self.curl(&format!("/v1/{method}"));
        cmd.args(["-X", "POST", "-H", "Content-Type: application/json", "-H", header, "--data-binary", body]);
        run(cmd)
    }

    pub fn post(&self, method: &str, body: &Value) -> Answer {
        self.post_raw(method, &body.to_string())
    }

    /// `POST /v1/METHOD`, which must answer 200; its body.
    pub fn ok(&self, method: &str, body: &Value) -> Value {
        let a = self.post(method, body);
        assert_eq!(a.status, 200, "{method} {body}: {a}");
        a.body
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Answer {
        run(self.curl(path))
    }

    /// The server-sent events of a streaming method, each `data:` parsed, until `done` says so of one (or the
    /// stream ends); the events and the names of any `event:` lines seen.
    pub fn events(
        &self,
        method: &str,
        body: &Value,
        done: impl Fn(&Value) -> bool,
    ) -> (Vec<Value>, Vec<String>) {
        let mut cmd = self.curl(&format!("/v1/{method}"));
        cmd.args([
            "-N",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &body.to_string(),
        ]);
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("curl");
        let reader = BufReader::new(child.stdout.take().unwrap());
        let (mut events, mut names) = (Vec::new(), Vec::new());
        let start = Instant::now();
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if let Some(name) = line.strip_prefix("event:") {
                names.push(name.trim().to_string());
            } else if let Some(data) = line.strip_prefix("data:") {
                let v: Value = serde_json::from_str(data.trim()).unwrap_or_else(|e| panic!("{data}: {e}"));
                let last = done(&v);
                events.push(v);
                if last {
                    break;
                }
            }
            assert!(start.elapsed() < CALL_TIMEOUT, "{method}: no end within {CALL_TIMEOUT:?}: {events:?}");
        }
        let _ = child.kill();
        let _ = child.wait();
        (events, names)
    }
}

fn run(mut cmd: Command) -> Answer {
    cmd.args(["-w", "\n%{http_code}"]);
    let out = cmd.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    let status = status.trim().parse().ok().filter(|s| *s != 0).unwrap_or_else(|| {
        let args: Vec<_> = cmd.get_args().collect();
        panic!("curl {args:?} gave no status: {text} {}", String::from_utf8_lossy(&out.stderr))
    });
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
    Answer { status, body }
}
