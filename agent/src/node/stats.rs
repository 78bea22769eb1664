//! Node and VM usage: counters from `/proc` and the hypervisor read twice, `sample` apart, turned into rates.
//! Units follow the contract: bytes, bytes per second, operations per second, fractions 0..1, cores.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use gridforge_common::error_chain;
use gridforge_proto::v1::{DiskStats, FsStats, MemoryStats, NetStats, NodeStatsReport, VmStats};

use super::{NodeContext, timestamp};
use crate::hypervisor::{DomainState, DomainStats};

/// /proc/diskstats counts sectors of 512 bytes whatever the device's sector size.
const DISKSTATS_SECTOR: u64 = 512;

/// Node and VM usage sampled over `sample`.
pub fn sample(ctx: &NodeContext, sample: Duration) -> NodeStatsReport {
    let before = Counters::read(ctx);
    std::thread::sleep(sample);
    let after = Counters::read(ctx);
    // The reads themselves take time: rates use the time between the two readings.
    let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-3);

    let memory = match read_meminfo() {
        Ok(m) => Some(m.stats()),
        Err(e) => {
            tracing::warn!("node stats: cannot read /proc/meminfo: {e}");
            None
        }
    };
    NodeStatsReport {
        time: Some(timestamp(SystemTime::now())),
        sample_ms: u32::try_from(sample.as_millis()).unwrap_or(u32::MAX),
        cpu_busy: cpu_busy(&before.cpus, &after.cpus),
        memory,
        disks: disk_rates(&before.disks, &after.disks, secs),
        filesystems: filesystems(ctx),
        network: net_rates(&before.net, &after.net, secs),
        vms: vm_rates(&before.vms, &after.vms, secs),
    }
}

/// One reading of every cumulative counter.
struct Counters {
    at: Instant,
    cpus: Vec<CpuTimes>,
    disks: Vec<DiskCounters>,
    net: Vec<NetCounters>,
    vms: Vec<DomainStats>,
}

impl Counters {
    fn read(ctx: &NodeContext) -> Counters {
        let cpus = read_proc("/proc/stat", parse_cpu_times);
        let disks = read_proc("/proc/diskstats", parse_diskstats);
        let net = read_proc("/proc/net/dev", parse_net_dev);
        let vms = match &ctx.hypervisor {
            Some(hv) => hv.stats().unwrap_or_else(|e| {
                tracing::warn!("node stats: no VM stats: {}", error_chain(&e));
                Vec::new()
            }),
            None => Vec::new(),
        };
        Counters { at: Instant::now(), cpus, disks, net, vms }
    }
}

fn read_proc<T>(path: &str, parse: fn(&str) -> Vec<T>) -> Vec<T> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text),
        Err(e) => {
            tracing::warn!("node stats: cannot read {path}: {e}");
            Vec::new()
        }
    }
}

/// Jiffies of one core since boot.
#[derive(Clone, Debug, PartialEq)]
struct CpuTimes {
    cpu: u32,
    idle: u64,
    total: u64,
}

/// The per-core lines (`cpuN`) of /proc/stat; the aggregate `cpu` line is left out.
fn parse_cpu_times(text: &str) -> Vec<CpuTimes> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let cpu = fields.next()?.strip_prefix("cpu")?.parse().ok()?;
            let v: Vec<u64> = fields.map(|f| f.parse().unwrap_or(0)).collect();
            // user nice system idle iowait irq softirq steal (guest time is already counted in user).
            let total = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            Some(CpuTimes { cpu, idle, total })
        })
        .collect()
}

/// Busy fraction of each core, in core order; a core with no ticks in the window counts as idle.
fn cpu_busy(before: &[CpuTimes], after: &[CpuTimes]) -> Vec<f64> {
    after
        .iter()
        .map(|a| {
            let Some(b) = before.iter().find(|b| b.cpu == a.cpu) else { return 0.0 };
            let total = a.total.saturating_sub(b.total);
            let idle = a.idle.saturating_sub(b.idle);
            if total == 0 { 0.0 } else { (total.saturating_sub(idle) as f64 / total as f64).clamp(0.0, 1.0) }
        })
        .collect()
}

/// /proc/meminfo, in bytes.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct MemInfo {
    pub total: u64,
    pub available: u64,
    pub swap_total: u64,
    pub swap_free: u64,
}

impl MemInfo {
    fn stats(&self) -> MemoryStats {
        MemoryStats {
            total_bytes: self.total,
            available_bytes: self.available,
            used_bytes: self.total.saturating_sub(self.available),
            swap_total_bytes: self.swap_total,
            swap_used_bytes: self.swap_total.saturating_sub(self.swap_free),
        }
    }
}

pub(crate) fn read_meminfo() -> std::io::Result<MemInfo> {
    Ok(parse_meminfo(&std::fs::read_to_string("/proc/meminfo")?))
}

fn parse_meminfo(text: &str) -> MemInfo {
    let mut m = MemInfo::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else { continue };
        // Values are in kB (KiB), except the HugePages counts, which are not read here.
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        let slot = match key {
            "MemTotal" => &mut m.total,
            "MemAvailable" => &mut m.available,
            "SwapTotal" => &mut m.swap_total,
            "SwapFree" => &mut m.swap_free,
            _ => continue,
        };
        *slot = kib * 1024;
    }
    m
}

/// Cumulative counters of one whole block device.
#[derive(Clone, Debug, PartialEq)]
struct DiskCounters {
    name: String,
    reads: u64,
    read_sectors: u64,
    writes: u64,
    write_sectors: u64,
    io_ticks_ms: u64,
}

/// Whole devices of /proc/diskstats (partitions have no /sys/block entry). RAM disks and devices that
/// never did any I/O (unattached loop and nbd devices) are left out; a loop device in use is kept.
fn parse_diskstats(text: &str) -> Vec<DiskCounters> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let name = *f.get(2)?;
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let d = DiskCounters {
                name: name.to_string(),
                reads: n(3),
                read_sectors: n(5),
                writes: n(7),
                write_sectors: n(9),
                io_ticks_ms: n(12),
            };
            // sysfs spells a '/' in a device name (cciss/c0d0) as '!'.
            let whole = Path::new("/sys/block").join(name.replace('/', "!")).exists();
            let idle_forever = d.reads == 0 && d.writes == 0;
            (whole && !name.starts_with("ram") && !idle_forever).then_some(d)
        })
        .collect()
}

fn disk_rates(before: &[DiskCounters], after: &[DiskCounters], secs: f64) -> Vec<DiskStats> {
    after
        .iter()
        .filter_map(|a| {
            // A device that appeared during the window has no rate yet.
            let b = before.iter().find(|b| b.name == a.name)?;
            let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
            Some(DiskStats {
                device: a.name.clone(),
                read_bytes_per_sec: rate(b.read_sectors, a.read_sectors) * DISKSTATS_SECTOR as f64,
                write_bytes_per_sec: rate(b.write_sectors, a.write_sectors) * DISKSTATS_SECTOR as f64,
                read_iops: rate(b.reads, a.reads),
                write_iops: rate(b.writes, a.writes),
                utilization: (a.io_ticks_ms.saturating_sub(b.io_ticks_ms) as f64 / 1000.0 / secs)
                    .clamp(0.0, 1.0),
            })
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq)]
struct NetCounters {
    interface: String,
    rx_bytes: u64,
    rx_packets: u64,
    tx_bytes: u64,
    tx_packets: u64,
}

/// Interfaces of /proc/net/dev except loopback.
fn parse_net_dev(text: &str) -> Vec<NetCounters> {
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let name = name.trim();
            let f: Vec<u64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
            // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit: bytes packets.
            (name != "lo" && f.len() >= 10).then(|| NetCounters {
                interface: name.to_string(),
                rx_bytes: f[0],
                rx_packets: f[1],
                tx_bytes: f[8],
                tx_packets: f[9],
            })
        })
        .collect()
}

fn net_rates(before: &[NetCounters], after: &[NetCounters], secs: f64) -> Vec<NetStats> {
    after
        .iter()
        .filter_map(|a| {
            let b = before.iter().find(|b| b.interface == a.interface)?;
            let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
            Some(NetStats {
                interface: a.interface.clone(),
                rx_bytes_per_sec: rate(b.rx_bytes, a.rx_bytes),
                tx_bytes_per_sec: rate(b.tx_bytes, a.tx_bytes),
                rx_packets_per_sec: rate(b.rx_packets, a.rx_packets),
                tx_packets_per_sec: rate(b.tx_packets, a.tx_packets),
            })
        })
        .collect()
}

/// Each VM of the second reading; CPU in cores and disk and network in bytes per second over the window (0
/// for a VM that was not in the first, and disk and network 0 for one that did not run in the first: it had
/// no such counters). A counter lower than before (the domain was restarted in between) counts 0, as the
/// node's own counters do.
fn vm_rates(before: &[DomainStats], after: &[DomainStats], secs: f64) -> Vec<VmStats> {
    let before: HashMap<&str, &DomainStats> = before.iter().map(|d| (d.name.as_str(), d)).collect();
    let has_io_counters =
        |d: &DomainStats| [DomainState::Running, DomainState::Paused].iter().any(|s| s.as_str() == d.state);
    after
        .iter()
        .map(|a| {
            let b = before.get(a.name.as_str());
            let grew = |b: Option<&&DomainStats>, counter: fn(&DomainStats) -> u64| {
                b.map_or(0, |b| counter(a).saturating_sub(counter(b)))
            };
            let cpu_ns = grew(b, |d| d.cpu_time_ns);
            let b = b.filter(|b| has_io_counters(b));
            let disk = grew(b, |d| d.disk_read_bytes) + grew(b, |d| d.disk_write_bytes);
            let net = grew(b, |d| d.net_rx_bytes) + grew(b, |d| d.net_tx_bytes);
            VmStats {
                name: a.name.clone(),
                state: a.state.clone(),
                vcpus: a.vcpus,
                cpu_cores: cpu_ns as f64 / 1e9 / secs,
                disk_bytes_per_sec: disk as f64 / secs,
                net_bytes_per_sec: net as f64 / secs,
                memory_bytes: a.memory_bytes,
                disk_read_bytes: a.disk_read_bytes,
                disk_write_bytes: a.disk_write_bytes,
                net_rx_bytes: a.net_rx_bytes,
                net_tx_bytes: a.net_tx_bytes,
            }
        })
        .collect()
}

/// Size and free space of the file system holding `path` (free as an unprivileged user sees it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Space {
    pub total: u64,
    pub free: u64,
}

pub(crate) fn space(path: &Path) -> nix::Result<Space> {
    let st = nix::sys::statvfs::statvfs(path)?;
    let frag = st.fragment_size() as u64;
    Ok(Space {
        total: (st.blocks() as u64).saturating_mul(frag),
        free: (st.blocks_available() as u64).saturating_mul(frag),
    })
}

/// The directories the agent fills, by role; a directory that does not exist yet is left out.
fn filesystems(ctx: &NodeContext) -> Vec<FsStats> {
    let mut dirs: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(hv) = &ctx.hypervisor {
        match hv.pool() {
            Ok(pool) => dirs.push(("pool", pool.path)),
            Err(e) => tracing::warn!("node stats: no pool: {}", error_chain(&e)),
        }
    }
    dirs.push(("cache", ctx.config.cache_dir.clone()));
    dirs.push(("state", ctx.config.state_dir.clone()));
    dirs.into_iter()
        .filter_map(|(role, path)| {
            let s = space(&path).ok()?;
            Some(FsStats {
                role: role.to_string(),
                path: path.display().to_string(),
                total_bytes: s.total,
                free_bytes: s.free,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lines_give_per_core_busy_fractions() {
        let a = parse_cpu_times(
            "cpu  10 0 10 80 0 0 0 0 0 0\ncpu0 5 0 5 40 0 0 0 0 0 0\ncpu1 5 0 5 40 0 0 0 0 0 0\nintr 1\n",
        );
        let b = parse_cpu_times("cpu0 35 0 35 70 10 0 0 0 0 0\ncpu1 5 0 5 140 0 0 0 0 0 0\n");
        assert_eq!(a.len(), 2);
        assert_eq!(cpu_busy(&a, &b), vec![60.0 / 100.0, 0.0]);
    }

    #[test]
    fn meminfo_is_read_in_bytes() {
        let m = parse_meminfo(
            "MemTotal: 1000 kB\nMemFree: 1 kB\nMemAvailable: 600 kB\nSwapTotal: 10 kB\nSwapFree: 4 kB\n",
        );
        let s = m.stats();
        assert_eq!((s.total_bytes, s.available_bytes, s.used_bytes), (1_024_000, 614_400, 409_600));
        assert_eq!((s.swap_total_bytes, s.swap_used_bytes), (10_240, 6_144));
    }

    #[test]
    fn vm_rates_come_from_counter_deltas() {
        let domain = |name: &str, cpu_s: u64, disk: (u64, u64), net: (u64, u64)| DomainStats {
            name: name.into(),
            state: "running".into(),
            cpu_time_ns: cpu_s * 1_000_000_000,
            disk_read_bytes: disk.0,
            disk_write_bytes: disk.1,
            net_rx_bytes: net.0,
            net_tx_bytes: net.1,
            ..Default::default()
        };
        // Shut off: no disk and network counters (libvirt has them only while the domain runs).
        let off = DomainStats { state: "shutoff".into(), ..domain("d", 40, (0, 0), (0, 0)) };
        let before =
            [domain("a", 10, (1000, 2000), (500, 100)), domain("b", 50, (9000, 9000), (9000, 9000)), off];
        let after = [
            domain("a", 12, (3000, 6000), (1500, 300)),
            // Restarted between the readings: its counters began again.
            domain("b", 1, (100, 0), (10, 0)),
            // Not in the first reading.
            domain("c", 99, (7000, 7000), (7000, 7000)),
            // Started between the readings: what its counters say is not traffic of the window.
            domain("d", 41, (7000, 7000), (7000, 7000)),
        ];
        let v = vm_rates(&before, &after, 2.0);
        let rates: Vec<(&str, f64, f64, f64)> = v
            .iter()
            .map(|s| (s.name.as_str(), s.cpu_cores, s.disk_bytes_per_sec, s.net_bytes_per_sec))
            .collect();
        let want =
            [("a", 1.0, 3000.0, 600.0), ("b", 0.0, 0.0, 0.0), ("c", 0.0, 0.0, 0.0), ("d", 0.5, 0.0, 0.0)];
        assert_eq!(rates, want);
        // The cumulative counters go on as read.
        assert_eq!((v[1].disk_read_bytes, v[2].net_rx_bytes), (100, 7000));
    }

    #[test]
    fn net_dev_skips_loopback() {
        let text = "Inter-| Receive\n face |bytes packets\n    lo: 9 9 0 0 0 0 0 0 9 9 0 0 0 0 0 0\n  eth0: 100 2 0 0 0 0 0 0 300 4 0 0 0 0 0 0\n";
        let n = parse_net_dev(text);
        assert_eq!(n.len(), 1);
        assert_eq!((n[0].rx_bytes, n[0].rx_packets, n[0].tx_bytes, n[0].tx_packets), (100, 2, 300, 4));
    }
}
