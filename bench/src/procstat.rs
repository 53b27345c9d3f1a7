//! Sampling processes through /proc: the server's resident memory and CPU
//! time (summed over the process and its descendants, so nginx's workers
//! count), this process's own CPU time, and raising our open-files limit.

use std::collections::HashMap;

use crate::report::{Proc, Report};

/// Raises the soft open-files limit to the hard one; returns the limit now
/// in force.
pub fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

/// Clock ticks per second of /proc/*/stat times (`getconf CLK_TCK`).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// The fields of /proc/P/stat after the command name: index 0 is field 3
/// (state) of proc(5).
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// `pid` and all its descendants that are alive.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(p) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_fields(&p.to_string()).and_then(|f| f.get(1)?.parse().ok()) {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn cpu_ticks(pid: &str) -> Option<u64> {
    let f = stat_fields(pid)?;
    // utime and stime: fields 14 and 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A sampled process (tree).
#[derive(Debug, Clone, Copy)]
pub struct Server {
    pub pid: u32,
    ticks_per_sec: f64,
}

impl Server {
    pub fn new(pid: u32) -> Result<Server, String> {
        vm_rss_kib(pid)
            .ok_or_else(|| format!("no process {pid} to sample (/proc/{pid}/status)"))?;
        Ok(Server {
            pid,
            ticks_per_sec: clock_ticks(),
        })
    }

    /// VmRSS of the process and its descendants, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let pids = tree(self.pid);
        let first = vm_rss_kib(self.pid)?;
        Some(first + pids[1..].iter().filter_map(|&p| vm_rss_kib(p)).sum::<u64>())
    }

    /// User + system CPU seconds of the process and its live descendants.
    pub fn cpu_secs(&self) -> Option<f64> {
        let pids = tree(self.pid);
        let first = cpu_ticks(&self.pid.to_string())?;
        let rest: u64 = pids[1..]
            .iter()
            .filter_map(|p| cpu_ticks(&p.to_string()))
            .sum();
        Some((first + rest) as f64 / self.ticks_per_sec)
    }
}

/// This process's user + system CPU seconds.
pub fn own_cpu_secs(ticks_per_sec: f64) -> f64 {
    cpu_ticks("self").map_or(0.0, |t| t as f64 / ticks_per_sec)
}

/// The sampled processes of a run: the servers (`--pid`, one per replica)
/// and the bus (`--bus-pid`), each with its figures so far.
pub struct Watch {
    servers: Vec<(Server, Proc)>,
    bus: Option<(Server, Proc)>,
    cpu_start: Vec<Option<f64>>,
}

/// When an RSS sample is taken.
#[derive(Clone, Copy)]
pub enum Phase {
    Before,
    Idle,
    End,
}

impl Watch {
    pub fn new(pids: &[u32], bus: Option<u32>) -> Result<Watch, String> {
        let watch = |pid: u32| {
            Server::new(pid).map(|s| {
                (
                    s,
                    Proc {
                        pid,
                        ..Proc::default()
                    },
                )
            })
        };
        Ok(Watch {
            servers: pids.iter().map(|&p| watch(p)).collect::<Result<_, _>>()?,
            bus: bus.map(watch).transpose()?,
            cpu_start: Vec::new(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty() && self.bus.is_none()
    }

    fn all(&mut self) -> impl Iterator<Item = &mut (Server, Proc)> {
        self.servers.iter_mut().chain(self.bus.as_mut())
    }

    pub fn rss(&mut self, phase: Phase) {
        for (s, p) in self.all() {
            let v = s.rss_kib();
            match phase {
                Phase::Before => p.rss_before_kib = v,
                Phase::Idle => p.rss_idle_kib = v,
                Phase::End => p.rss_end_kib = v,
            }
        }
    }

    pub fn cpu_start(&mut self) {
        self.cpu_start = self.all().map(|(s, _)| s.cpu_secs()).collect();
    }

    pub fn cpu_end(&mut self) {
        let start = std::mem::take(&mut self.cpu_start);
        for ((s, p), a) in self.all().zip(start) {
            p.cpu_s = match (a, s.cpu_secs()) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            };
        }
    }

    /// Writes the servers' figures (summed, and each) and the bus's into
    /// `report`; `open` streams divide the idle growth.
    pub fn fill(&self, report: &mut Report, open: u64) {
        let servers: Vec<Proc> = self
            .servers
            .iter()
            .map(|(_, p)| {
                let mut p = p.clone();
                if let (Some(idle), Some(before)) = (p.rss_idle_kib, p.rss_before_kib) {
                    // Each replica's share: the streams are dealt evenly.
                    let share = open as f64 / self.servers.len() as f64;
                    if share > 0.0 {
                        p.rss_per_idle_stream_kib = Some((idle as f64 - before as f64) / share);
                    }
                }
                p
            })
            .collect();
        let sum = |f: fn(&Proc) -> Option<u64>| -> Option<u64> {
            servers.iter().map(f).sum::<Option<u64>>()
        };
        report.server_pid = servers.first().map(|p| p.pid);
        report.rss_before_kib = sum(|p| p.rss_before_kib);
        report.rss_idle_kib = sum(|p| p.rss_idle_kib);
        report.rss_end_kib = sum(|p| p.rss_end_kib);
        if let (Some(idle), Some(before)) = (report.rss_idle_kib, report.rss_before_kib)
            && open > 0
        {
            report.rss_per_idle_stream_kib = Some((idle as f64 - before as f64) / open as f64);
        }
        report.server_cpu_s = servers.iter().map(|p| p.cpu_s).sum::<Option<f64>>();
        if servers.len() > 1 {
            report.servers = servers;
        }
        report.bus = self.bus.as_ref().map(|(_, p)| p.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process() {
        let me = Server::new(std::process::id()).unwrap();
        assert!(me.rss_kib().unwrap() > 0);
        assert!(me.cpu_secs().unwrap() >= 0.0);
        assert!(tree(1).contains(&1));
        assert!(Server::new(u32::MAX).is_err());
    }
}
