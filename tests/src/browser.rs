//! Headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`): chromedriver on a
//! free loopback port, one session with a fresh profile and nothing that reaches out to the internet. The
//! protocol is plain JSON over HTTP, spoken with curl.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use crate::wait_until;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The W3C name of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// WebDriver key codes.
pub const ENTER: &str = "\u{E007}";
pub const ESCAPE: &str = "\u{E00C}";
pub const WAIT: Duration = Duration::from_secs(30);

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// chromedriver and a headless Chromium session of `width` × `height` that accepts the grid's own
    /// certificates (its CA is not in the browser's store).
    pub fn start(width: u32, height: u32) -> Browser {
        let port = gridforge_common::net::unused_loopback_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{CHROMEDRIVER}: {e} (scripts/deps installs chromium-driver)"));
        let profile = tempfile::Builder::new().prefix("gridforge-chromium-").tempdir().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let mut b = Browser { driver, base, session: String::new(), _profile: profile };
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--ignore-certificate-errors",
            &format!("--window-size={width},{height}"),
            &format!("--user-data-dir={}", b._profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let started = Instant::now();
        let session = loop {
            match b.call_raw("POST", "/session", Some(&caps)) {
                Some(v) if v["value"]["sessionId"].is_string() => break v,
                other => {
                    assert!(started.elapsed() < WAIT, "no WebDriver session: {other:?}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        b.session = session["value"]["sessionId"].as_str().unwrap().to_string();
        b
    }

    fn call_raw(&self, method: &str, path: &str, body: Option<&Value>) -> Option<Value> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", &CALL_TIMEOUT.as_secs().to_string(), "-X", method]);
        cmd.arg(format!("{}{path}", self.base));
        if let Some(body) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary", &body.to_string()]);
        }
        let out = cmd.output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// A command of the session; its `value`. Panics on a WebDriver error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let v = self
            .call_raw(method, &path, body.as_ref())
            .unwrap_or_else(|| panic!("{method} {path}: no answer"));
        if v["value"]["error"].is_string() {
            panic!("{method} {path}: {}", v["value"]);
        }
        v["value"].clone()
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({"url": url})));
    }

    /// The element `css` selects, waiting for it to appear.
    pub fn find(&self, css: &str) -> String {
        wait_until(&format!("an element {css}"), WAIT, Duration::from_millis(100), || {
            let path = format!("/session/{}/element", self.session);
            let v = self.call_raw("POST", &path, Some(&json!({"using": "css selector", "value": css})));
            v.as_ref()
                .and_then(|v| v["value"][ELEMENT].as_str())
                .map(str::to_string)
                .ok_or_else(|| format!("{v:?}"))
        })
    }

    pub fn click(&self, css: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    /// Replaces the text of the input `css` with `text`, typed as keys.
    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/clear"), Some(json!({})));
        self.call("POST", &format!("/element/{id}/value"), Some(json!({"text": text})));
    }

    /// Presses `key` (a WebDriver key code such as [`ENTER`]) with `css` focused, as a keyboard would.
    pub fn press(&self, css: &str, key: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/value"), Some(json!({"text": key})));
    }

    /// The `id` of the focused element.
    pub fn focused(&self) -> String {
        self.js("return document.activeElement ? document.activeElement.id : ''", json!([]))
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The visible text of `css`.
    pub fn text(&self, css: &str) -> String {
        let id = self.find(css);
        self.call("GET", &format!("/element/{id}/text"), None).as_str().unwrap_or_default().to_string()
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page; what it returns.
    pub fn js(&self, script: &str, args: Value) -> Value {
        self.call("POST", "/execute/sync", Some(json!({"script": script, "args": args})))
    }

    /// Waits until the text of `css` contains `wanted`; the text.
    pub fn wait_text(&self, css: &str, wanted: &str) -> String {
        wait_until(&format!("{css} to say {wanted:?}"), WAIT, Duration::from_millis(200), || {
            let t = self.js(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
                json!([css]),
            );
            let t = t.as_str().unwrap_or_default().to_string();
            if t.contains(wanted) { Ok(t) } else { Err(t) }
        })
    }

    /// Waits until the attribute `name` of `css` is `wanted`.
    pub fn wait_attribute(&self, css: &str, name: &str, wanted: &str, limit: Duration) {
        wait_until(&format!("{css} {name}={wanted:?}"), limit, Duration::from_millis(200), || {
            let v = self.js(
                "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
                json!([css, name]),
            );
            if v == wanted { Ok(()) } else { Err(v.to_string()) }
        })
    }

    pub fn resize(&self, width: u32, height: u32) {
        self.call("POST", "/window/rect", Some(json!({"width": width, "height": height})));
    }

    /// A PNG of the viewport at `path`.
    pub fn screenshot(&self, path: &Path) -> PathBuf {
        let data = self.call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD.decode(data.as_str().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
        path.to_path_buf()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call_raw("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
