//! Machine-state helpers of the benchmarks: on two cores any other busy process makes a
//! figure meaningless, so each run waits for an idle machine and says when it had none.
#![allow(dead_code)]
use std::time::{Duration, Instant};

/// Other processes may use this much of one core before a run counts as disturbed.
pub const BUSY_CORES: f64 = 0.15;

/// Physical cores from /proc/cpuinfo (distinct physical id / core id pairs), else the
/// available parallelism.
pub fn physical_cores() -> usize {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut cores = std::collections::BTreeSet::new();
    let mut physical = "";
    for line in info.lines() {
        let mut kv = line.splitn(2, ':').map(str::trim);
        match (kv.next(), kv.next()) {
            (Some("physical id"), Some(v)) => physical = v,
            (Some("core id"), Some(v)) => {
                cores.insert(format!("{physical}/{v}"));
            }
            _ => {}
        }
    }
    if cores.is_empty() {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cores.len()
    }
}

pub fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Jiffies (busy, total) of all CPUs from /proc/stat.
pub fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle and iowait are the 4th and 5th fields.
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// How many cores other processes kept busy over `span` (this process sleeps meanwhile).
pub fn busy_cores(span: Duration) -> f64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let (b0, t0) = cpu_jiffies();
    std::thread::sleep(span);
    let (b1, t1) = cpu_jiffies();
    if t1 <= t0 {
        return 0.0;
    }
    (b1 - b0) as f64 / (t1 - t0) as f64 * cpus
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits up to a minute for the machine to be idle; false if it stayed busy.
pub fn wait_for_idle() -> bool {
    let start = Instant::now();
    loop {
        let busy = busy_cores(Duration::from_secs(2));
        if busy <= BUSY_CORES {
            return true;
        }
        if start.elapsed() > Duration::from_secs(60) {
            eprintln!("  machine still busy ({busy:.2} cores used by other processes): flagged");
            return false;
        }
    }
}
