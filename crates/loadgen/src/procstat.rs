//! CPU time, memory and disk writes of a process, from `/proc` (Linux).
//!
//! The hub runs as its own process (`strata hub run`), so what it costs is read
//! from the kernel's accounting rather than estimated: user + system CPU of all its
//! threads (`/proc/PID/stat`), resident and peak resident memory
//! (`/proc/PID/status`: VmRSS, VmHWM) and bytes it caused to be written to storage
//! (`/proc/PID/io`: write_bytes).

use std::path::Path;

/// One reading of a process's counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// User + system CPU seconds so far, all threads.
    pub cpu_s: f64,
    pub rss_kib: u64,
    /// Peak resident set since start (or since [`reset_peak`]).
    pub hwm_kib: u64,
    /// Bytes written to storage on its behalf so far (`None`: not readable).
    pub write_bytes: Option<u64>,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The counters of process `pid` (`None` if it is gone or unreadable).
pub fn sample(pid: u32) -> Option<Sample> {
    sample_at(&Path::new("/proc").join(pid.to_string()))
}

/// The counters of this process.
pub fn sample_self() -> Option<Sample> {
    sample_at(Path::new("/proc/self"))
}

fn sample_at(dir: &Path) -> Option<Sample> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the
    // last ')'. There, field 0 is the state (stat's 3rd), utime and stime are 11, 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let write_bytes = std::fs::read_to_string(dir.join("io")).ok().and_then(|io| {
        io.lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
    });
    Some(Sample {
        cpu_s: ticks as f64 / clock_ticks(),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        write_bytes,
    })
}

/// Busy and total CPU time of the whole machine so far, in clock ticks summed
/// over all CPUs (`/proc/stat`), to tell the hub's and this tool's CPU from other
/// processes' on a shared machine.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// CPU seconds per clock tick.
pub fn tick_seconds() -> f64 {
    1.0 / clock_ticks()
}

/// Reset the peak resident set of `pid` to its current size, so a step's peak is
/// its own (writing 5 to clear_refs; needs the right to ptrace it). False if not
/// allowed.
pub fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), b"5").is_ok()
}

/// Bytes and files under `dir`, and how many of the files end in `.pack`.
pub fn dir_usage(dir: &Path) -> (u64, u64, u64) {
    let (mut bytes, mut files, mut packs) = (0u64, 0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else {
                bytes += md.len();
                files += 1;
                if e.file_name().to_string_lossy().ends_with(".pack") {
                    packs += 1;
                }
            }
        }
    }
    (bytes, files, packs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let s = sample_self().expect("/proc/self is readable");
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.pack"), [0u8; 10]).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/b"), [0u8; 5]).unwrap();
        assert_eq!(dir_usage(dir.path()), (15, 2, 1));
    }
}
