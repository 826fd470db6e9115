//! Reading `/proc`: a process's CPU time (`/proc/<pid>/stat`) and resident memory
//! (`/proc/<pid>/status`), the CPUs we may run on, the open-files limit, and the machine
//! description written into RESULTS.md. The parsers are pure functions with tests; the readers
//! are thin wrappers around them.

use std::path::Path;
use std::process::Command;

use anyhow::Context as _;

/// utime + stime from the text of `/proc/<pid>/stat`, in clock ticks (the whole thread group).
///
/// The command name (field 2) is in parentheses and may itself contain spaces or `)`, so fields
/// are counted from the *last* `)`: after it come field 3 (state), ..., 14 (utime), 15 (stime).
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The state letter (field 3) from the text of `/proc/<pid>/stat`.
pub fn parse_stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// utime + stime of process `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_stat_ticks(&text).with_context(|| format!("cannot parse {path}: {text}"))
}

/// The state letter of process `pid` (`Z` for a zombie), if it exists.
pub fn state(pid: u32) -> Option<char> {
    parse_stat_state(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Ticks CPU `cpu` spent running something (user + nice + system + steal) from the text of
/// `/proc/stat`. Idle, iowait, irq and softirq are left out: interrupts are the network work
/// our own traffic causes, and they are not in any process's utime/stime either.
pub fn parse_cpu_busy(stat: &str, cpu: usize) -> Option<u64> {
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    Some(f.first()? + f.get(1)? + f.get(2)? + f.get(7)?)
}

/// Busy ticks of CPU `cpu` so far (see [`parse_cpu_busy`]).
pub fn cpu_busy(cpu: usize) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    parse_cpu_busy(&text, cpu).with_context(|| format!("no cpu{cpu} in /proc/stat"))
}

/// `VmRSS` in KiB from the text of `/proc/<pid>/status`.
pub fn parse_status_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let n = words.next()?.parse().ok()?;
    (words.next()? == "kB").then_some(n)
}

/// Resident set size of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_status_rss_kib(&text).with_context(|| format!("no VmRSS in {path}"))
}

/// Parses a CPU list such as `0-3,8,10-11` (the `Cpus_allowed_list` format).
pub fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                if a > b || b - a > 4096 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// The CPUs this process may run on (from `/proc/self/status`), falling back to
/// `0..available_parallelism`.
pub fn allowed_cpus() -> Vec<usize> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Cpus_allowed_list:"))?;
            parse_cpu_list(&line["Cpus_allowed_list:".len()..])
        })
        .unwrap_or_else(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            (0..n).collect()
        })
}

/// The soft and hard `Max open files` from the text of `/proc/<pid>/limits`.
pub fn parse_nofile_limits(limits: &str) -> Option<(u64, u64)> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut words = line["Max open files".len()..].split_whitespace();
    let soft = words.next()?;
    let hard = words.next()?;
    let parse = |w: &str| {
        if w == "unlimited" {
            Some(u64::MAX)
        } else {
            w.parse().ok()
        }
    };
    Some((parse(soft)?, parse(hard)?))
}

/// This process's (soft, hard) open-files limit.
pub fn nofile_limits() -> Option<(u64, u64)> {
    parse_nofile_limits(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

/// Clock ticks per second for `/proc/<pid>/stat` (`getconf CLK_TCK`), and whether it was
/// measured (`false`: assumed 100, the value on every mainstream Linux build).
pub fn clock_ticks() -> (u64, bool) {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .map_or((100, false), |t| (t, true))
}

/// The first `model name` from the text of `/proc/cpuinfo`.
pub fn parse_cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// The machine, as written into RESULTS.md.
#[derive(Debug, Clone)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Online CPUs, and the ones we may use.
    pub cores: String,
    /// Kernel release.
    pub kernel: String,
    /// Total memory.
    pub memory: String,
}

/// Describes this machine from `/proc`.
pub fn machine() -> Machine {
    let read = |p: &str| std::fs::read_to_string(Path::new(p)).unwrap_or_default();
    let cpu = parse_cpu_model(&read("/proc/cpuinfo")).unwrap_or_else(|| "unknown".into());
    let online = read("/sys/devices/system/cpu/online");
    let online = parse_cpu_list(&online).map_or(0, |c| c.len());
    let allowed = allowed_cpus();
    let memory = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or_else(
            || "unknown".into(),
            |kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0),
        );
    Machine {
        cpu,
        cores: format!("{online} online, {} usable ({allowed:?})", allowed.len()),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        memory,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_survive_hostile_command_names() {
        // Fields 14 and 15 are utime = 1234 and stime = 56.
        let line = "4242 (we ird) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 1234 56 0 0 20 0 1 0 \
                    12345 1000000 250 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert_eq!(parse_stat_ticks(line), Some(1290));
        assert_eq!(parse_stat_state(line), Some('S'));
        assert_eq!(parse_stat_ticks("4242 (truncated) S 1 2"), None);
    }

    #[test]
    fn cpu_busy_adds_user_nice_system_and_steal() {
        let stat =
            "cpu  10 0 10 100 0 0 0 0 0 0\ncpu0 1 2 3 1000 5 6 7 8 0 0\ncpu1 9 9 9 9 9 9 9 9 9 9\n";
        assert_eq!(parse_cpu_busy(stat, 0), Some(1 + 2 + 3 + 8));
        assert_eq!(parse_cpu_busy(stat, 1), Some(36));
        assert_eq!(parse_cpu_busy(stat, 2), None);
    }

    #[test]
    fn rss_comes_from_vmrss_in_kib() {
        let status = "Name:\tnginx\nVmPeak:\t  20000 kB\nVmRSS:\t    5120 kB\nRssAnon:\t 100 kB\n";
        assert_eq!(parse_status_rss_kib(status), Some(5120));
        assert_eq!(parse_status_rss_kib("Name:\tzombie\n"), None);
    }

    #[test]
    fn cpu_lists_expand_ranges() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0,2-4,7"), Some(vec![0, 2, 3, 4, 7]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
    }

    #[test]
    fn nofile_limits_parse_numbers_and_unlimited() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 20000                files     \n";
        assert_eq!(parse_nofile_limits(limits), Some((1024, 20000)));
        let limits = "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_nofile_limits(limits), Some((u64::MAX, u64::MAX)));
    }

    #[test]
    fn cpu_model_is_the_first_model_name() {
        let info = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nprocessor\t: 1\nmodel name\t: x\n";
        assert_eq!(parse_cpu_model(info).as_deref(), Some("AMD EPYC 9B14"));
    }
}
