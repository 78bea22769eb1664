//! Per-VM load samples kept in memory, and their averages over a window.

use std::collections::{HashMap, VecDeque};

use gridforge_proto::v1::VmUsage;

/// Samples older than this (seconds before the newest one of the VM) are dropped when a sample is recorded:
/// the longest window a policy can ask for.
pub const MAX_WINDOW_SECS: u64 = 3600;

/// At most this many samples are kept per VM (one every 10 s over [`MAX_WINDOW_SECS`]); when samples come
/// faster, the oldest go first and the longest window reachable is shorter.
pub const MAX_SAMPLES: usize = 360;

/// The window used when a policy sets none (`window_secs` 0).
pub const DEFAULT_WINDOW_SECS: u32 = 300;

/// The window a policy's `window_secs` stands for: [`DEFAULT_WINDOW_SECS`] when 0, at most
/// [`MAX_WINDOW_SECS`].
pub fn effective_window(window_secs: u32) -> u32 {
    let w = if window_secs == 0 { DEFAULT_WINDOW_SECS } else { window_secs };
    w.min(MAX_WINDOW_SECS as u32)
}

/// What one poll saw of a VM: CPU and memory as percentages of its own vCPUs and memory, disk and network
/// traffic in bytes per second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VmLoad {
    pub cpu_percent: f64,
    pub memory_percent: f64,
    pub disk_bytes_per_sec: f64,
    pub network_bytes_per_sec: f64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: u64,
    cpu: f32,
    memory: f32,
    disk: f32,
    network: f32,
}

/// Each VM's recent samples ([`VmLoad`]; only CPU and memory are averaged), oldest first.
/// Memory is bounded per VM by [`MAX_SAMPLES`] and [`MAX_WINDOW_SECS`]; VMs that are gone are dropped with
/// [`UsageWindows::forget`] or [`UsageWindows::retain`].
#[derive(Debug, Clone, Default)]
pub struct UsageWindows {
    vms: HashMap<String, VecDeque<Sample>>,
}

impl UsageWindows {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a sample taken at `at_secs` (seconds since the epoch). A sample older than the VM's newest is
    /// ignored, one at the same second replaces it, and one with a non-finite value is ignored. Samples more
    /// than [`MAX_WINDOW_SECS`] older than this one, and any beyond [`MAX_SAMPLES`], are dropped.
    pub fn record(&mut self, vm: &str, at_secs: u64, load: VmLoad) {
        let VmLoad { cpu_percent, memory_percent, disk_bytes_per_sec, network_bytes_per_sec } = load;
        if ![cpu_percent, memory_percent, disk_bytes_per_sec, network_bytes_per_sec]
            .iter()
            .all(|v| v.is_finite())
        {
            return;
        }
        let sample = Sample {
            at: at_secs,
            cpu: cpu_percent as f32,
            memory: memory_percent as f32,
            disk: disk_bytes_per_sec as f32,
            network: network_bytes_per_sec as f32,
        };
        let samples = match self.vms.get_mut(vm) {
            Some(s) => s,
            None => self.vms.entry(vm.to_owned()).or_default(),
        };
        match samples.back_mut() {
            Some(last) if at_secs < last.at => return,
            Some(last) if at_secs == last.at => *last = sample,
            _ => samples.push_back(sample),
        }
        while samples.front().is_some_and(|s| at_secs - s.at > MAX_WINDOW_SECS) {
            samples.pop_front();
        }
        while samples.len() > MAX_SAMPLES {
            samples.pop_front();
        }
    }

    /// The VM's last sample and the averages of the CPU and memory samples less than `window_secs` old at `now_secs`
    /// (0: [`DEFAULT_WINDOW_SECS`]; at most [`MAX_WINDOW_SECS`]), with their count. `None` for a VM without
    /// samples; a VM whose samples are all older than the window has `samples` 0 and averages 0.
    pub fn usage(&self, vm: &str, window_secs: u32, now_secs: u64) -> Option<VmUsage> {
        let samples = self.vms.get(vm)?;
        let last = samples.back()?;
        let window = u64::from(effective_window(window_secs));
        let (mut cpu, mut memory, mut count) = (0.0f64, 0.0f64, 0u32);
        for s in samples.iter().rev().take_while(|s| now_secs.saturating_sub(s.at) < window) {
            cpu += f64::from(s.cpu);
            memory += f64::from(s.memory);
            count += 1;
        }
        let avg = |sum: f64| if count == 0 { 0.0 } else { sum / f64::from(count) };
        Some(VmUsage {
            cpu_percent: f64::from(last.cpu),
            memory_percent: f64::from(last.memory),
            avg_cpu_percent: avg(cpu),
            avg_memory_percent: avg(memory),
            samples: count,
            disk_bytes_per_sec: f64::from(last.disk),
            network_bytes_per_sec: f64::from(last.network),
        })
    }

    /// Drops the VM's samples (it was deleted).
    pub fn forget(&mut self, vm: &str) {
        self.vms.remove(vm);
    }

    /// Keeps only the VMs for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.vms.retain(|vm, _| keep(vm));
    }

    /// How many VMs have samples.
    pub fn len(&self) -> usize {
        self.vms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }
}
