//! The ops commands against a running daemon: `pki` certificates checked by openssl, and the `job`
//! subcommands over mutual TLS.

mod serve_support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use serve_support::*;

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn pki_makes_a_ca_and_certificates_that_openssl_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("tls");
    let ds = d.to_str().unwrap();
    agent_ok(&["pki", "init", "--dir", ds]);
    agent_ok(&["pki", "issue", "--dir", ds, "--name", "node1"]);
    let out = agent_ok(&[
        "pki",
        "issue",
        "--dir",
        ds,
        "--name",
        "coordinator",
        "--dns",
        "coord.example.net",
        "--ip",
        "10.1.2.3",
        "--ip",
        "::1",
        "--days",
        "10",
    ]);
    assert!(out.contains("coordinator.pem"), "{out}");

    for name in ["ca", "node1", "coordinator"] {
        let mode = std::fs::metadata(d.join(format!("{name}.key"))).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}.key mode {mode:o}");
    }
    let ca = d.join("ca.pem");
    for name in ["node1", "coordinator"] {
        let pem = d.join(format!("{name}.pem"));
        let out = openssl(&["verify", "-CAfile", ca.to_str().unwrap(), pem.to_str().unwrap()]);
        assert!(out.trim().ends_with("OK"), "{out}");
        let purpose = ["sslserver", "sslclient"];
        for p in purpose {
            let out =
                openssl(&["verify", "-purpose", p, "-CAfile", ca.to_str().unwrap(), pem.to_str().unwrap()]);
            assert!(out.trim().ends_with("OK"), "{p}: {out}");
        }
    }
    let text = openssl(&["x509", "-in", d.join("node1.pem").to_str().unwrap(), "-noout", "-text"]);
    assert!(text.contains("Subject: CN = node1"), "{text}");
    assert!(text.contains("TLS Web Server Authentication, TLS Web Client Authentication"), "{text}");
    assert!(text.contains("DNS:node1, DNS:localhost, IP Address:127.0.0.1"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    let text = openssl(&["x509", "-in", d.join("coordinator.pem").to_str().unwrap(), "-noout", "-text"]);
    assert!(
        text.contains("DNS:coord.example.net, IP Address:10.1.2.3, IP Address:0:0:0:0:0:0:0:1"),
        "{text}"
    );
    assert!(!text.contains("DNS:localhost"), "only the names given: {text}");
    let text = openssl(&["x509", "-in", ca.to_str().unwrap(), "-noout", "-text"]);
    assert!(text.contains("CA:TRUE"), "{text}");
    assert!(text.contains("Certificate Sign"), "{text}");
    // The key matches its certificate.
    let cert_pub = openssl(&["x509", "-in", d.join("node1.pem").to_str().unwrap(), "-noout", "-pubkey"]);
    let key_pub = openssl(&["pkey", "-in", d.join("node1.key").to_str().unwrap(), "-pubout"]);
    assert_eq!(cert_pub, key_pub);

    // Nothing is overwritten, and names stay file names.
    let out = agent(&["pki", "init", "--dir", ds]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"), "{out:?}");
    let out = agent(&["pki", "issue", "--dir", ds, "--name", "node1"]);
    assert!(!out.status.success());
    let out = agent(&["pki", "issue", "--dir", ds, "--name", "../escape"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid name"), "{out:?}");
    let empty = dir.path().join("none");
    let out = agent(&["pki", "issue", "--dir", empty.to_str().unwrap(), "--name", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ca.key"), "names the missing CA key: {out:?}");
}

#[test]
fn job_commands_submit_watch_get_list_and_cancel() {
    let node = Node::new("");
    let _daemon = node.start();
    let disk = node.sparse_disk("cli.img", 8 * MIB);
    let request = node.dir.path().join("wipe.json");
    std::fs::write(
        &request,
        serde_json::json!({
            "idempotencyKey": "cli-wipe-1",
            "wipe": {"target": {"device": disk.to_str().unwrap()}, "method": "zero-write"}
        })
        .to_string(),
    )
    .unwrap();
    let endpoint = node.endpoint();
    let tls = [
        "--server",
        &endpoint,
        "--ca",
        node.pki.ca().to_str().unwrap(),
        "--cert",
        node.pki.cert("ops").to_str().unwrap(),
        "--key",
        node.pki.key("ops").to_str().unwrap(),
    ]
    .map(str::to_string);
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(tls.iter().map(String::as_str));
        agent(&all)
    };

    let out = run(&["job", "submit", "--file", request.to_str().unwrap(), "--watch"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let id = stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("submitted job "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no job id in:\n{stdout}"))
        .to_string();
    assert!(stdout.contains("[wipe] 8.0 MiB / 8.0 MiB (100.0%)"), "{stdout}");
    assert!(stdout.lines().last().unwrap().contains("SUCCEEDED"), "{stdout}");

    // The same flags from the environment, and the global --json.
    let out = Command::new(BIN)
        .args(["job", "get", &id, "--json"])
        .env("GRIDFORGE_SERVER", &endpoint)
        .env("GRIDFORGE_CA", node.pki.ca())
        .env("GRIDFORGE_CERT", node.pki.cert("ops"))
        .env("GRIDFORGE_KEY", node.pki.key("ops"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["id"], id.as_str());
    assert_eq!(job["state"], "SUCCEEDED", "{job}");
    let report: serde_json::Value =
        serde_json::from_str(job["wipe"]["reportJson"].as_str().unwrap()).unwrap();
    assert_eq!(report["operator"], "ops");

    let out = run(&["job", "get", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("state:    SUCCEEDED") && text.contains("operator ops"),
        "{text}"
    );

    let out = run(&["job", "list", "--state", "succeeded"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id), "{out:?}");
    let out = run(&["job", "list", "--state", "running"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&id), "{out:?}");

    let out = run(&["job", "watch", &id, "--from", "1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("[queue] queued"),
        "from 1 skips event 0: {out:?}"
    );

    let out = run(&["job", "cancel", &id]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("FailedPrecondition") && stderr.contains("SUCCEEDED"), "{stderr}");

    // A job that fails: watch exits non-zero and says why.
    let missing = node.disk("missing.img");
    std::fs::write(
        &request,
        serde_json::json!({"wipe": {"target": {"device": missing.to_str().unwrap()}, "method": "zero"}})
            .to_string(),
    )
    .unwrap();
    let out = run(&["job", "submit", "--file", request.to_str().unwrap(), "--watch"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");

    // No certificates, no call.
    let out = agent(&["job", "list", "--server", &endpoint]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca"), "{out:?}");
}
