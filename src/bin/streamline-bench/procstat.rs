//! Sampling processes through /proc: the server's resident memory and CPU
//! time (summed over the process and its descendants, so nginx's workers
//! count), this process's own CPU time, and raising our open-files limit.

use std::collections::HashMap;

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
