//! How gridctl shows things: kubectl-like tables (`-o wide` adds columns), proto3 JSON with `-o json`,
//! progress bars on a terminal while following an operation, plain lines otherwise.

use std::io::IsTerminal;
use std::time::SystemTime;

use clap::ValueEnum;
use gridforge_common::pki::Issued;
use gridforge_proto::v1::{
    CoordinatorStatusResponse, CreateTokenResponse, Decision, Explanation, Group, GroupStatus,
    ListUsersResponse, Node, Operation, OperationEvent, RemoveNodeResponse, RemoveUserResponse, Tenant,
    TenantNetwork, Vm, drift,
};
use indicatif::ProgressBar;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Wide,
    Json,
}

pub struct Output {
    format: Format,
}

/// A table printed with aligned columns.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: &[&str]) -> Table {
        Table { rows: vec![head.iter().map(|s| s.to_string()).collect()] }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn print(&self) {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|i| self.rows.iter().filter_map(|r| r.get(i)).map(|c| c.chars().count()).max().unwrap_or(0))
            .collect();
        for r in &self.rows {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i + 1 == r.len() {
                    line.push_str(c);
                } else {
                    line.push_str(&format!("{c:<w$}   ", w = widths[i]));
                }
            }
            println!("{}", line.trim_end());
        }
    }
}

fn json<T: Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("messages serialize"));
}

/// "3m", "2h", "5d" since a timestamp.
fn age(t: Option<&pbjson_types::Timestamp>) -> String {
    let Some(t) = t else { return "-".into() };
    let now =
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let s = (now - t.seconds).max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn enum_word(name: &str) -> String {
    // READY -> Ready, NOT_READY -> NotReady, as kubectl shows states.
    name.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_string() + &c.as_str().to_ascii_lowercase()).unwrap_or_default()
        })
        .collect()
}

fn node_status(n: &Node) -> String {
    let mut s = enum_word(n.state().as_str_name());
    if n.cordoned {
        // Cordoned with nothing left on it: what a drain leaves.
        s.push_str(if n.vms.is_empty() { ",Drained" } else { ",Cordoned" });
    }
    if n.fenced {
        s.push_str(",Fenced");
    }
    s
}

fn mib(m: u64) -> String {
    if m >= 1024 && m.is_multiple_of(1024) { format!("{}Gi", m / 1024) } else { format!("{m}Mi") }
}

impl Output {
    pub fn new(format: Format) -> Output {
        Output { format }
    }

    fn wide(&self) -> bool {
        self.format == Format::Wide
    }

    pub fn nodes(&self, nodes: &[Node]) {
        if self.format == Format::Json {
            return json(&nodes);
        }
        let mut head = vec![
            "NAME",
            "STATUS",
            "DATACENTER",
            "HYPERVISOR",
            "VMS",
            "CPU(ALLOC/CAP)",
            "MEMORY(ALLOC/CAP)",
            "DRIFT",
            "AGE",
        ];
        if self.wide() {
            head.extend(["ADDRESS", "ARCH", "DISK(ALLOC/CAP)", "LOAD", "LABELS", "REASON"]);
        }
        let mut t = Table::new(&head);
        for n in nodes {
            let (a, c) = (n.allocated.unwrap_or_default(), n.capacity.unwrap_or_default());
            let mut row = vec![
                n.name.clone(),
                node_status(n),
                n.datacenter.clone(),
                if n.hypervisors.is_empty() { "-".into() } else { n.hypervisors.join(",") },
                n.vms.len().to_string(),
                format!("{}/{}", a.vcpus, c.vcpus),
                format!("{}/{}", mib(a.memory_mib), mib(c.memory_mib)),
                n.drift.len().to_string(),
                age(n.created.as_ref()),
            ];
            if self.wide() {
                let mut labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort();
                row.extend([
                    n.address.clone(),
                    n.arch.clone(),
                    format!("{}/{}", mib(a.disk_mib), mib(c.disk_mib)),
                    format!("{:.0}%", n.cpu_load * 100.0),
                    if labels.is_empty() { "-".into() } else { labels.join(",") },
                    n.state_reason.clone(),
                ]);
            }
            t.row(row);
        }
        t.print();
    }

    pub fn node(&self, n: &Node) {
        if self.format == Format::Json {
            return json(n);
        }
        let (a, c) = (n.allocated.unwrap_or_default(), n.capacity.unwrap_or_default());
        println!("Name:         {}", n.name);
        println!("Address:      {}", n.address);
        println!("Datacenter:   {}", n.datacenter);
        if n.dedicated {
            println!("Dedicated:    a bare-metal server, whole disk {}", n.disk);
        }
        println!(
            "Status:       {}{}",
            node_status(n),
            if n.state_reason.is_empty() { String::new() } else { format!(" ({})", n.state_reason) }
        );
        let mut labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        println!("Labels:       {}", if labels.is_empty() { "-".into() } else { labels.join(", ") });
        println!(
            "Hypervisors:  {}   Arch: {}   Agent: {}",
            n.hypervisors.join(", "),
            n.arch,
            n.agent_version
        );
        println!("Capacity:     {} vCPUs, {} memory, {} pool", c.vcpus, mib(c.memory_mib), mib(c.disk_mib));
        println!("Allocated:    {} vCPUs, {} memory, {} disk", a.vcpus, mib(a.memory_mib), mib(a.disk_mib));
        println!("Overcommit:   cpu {}, memory {}", ratio(n.overcommit_cpu), ratio(n.overcommit_memory));
        println!(
            "Usage:        cpu {:.0}%, memory used {}, pool free {}   (last seen {} ago, {} missed polls)",
            n.cpu_load * 100.0,
            mib(n.memory_used_bytes >> 20),
            mib(n.pool_free_bytes >> 20),
            age(n.last_seen.as_ref()),
            n.missed_polls
        );
        println!("VMs:          {}", if n.vms.is_empty() { "-".into() } else { n.vms.join(", ") });
        let images: Vec<String> = n
            .images
            .iter()
            .map(|i| if n.cached_images.contains(i) { format!("{i} (cached)") } else { i.clone() })
            .collect();
        println!("Images:       {}", if images.is_empty() { "-".into() } else { images.join(", ") });
        for b in &n.bases {
            println!(
                "Base:         {} ({}, {} MiB allocated, {} clone(s))",
                b.id,
                b.images.join(" + "),
                b.allocated_bytes >> 20,
                b.clones.len()
            );
        }
        if !n.licenses.is_empty() {
            println!("Licenses:     {}", n.licenses.join(", "));
        }
        if !n.drift.is_empty() {
            println!("Drift:");
            for d in &n.drift {
                let kind =
                    drift::Kind::try_from(d.kind).map(|k| enum_word(k.as_str_name())).unwrap_or_default();
                println!("  {kind:<14} {:<20} {}", d.vm, d.detail);
            }
        }
        if !n.checks.is_empty() {
            println!("Checks:");
            for ch in &n.checks {
                println!("  {:<5} {:<14} {}", ch.status().as_str_name(), ch.name, ch.reason);
            }
        }
    }

    pub fn removed(&self, r: &RemoveNodeResponse) {
        if self.format == Format::Json {
            return json(r);
        }
        let name = r.node.as_ref().map(|n| n.name.as_str()).unwrap_or("");
        println!("node {name} removed");
        if !r.orphaned_vms.is_empty() {
            println!("forgotten VMs (still on the node): {}", r.orphaned_vms.join(", "));
        }
    }

    pub fn users(&self, r: &ListUsersResponse) {
        if self.format == Format::Json {
            return json(r);
        }
        let mut t = Table::new(&["NAME", "ROLE", "TENANT", "FROM", "BY", "AGE"]);
        for u in &r.users {
            t.row(vec![
                u.name.clone(),
                u.role.clone(),
                if u.tenant.is_empty() { "*".into() } else { u.tenant.clone() },
                "grid".into(),
                u.added_by.clone(),
                age(u.updated.as_ref()),
            ]);
        }
        let mut configured: Vec<_> =
            r.configured.iter().filter(|(k, _)| !r.users.iter().any(|u| &u.name == *k)).collect();
        configured.sort();
        for (name, role) in configured {
            t.row(vec![
                name.clone(),
                role.clone(),
                "*".into(),
                "config".into(),
                String::new(),
                String::new(),
            ]);
        }
        t.print();
    }

    pub fn coordinator_status(&self, r: &CoordinatorStatusResponse) {
        if self.format == Format::Json {
            return json(r);
        }
        let leader = if r.leader.is_empty() {
            "none elected".to_string()
        } else {
            format!("{} at {}", r.leader, r.leader_address)
        };
        println!("store:    {}", r.store);
        println!("member:   {} (this answer)", r.member);
        println!("leader:   {leader}, term {}", r.term);
        println!("revision: store {}, applied {}, lag {}", r.store_revision, r.applied_revision, r.lag);
        if r.stale {
            println!("STALE:    {}", r.stale_reason);
        }
        let mut t = Table::new(&["MEMBER", "ADDRESS", "ROLE"]);
        for m in &r.members {
            t.row(vec![
                m.name.clone(),
                m.address.clone(),
                if m.leader { "leader" } else { "follower" }.into(),
            ]);
        }
        t.print();
    }

    pub fn token(&self, r: &CreateTokenResponse) {
        if self.format == Format::Json {
            return json(r);
        }
        let name = r.user.as_ref().map(|u| u.name.as_str()).unwrap_or("");
        eprintln!("{name}: keep this token now; only its hash is stored");
        println!("{}", r.token);
    }

    pub fn user_removed(&self, r: &RemoveUserResponse) {
        if self.format == Format::Json {
            return json(r);
        }
        let name = r.removed.as_ref().map(|u| u.name.as_str()).unwrap_or("");
        println!("user {name} removed");
    }

    pub fn vms(&self, vms: &[Vm]) {
        if self.format == Format::Json {
            return json(&vms);
        }
        let mut head = vec!["NAME", "STATUS", "NODE", "VCPUS", "MEMORY", "DISK", "OBSERVED", "DRIFT", "AGE"];
        if self.wide() {
            head.extend(["IMAGE", "OPERATION", "TENANT/GROUP", "CPU", "ERROR"]);
        }
        let mut t = Table::new(&head);
        for v in vms {
            let r = v.resources.unwrap_or_default();
            let mut row = vec![
                v.name.clone(),
                enum_word(v.state().as_str_name()),
                v.node.clone(),
                r.vcpus.to_string(),
                mib(r.memory_mib),
                mib(r.disk_mib),
                if v.observed_state.is_empty() { "-".into() } else { v.observed_state.clone() },
                if v.drift.is_empty() { "-".into() } else { v.drift.clone() },
                age(v.created.as_ref()),
            ];
            if self.wide() {
                let image = v
                    .spec
                    .as_ref()
                    .and_then(|s| s.image.as_ref())
                    .map(|i| format!("{}:{}", i.name, i.version));
                row.extend([
                    image.unwrap_or_default(),
                    if v.operation.is_empty() { "-".into() } else { v.operation.clone() },
                    tenant_group(v),
                    v.usage.map_or("-".into(), |u| format!("{:.0}%", u.avg_cpu_percent)),
                    v.error.clone(),
                ]);
            }
            t.row(row);
        }
        t.print();
    }

    pub fn vm(&self, v: &Vm) {
        if self.format == Format::Json {
            return json(v);
        }
        let r = v.resources.unwrap_or_default();
        println!("Name:        {}", v.name);
        println!(
            "Status:      {} (desired {}, observed {})",
            enum_word(v.state().as_str_name()),
            v.desired_state,
            if v.observed_state.is_empty() { "-" } else { &v.observed_state }
        );
        println!("Node:        {}", v.node);
        if !v.tenant.is_empty() {
            println!("Tenant:      {}", tenant_group(v));
        }
        if let Some(u) = v.usage {
            println!(
                "Usage:       CPU {:.1}% (avg {:.1}%), memory {:.1}% (avg {:.1}%), {} samples",
                u.cpu_percent, u.avg_cpu_percent, u.memory_percent, u.avg_memory_percent, u.samples
            );
            println!(
                "I/O:         disk {}/s, network {}/s",
                indicatif::HumanBytes(u.disk_bytes_per_sec as u64),
                indicatif::HumanBytes(u.network_bytes_per_sec as u64)
            );
        }
        if let Some(p) = &v.scaling {
            println!("Scaling:     {}", policy(p, v.last_scaled.as_ref()));
        }
        println!("Volume:      {}", v.volume);
        println!("Resources:   {} vCPUs, {} memory, {} disk", r.vcpus, mib(r.memory_mib), mib(r.disk_mib));
        if let Some(i) = v.spec.as_ref().and_then(|s| s.image.as_ref()) {
            println!("Image:       {}:{}", i.name, i.version);
        }
        if let Some(p) = &v.placement {
            let mut parts = Vec::new();
            for (k, val) in [
                ("datacenter", &p.datacenter),
                ("node", &p.node),
                ("spread", &p.spread_group),
                ("workload", &p.workload),
                ("hypervisor", &p.hypervisor),
            ] {
                if !val.is_empty() {
                    parts.push(format!("{k}={val}"));
                }
            }
            parts.extend(p.node_selector.iter().map(|(k, val)| format!("label {k}={val}")));
            println!("Placement:   {}", if parts.is_empty() { "-".into() } else { parts.join(", ") });
        }
        println!("Operation:   {}", if v.operation.is_empty() { "-" } else { &v.operation });
        if !v.drift.is_empty() {
            println!("Drift:       {}", v.drift);
        }
        if !v.error.is_empty() {
            println!("Error:       {}", v.error);
        }
        if let Some(p) = &v.provision {
            println!("Disk:        {} ({} bytes, GUID {})", p.disk_path, p.disk_size_bytes, p.disk_guid);
        }
        println!("Created:     {} ago", age(v.created.as_ref()));
        if !v.wipe_report.is_empty() {
            println!("Wipe report (verify with `gridforge-agent report verify`):");
            println!("{}", v.wipe_report.trim_end());
        }
    }

    pub fn is_json(&self) -> bool {
        self.format == Format::Json
    }

    pub fn tenants(&self, tenants: &[Tenant]) {
        if self.format == Format::Json {
            return json(&tenants);
        }
        let mut t = Table::new(&["NAME", "VMS", "VCPUS", "MEMORY", "DISK", "GROUPS", "AGE"]);
        for x in tenants {
            let (u, q) = (x.used.unwrap_or_default(), x.quota.unwrap_or_default());
            let of = |used: String, limit: u64, unit: fn(u64) -> String| {
                if limit == 0 { used } else { format!("{used}/{}", unit(limit)) }
            };
            t.row(vec![
                x.name.clone(),
                of(x.vms.to_string(), q.vms.into(), |n| n.to_string()),
                of(u.vcpus.to_string(), q.vcpus.into(), |n| n.to_string()),
                of(mib(u.memory_mib), q.memory_mib, mib),
                of(mib(u.disk_mib), q.disk_mib, mib),
                x.groups.iter().map(|g| g.name.as_str()).collect::<Vec<_>>().join(","),
                age(x.created.as_ref()),
            ]);
        }
        t.print();
    }

    pub fn networks(&self, ns: &[TenantNetwork]) {
        if self.format == Format::Json {
            return json(&ns);
        }
        let mut t = Table::new(&["NETWORK", "VLAN", "UPLINK TRANSLATIONS", "VMS", "AGE"]);
        for n in ns {
            let mut tr: Vec<String> = n.uplink_vlans.iter().map(|(node, v)| format!("{node}:{v}")).collect();
            tr.sort();
            t.row(vec![
                format!("{}/{}", n.tenant, n.name),
                n.vlan_id.to_string(),
                if tr.is_empty() { "-".into() } else { tr.join(",") },
                if n.vms.is_empty() { "-".into() } else { n.vms.join(",") },
                age(n.created.as_ref()),
            ]);
        }
        t.print();
    }

    pub fn group(&self, g: &Group) {
        if self.format == Format::Json {
            return json(g);
        }
        println!("group {}/{} stored", g.tenant, g.name);
    }

    pub fn group_status(&self, st: &GroupStatus) {
        if self.format == Format::Json {
            return json(st);
        }
        let g = st.group.clone().unwrap_or_default();
        let (sl, p) = (g.service_level.unwrap_or_default(), g.scaling.unwrap_or_default());
        println!("Group:         {}/{}", g.tenant, g.name);
        println!(
            "Service level: {} (priority {}, min {} members{}{})",
            if st.meets_service_level { "met" } else { "MISSED" },
            sl.priority,
            sl.min_members,
            if sl.max_members > 0 { format!(", max {}", sl.max_members) } else { String::new() },
            if sl.max_avg_cpu_percent > 0.0 {
                format!(", average CPU at most {:.0}%", sl.max_avg_cpu_percent)
            } else {
                String::new()
            }
        );
        println!("               {}", st.service_level_reason);
        println!(
            "Load:          {} running, average CPU {:.1}%, memory {:.1}% over {} s",
            st.running, st.avg_cpu_percent, st.avg_memory_percent, p.window_secs
        );
        println!("Scaling:       {}", policy(&p, g.last_scaled.as_ref()));
        self.vms(&st.members);
    }

    pub fn decisions(&self, ds: &[Decision]) {
        if self.format == Format::Json {
            return json(&ds);
        }
        let mut t = Table::new(&["AGE", "ACTION", "GROUP", "VM", "OPERATION", "REASON"]);
        for d in ds {
            let mut reason = d.reason.clone();
            if !d.error.is_empty() {
                reason = format!("{reason} -- FAILED: {}", d.error);
            }
            t.row(vec![
                age(d.time.as_ref()),
                enum_word(d.action().as_str_name()),
                format!("{}/{}", d.tenant, d.group),
                if d.vm.is_empty() { "-".into() } else { d.vm.clone() },
                if d.operation.is_empty() { "-".into() } else { d.operation.clone() },
                reason,
            ]);
        }
        t.print();
    }

    pub fn explanation(&self, e: &Explanation) {
        if self.format == Format::Json {
            return json(e);
        }
        println!("{}", e.summary);
        let mut t = Table::new(&["NODE", "FEASIBLE", "SCORE", "REASON"]);
        let mut nodes = e.nodes.clone();
        nodes.sort_by(|a, b| b.feasible.cmp(&a.feasible).then(b.score.total_cmp(&a.score)));
        for n in &nodes {
            let mark = if n.node == e.chosen { format!("{} *", n.node) } else { n.node.clone() };
            t.row(vec![
                mark,
                if n.feasible { "yes".into() } else { "no".into() },
                if n.feasible { format!("{:.4}", n.score) } else { "-".into() },
                if n.reason.is_empty() { "-".into() } else { n.reason.clone() },
            ]);
        }
        t.print();
    }

    pub fn operations(&self, ops: &[Operation]) {
        if self.format == Format::Json {
            return json(&ops);
        }
        let mut head = vec!["ID", "KIND", "VM", "NODE", "STATE", "STEP", "AGE"];
        if self.wide() {
            head.extend(["BY", "AGENT JOB", "MESSAGE"]);
        }
        let mut t = Table::new(&head);
        for o in ops {
            let step = o
                .steps
                .iter()
                .find(|s| s.state() != gridforge_proto::v1::operation::State::Succeeded)
                .or(o.steps.last());
            let mut row = vec![
                o.id.clone(),
                enum_word(o.kind().as_str_name()),
                o.vm.clone(),
                o.node.clone(),
                enum_word(o.state().as_str_name()),
                step.map(|s| progress_text(s.name.as_str(), s.bytes_done, s.bytes_total)).unwrap_or_default(),
                age(o.created.as_ref()),
            ];
            if self.wide() {
                let msg = if !o.error.is_empty() {
                    o.error.clone()
                } else if !o.result.is_empty() {
                    o.result.clone()
                } else {
                    step.map(|s| s.message.clone()).unwrap_or_default()
                };
                row.extend([
                    o.requested_by.clone(),
                    step.map(|s| s.agent_job_id.clone()).unwrap_or_default(),
                    msg,
                ]);
            }
            t.row(row);
        }
        t.print();
    }

    pub fn operation(&self, o: &Operation) {
        if self.format == Format::Json {
            return json(o);
        }
        println!("ID:          {}", o.id);
        println!("Summary:     {}", o.summary);
        println!("State:       {}", enum_word(o.state().as_str_name()));
        println!("Requested:   by {} {} ago", o.requested_by, age(o.created.as_ref()));
        if !o.result.is_empty() {
            println!("Result:      {}", o.result);
        }
        if !o.error.is_empty() {
            println!("Error:       {}", o.error);
        }
        println!("Steps:");
        for s in &o.steps {
            println!(
                "  {:<10} {:<10} node {}  job {}  key {}  {}",
                s.name,
                enum_word(s.state().as_str_name()),
                s.node,
                if s.agent_job_id.is_empty() { "-" } else { &s.agent_job_id },
                s.idempotency_key,
                s.message
            );
        }
    }

    pub fn operation_done(&self, o: &Operation) {
        match self.format {
            Format::Json => json(o),
            _ => {
                let what = if o.error.is_empty() { o.result.clone() } else { o.error.clone() };
                println!(
                    "{} {}: {} {}",
                    o.id,
                    o.summary,
                    enum_word(o.state().as_str_name()).to_lowercase(),
                    what
                );
            }
        }
    }

    pub fn issued(&self, i: &Issued) {
        if self.format == Format::Json {
            return json(&serde_json::json!({"cert": i.cert, "key": i.key}));
        }
        println!("certificate: {}", i.cert.display());
        println!("key:         {} (mode 0600)", i.key.display());
    }

    /// A renderer of an operation's events for this output.
    pub fn progress(&self) -> Progress {
        Progress {
            json: self.format == Format::Json,
            tty: std::io::stderr().is_terminal(),
            bar: None,
            step: String::new(),
        }
    }
}

fn ratio(r: f64) -> String {
    if r > 0.0 { format!("{r}") } else { "default".into() }
}

fn progress_text(step: &str, done: u64, total: u64) -> String {
    match (done * 100).checked_div(total) {
        Some(pct) => format!("{step} {pct}%"),
        None => step.to_string(),
    }
}

/// Operation events as a progress bar per agent step (terminal), plain lines (logs) or JSON lines.
pub struct Progress {
    json: bool,
    tty: bool,
    bar: Option<ProgressBar>,
    step: String,
}

impl Progress {
    pub fn event(&mut self, ev: &OperationEvent) {
        if self.json {
            println!("{}", serde_json::to_string(ev).expect("events serialize"));
            return;
        }
        let byte_progress = ev.message.is_empty() && ev.snapshot.is_none() && !ev.agent_step.is_empty();
        if byte_progress && self.tty {
            if self.bar.is_none() || self.step != ev.agent_step {
                self.finish();
                self.bar = Some(gridforge_common::progress::byte_bar(ev.bytes_total, ev.agent_step.clone()));
                self.step = ev.agent_step.clone();
            }
            if let Some(b) = &self.bar {
                b.set_position(ev.bytes_done);
            }
            return;
        }
        if byte_progress {
            // Plain output: byte progress only at the end of a step, so logs stay short.
            if ev.bytes_total > 0 && ev.bytes_done >= ev.bytes_total {
                eprintln!("{:>9}  {} bytes", ev.agent_step, ev.bytes_done);
            }
            return;
        }
        if ev.snapshot.is_some() && ev.step.is_empty() {
            // The first event: the operation as it stands.
            eprintln!("{}  {}", ev.operation, ev.message);
            return;
        }
        if ev.snapshot.is_some() {
            return; // the last event: the caller prints the outcome
        }
        self.finish();
        let step = if ev.agent_step.is_empty() { &ev.step } else { &ev.agent_step };
        eprintln!("{step:>9}  {}", ev.message);
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

/// "tenant/group", "tenant" or "-".
fn tenant_group(v: &Vm) -> String {
    match (v.tenant.is_empty(), v.group.is_empty()) {
        (true, _) => "-".into(),
        (false, true) => v.tenant.clone(),
        (false, false) => format!("{}/{}", v.tenant, v.group),
    }
}

/// A scaling policy in one line: its kinds, thresholds, cooldown and last step.
fn policy(p: &gridforge_proto::v1::ScalingPolicy, last_scaled: Option<&pbjson_types::Timestamp>) -> String {
    let mut kinds = Vec::new();
    if p.horizontal {
        kinds.push("horizontal");
    }
    if p.vertical {
        kinds.push("vertical");
    }
    format!(
        "{} (CPU up {:.0}% / down {:.0}%, vCPUs {}-{}, cooldown {} s, last step {})",
        if kinds.is_empty() { "off".into() } else { kinds.join(" + ") },
        p.cpu_up_percent,
        p.cpu_down_percent,
        p.min_vcpus.max(1),
        if p.max_vcpus == 0 { "any".to_string() } else { p.max_vcpus.to_string() },
        p.cooldown_secs,
        last_scaled.map_or("never".into(), |t| format!("{} ago", age(Some(t))))
    )
}
