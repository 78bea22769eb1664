//! `coordinator.toml`: every key is documented in `systemd/coordinator.toml`. Unknown keys are refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gridforge_common::tls::TlsFiles;
use serde::Deserialize;

pub use gridforge_common::config::ConfigError;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC API (Coordinator, grpc.health.v1, reflection).
    pub listen: SocketAddr,
    /// Holds grid.redb.
    pub state_dir: PathBuf,
    /// `ca` is the CA that client (gridctl) certificates must chain to; `cert` and `key` are the
    /// coordinator's, served to clients and presented to agents. `insecure` (plaintext without client
    /// authentication) is refused unless `listen` is a loopback address.
    #[serde(deserialize_with = "tls_files")]
    pub tls: TlsFiles,
    pub agents: AgentsConfig,
    pub poller: PollerConfig,
    pub ops: OpsConfig,
    pub scheduler: SchedulerConfig,
    pub auth: AuthConfig,
    pub fencing: FencingConfig,
    pub store: StoreConfig,
    pub networks: NetworksConfig,
    pub power: PowerConfig,
    pub http: HttpConfig,
}

/// The power actuator of dedicated servers: a program run with `{node}`, `{address}` and `{action}`
/// replaced in its arguments; `{action}` is "boot" (boot the server from its freshly written disk) or "off"
/// (after its release wiped it). Exit 0 is success.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PowerConfig {
    /// E.g. ["/usr/local/sbin/gridforge-power", "{node}", "{action}"] mapping to ipmitool or a PDU;
    /// empty: dedicated servers are refused.
    pub command: Vec<String>,
    /// A command that has not exited by then is killed and its step fails (0: 60 s).
    pub timeout_secs: u64,
}

/// The HTTP/JSON API and the web panel, on a port of their own beside gRPC, with the same TLS files (a
/// client certificate is asked for but not required: a bearer token from `gridctl token create` does too).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to serve on; absent: no HTTP API and no panel.
    pub listen: Option<SocketAddr>,
    /// The panel's meters turn amber and red at these percentages of a VM's CPU, memory or node's usage.
    pub amber_percent: f64,
    pub red_percent: f64,
    /// The full scale (100 %) of a server's disk meter (bytes read and written) and network meter (bytes
    /// received and sent), in MiB per second.
    pub disk_meter_mib_per_s: f64,
    pub network_meter_mib_per_s: f64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: None,
            amber_percent: 70.0,
            red_percent: 90.0,
            disk_meter_mib_per_s: 200.0,
            // 1 Gbit/s.
            network_meter_mib_per_s: 119.0,
        }
    }
}

/// Tenant networks: the bridge on every node that tenant NICs attach to (Open vSwitch, so that each NIC's
/// VLAN tag applies), and the VLAN IDs the coordinator hands out.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworksConfig {
    pub bridge: String,
    pub vlan_first: u32,
    pub vlan_last: u32,
}

impl Default for NetworksConfig {
    fn default() -> Self {
        NetworksConfig { bridge: "br-tenants".into(), vlan_first: 100, vlan_last: 3999 }
    }
}

/// Where the grid view is kept: the embedded store (redb in `state_dir`, one coordinator) or etcd (several
/// coordinators, one elected leader).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// "embedded" or "etcd".
    pub backend: String,
    pub etcd: EtcdConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members, e.g. ["http://10.0.0.1:2379", "http://10.0.0.2:2379"].
    pub endpoints: Vec<String>,
    /// Every key of the grid lives under this prefix (several grids may share one etcd).
    pub prefix: String,
    /// The leader's lease: a leader that cannot renew it within this many seconds is replaced.
    pub lease_ttl_secs: u64,
    /// This coordinator's name among the members (default: the host name) and the address gridctl reaches
    /// it at (default: `listen`, with the host name for an unspecified address).
    pub name: String,
    pub advertise: String,
    /// Most records one etcd transaction writes: etcd's own --max-txn-ops (default 128). Raise both
    /// together for faster batching.
    pub max_txn_ops: usize,
    /// Longest wait for one etcd call.
    pub timeout_secs: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { backend: "embedded".into(), etcd: EtcdConfig::default() }
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/gridforge".into(),
            lease_ttl_secs: 10,
            name: String::new(),
            advertise: String::new(),
            max_txn_ops: 128,
            timeout_secs: 5,
        }
    }
}

/// How a lost node is powered off before its VMs are rebuilt elsewhere.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FencingConfig {
    /// "manual": wait for `gridctl node fenced NODE`; "command": run `command` (exit 0 = fenced); "libvirt":
    /// destroy the libvirt domain `domain` at `libvirt_uri` (nodes that are themselves VMs).
    pub actuator: String,
    /// The libvirt actuator's connection, e.g. "qemu+ssh://host1/system", and the node's domain there
    /// (`{node}` is replaced).
    pub libvirt_uri: String,
    pub domain: String,
    /// Program and arguments; `{node}` and `{address}` are replaced, e.g.
    /// ["ipmitool", "-H", "{node}-bmc", "-U", "admin", "-f", "/etc/gridforge/ipmi.pass", "chassis", "power", "off"].
    pub command: Vec<String>,
    /// A command that has not exited by then is killed, and the node stays Lost.
    pub timeout_secs: u64,
}

impl Default for FencingConfig {
    fn default() -> Self {
        FencingConfig {
            actuator: "manual".into(),
            command: Vec::new(),
            libvirt_uri: String::new(),
            domain: "{node}".into(),
            timeout_secs: 60,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// CA the agents' certificates must chain to [default: tls.ca].
    pub ca: Option<PathBuf>,
    /// Client certificate and key presented to agents [default: tls.cert, tls.key].
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Deadline of one agent call that is not a job event stream.
    pub call_timeout_secs: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollerConfig {
    pub interval_ms: u64,
    /// Nodes polled at once, per datacenter (each datacenter is polled by a loop of its own).
    pub concurrency: usize,
    /// Missed polls in a row before a node is Unreachable.
    pub unreachable_after: u32,
    /// NodeStats sampling window.
    pub sample_ms: u32,
    /// Seconds a node stays Unreachable before it is Lost: then fenced, and its VMs rebuilt elsewhere.
    pub lost_after_secs: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsConfig {
    /// Tries of an agent step while the agent is unreachable, before the operation fails.
    pub retry_attempts: u32,
    /// First wait between tries; doubled each time, at most 30 s.
    pub retry_backoff_ms: u64,
    /// Disk-heavy jobs (provision, delete, resize, snapshot) running at once per node; more wait queued.
    pub max_disk_jobs_per_node: usize,
    /// How long an API call that starts an operation waits for its first agent job to reach the agent (or to
    /// be queued, or to fail) before it answers anyway. The answer then says where the operation is, and
    /// callers that send faster than the agents take jobs are slowed down instead of piling up work.
    pub dispatch_wait_ms: u64,
    /// Finished operations older than this are purged from the grid view, except each VM's latest
    /// (hours; 0 keeps them all).
    pub keep_finished_hours: u64,
    /// The configuration's `[networks]` (set by the daemon).
    #[serde(skip)]
    pub networks: NetworksConfig,
    /// The configuration's `[power]` (set by the daemon).
    #[serde(skip)]
    pub power: PowerConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Placeable vCPUs per core and memory per MiB, for nodes enrolled without their own ratios.
    pub overcommit_cpu: f64,
    pub overcommit_memory: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Roles by client certificate CN: name = "admin" | "operator" | "viewer". Checked before the OU.
    pub users: BTreeMap<String, String>,
    /// Take the role from the certificate's OU when it is admin, operator or viewer (`gridctl pki issue
    /// --role`).
    pub role_from_ou: bool,
    /// Role of a certificate that neither names; "" refuses it.
    pub default_role: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:7444".parse().expect("address"),
            state_dir: "/var/lib/gridforge-coordinator".into(),
            tls: default_tls(),
            agents: AgentsConfig::default(),
            poller: PollerConfig::default(),
            ops: OpsConfig::default(),
            scheduler: SchedulerConfig::default(),
            auth: AuthConfig::default(),
            fencing: FencingConfig::default(),
            store: StoreConfig::default(),
            networks: NetworksConfig::default(),
            power: PowerConfig::default(),
            http: HttpConfig::default(),
        }
    }
}

impl Default for AgentsConfig {
    fn default() -> Self {
        AgentsConfig { ca: None, cert: None, key: None, call_timeout_secs: 30 }
    }
}

impl Default for PollerConfig {
    fn default() -> Self {
        PollerConfig {
            interval_ms: 5000,
            concurrency: 64,
            unreachable_after: 3,
            sample_ms: 200,
            lost_after_secs: 120,
        }
    }
}

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig {
            retry_attempts: 5,
            retry_backoff_ms: 1000,
            max_disk_jobs_per_node: 2,
            dispatch_wait_ms: 250,
            keep_finished_hours: 168,
            networks: NetworksConfig::default(),
            power: PowerConfig::default(),
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig { overcommit_cpu: 4.0, overcommit_memory: 1.0 }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { users: BTreeMap::new(), role_from_ou: true, default_role: String::new() }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        gridforge_common::config::load(path, Config::parse)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::invalid(path, field, reason);
        let mut config: Config = gridforge_common::config::parse_toml(text, path)?;
        if config.tls.insecure && !config.listen.ip().is_loopback() {
            return Err(invalid(
                "tls.insecure",
                format!(
                    "serves plaintext without authentication and is allowed only on a loopback listen \
                     address, not {}",
                    config.listen
                ),
            ));
        }
        for (name, role) in &config.auth.users {
            if role.parse::<crate::auth::Role>().is_err() {
                return Err(invalid(
                    &format!("auth.users.{name}"),
                    format!("{role:?} is not admin, operator or viewer"),
                ));
            }
        }
        if !config.auth.default_role.is_empty()
            && config.auth.default_role.parse::<crate::auth::Role>().is_err()
        {
            return Err(invalid(
                "auth.default_role",
                format!("{:?} is not admin, operator or viewer", config.auth.default_role),
            ));
        }
        match config.store.backend.as_str() {
            "embedded" => {}
            "etcd" => {
                let etcd = &config.store.etcd;
                if etcd.endpoints.is_empty() {
                    return Err(invalid("store.etcd.endpoints", "at least one etcd client URL".into()));
                }
                if !etcd.prefix.starts_with('/') || etcd.prefix.len() < 2 {
                    return Err(invalid(
                        "store.etcd.prefix",
                        format!("{:?} must start with / and name something", etcd.prefix),
                    ));
                }
                if !(2..=3600).contains(&etcd.lease_ttl_secs) {
                    return Err(invalid("store.etcd.lease_ttl_secs", "must be 2-3600".into()));
                }
                if etcd.max_txn_ops < 8 {
                    return Err(invalid("store.etcd.max_txn_ops", "must be at least 8".into()));
                }
            }
            other => {
                return Err(invalid("store.backend", format!("{other:?} is not \"embedded\" or \"etcd\"")));
            }
        }
        match config.fencing.actuator.as_str() {
            "manual" => {}
            "command" if !config.fencing.command.is_empty() => {}
            "command" => {
                return Err(invalid("fencing.command", "required with actuator = \"command\"".into()));
            }
            "libvirt" if !config.fencing.libvirt_uri.is_empty() => {}
            "libvirt" => {
                return Err(invalid("fencing.libvirt_uri", "required with actuator = \"libvirt\"".into()));
            }
            other => {
                return Err(invalid(
                    "fencing.actuator",
                    format!("{other:?} is not \"manual\", \"command\" or \"libvirt\""),
                ));
            }
        }
        if config.poller.interval_ms == 0
            || config.poller.concurrency == 0
            || config.ops.max_disk_jobs_per_node == 0
        {
            return Err(invalid(
                "poller.interval_ms, poller.concurrency and ops.max_disk_jobs_per_node",
                "must be at least 1".into(),
            ));
        }
        let n = &config.networks;
        if n.vlan_first == 0 || n.vlan_first > n.vlan_last || n.vlan_last > 4094 || n.bridge.is_empty() {
            return Err(invalid(
                "networks",
                format!(
                    "vlan_first {} to vlan_last {} must be a range within 1-4094, and bridge set",
                    n.vlan_first, n.vlan_last
                ),
            ));
        }
        let h = &config.http;
        if !(0.0 < h.amber_percent && h.amber_percent <= h.red_percent) {
            return Err(invalid(
                "http",
                format!(
                    "amber_percent {} must be above 0 and at most red_percent {}",
                    h.amber_percent, h.red_percent
                ),
            ));
        }
        let scales = [h.disk_meter_mib_per_s, h.network_meter_mib_per_s];
        if !scales.iter().all(|v| v.is_finite() && *v > 0.0) {
            return Err(invalid(
                "http",
                format!(
                    "disk_meter_mib_per_s {} and network_meter_mib_per_s {} must be above 0",
                    h.disk_meter_mib_per_s, h.network_meter_mib_per_s
                ),
            ));
        }
        if config.tls.insecure && h.listen.is_some_and(|l| !l.ip().is_loopback()) {
            return Err(invalid("http.listen", "tls.insecure allows only a loopback address".into()));
        }
        config.ops.networks = config.networks.clone();
        config.ops.power = config.power.clone();
        Ok(config)
    }

    pub fn store_path(&self) -> PathBuf {
        self.state_dir.join("grid.redb")
    }

    /// Where the grid view is kept, for messages.
    pub fn store_description(&self) -> String {
        if self.store.backend == "etcd" {
            format!("etcd {} under {}", self.store.etcd.endpoints.join(","), self.store.etcd.prefix)
        } else {
            self.store_path().display().to_string()
        }
    }

    /// This coordinator's name among the members: `store.etcd.name`, else the host name.
    pub fn member_name(&self) -> String {
        if self.store.etcd.name.is_empty() { host_name() } else { self.store.etcd.name.clone() }
    }

    /// The address gridctl reaches this coordinator at: `store.etcd.advertise`, else `listen` (with the
    /// host name for an unspecified address).
    pub fn advertise_address(&self) -> String {
        if !self.store.etcd.advertise.is_empty() {
            self.store.etcd.advertise.clone()
        } else if self.listen.ip().is_unspecified() {
            format!("{}:{}", host_name(), self.listen.port())
        } else {
            self.listen.to_string()
        }
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poller.interval_ms)
    }

    /// The client side of mutual TLS towards agents.
    pub fn agent_tls(&self) -> gridforge_common::client::ClientTls {
        gridforge_common::client::ClientTls {
            ca: self.agents.ca.clone().unwrap_or_else(|| self.tls.ca.clone()),
            cert: self.agents.cert.clone().unwrap_or_else(|| self.tls.cert.clone()),
            key: self.agents.key.clone().unwrap_or_else(|| self.tls.key.clone()),
            domain: None,
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "coordinator".into())
}

/// `/etc/gridforge/tls/ca.pem`, `coordinator.pem` and `coordinator.key`.
fn default_tls() -> TlsFiles {
    TlsFiles::in_dir(Path::new("/etc/gridforge/tls"), "coordinator")
}

/// The `[tls]` table over the coordinator's defaults.
fn tls_files<'de, D: serde::Deserializer<'de>>(d: D) -> Result<TlsFiles, D::Error> {
    TlsFiles::deserialize_or(d, default_tls())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_refusals() {
        let c = Config::parse("", Path::new("c.toml")).unwrap();
        assert_eq!(c.poller.interval_ms, 5000);
        assert_eq!(c.listen.port(), 7444);
        assert!(Config::parse("bogus = 1", Path::new("c.toml")).is_err());
        assert!(Config::parse("[tls]\ninsecure = true", Path::new("c.toml")).is_err());
        assert!(
            Config::parse("listen = \"127.0.0.1:1\"\n[tls]\ninsecure = true", Path::new("c.toml")).is_ok()
        );
        assert!(Config::parse("[auth.users]\nalice = \"root\"", Path::new("c.toml")).is_err());
    }

    #[test]
    fn the_http_section() {
        let p = Path::new("c.toml");
        let c = Config::parse("", p).unwrap();
        assert_eq!((c.http.listen, c.http.amber_percent, c.http.red_percent), (None, 70.0, 90.0));
        let c = Config::parse("[http]\nlisten = \"0.0.0.0:7445\"\nred_percent = 95.0", p).unwrap();
        assert_eq!(c.http.listen.map(|l| l.port()), Some(7445));
        assert_eq!((c.http.disk_meter_mib_per_s, c.http.network_meter_mib_per_s), (200.0, 119.0));
        let c =
            Config::parse("[http]\ndisk_meter_mib_per_s = 0.5\nnetwork_meter_mib_per_s = 1250.0", p).unwrap();
        assert_eq!((c.http.disk_meter_mib_per_s, c.http.network_meter_mib_per_s), (0.5, 1250.0));
        let e = Config::parse("[http]\nnetwork_meter_mib_per_s = 0.0", p).unwrap_err();
        assert!(e.to_string().contains("network_meter_mib_per_s 0 must be above 0"), "{e}");
        let e = Config::parse("[http]\namber_percent = 95.0\nred_percent = 90.0", p).unwrap_err();
        assert!(e.to_string().contains("amber_percent 95 must be above 0 and at most red_percent 90"), "{e}");
        let plain = "listen = \"127.0.0.1:1\"\n[tls]\ninsecure = true\n[http]\nlisten = ";
        assert!(Config::parse(&format!("{plain}\"127.0.0.1:2\""), p).is_ok());
        let e = Config::parse(&format!("{plain}\"0.0.0.0:2\""), p).unwrap_err();
        assert!(e.to_string().contains("http.listen: tls.insecure allows only a loopback address"), "{e}");
    }
}
