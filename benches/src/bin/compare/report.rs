//! Turning measurements into markdown: medians per target, medians of per-round ratios, the
//! per-round raw figures, and the RESULTS.md file (whose sections are replaced by key, so a
//! "before" and an "after" run, quick and full, live side by side).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::procfs::Machine;
use crate::run::{Bottleneck, Measurement, Plan, Scenario, STREAM_SIZE};
use crate::targets::{Placement, Target};

/// The median of `values` (the mean of the middle two for an even count); `None` if empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// The median over rounds of `metric(a) / metric(b)`, where `a` and `b` are the two targets'
/// measurements of the same round (rounds where either has no figure are left out).
pub fn median_ratio(
    a: &[&Measurement],
    b: &[&Measurement],
    metric: impl Fn(&Measurement) -> Option<f64>,
) -> Option<f64> {
    let ratios: Vec<f64> = a
        .iter()
        .filter_map(|x| {
            let y = b.iter().find(|y| y.round == x.round)?;
            let (mx, my) = (metric(x)?, metric(y)?);
            (my != 0.0).then(|| mx / my)
        })
        .collect();
    median(&ratios)
}

/// Everything about a run that is not a measurement.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// What is being measured ("before: c622304 ...").
    pub label: String,
    /// "quick" or "full".
    pub mode: String,
    /// When (UTC).
    pub date: String,
    /// The exact command.
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// CPU placement.
    pub placement: Placement,
    /// Clock ticks per second, and whether measured.
    pub clk_tck: (u64, bool),
    /// Peer versions and the switchyard build.
    pub versions: Vec<String>,
    /// Targets or scenarios left out, and other things the reader should know.
    pub notes: Vec<String>,
    /// The plan.
    pub plan: Plan,
}

fn fmt_rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn fmt_opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map_or_else(|| "—".to_string(), f)
}

fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

fn fmt_ratio(x: Option<f64>) -> String {
    fmt_opt(x, |r| format!("{r:.2}×"))
}

/// Measurements grouped by (scenario, target), in plan order.
fn grouped(ms: &[Measurement]) -> BTreeMap<(Scenario, Target), Vec<&Measurement>> {
    let mut map: BTreeMap<(Scenario, Target), Vec<&Measurement>> = BTreeMap::new();
    for m in ms {
        map.entry((m.scenario, m.target)).or_default().push(m);
    }
    map
}

fn first_error(ms: &[&Measurement]) -> Option<String> {
    ms.iter().find(|m| !m.ok()).map(|m| {
        let mut e = m
            .error
            .clone()
            .unwrap_or_else(|| format!("{} errors, {} units", m.errors, m.units));
        if e.len() > 90 {
            let cut = (0..=90).rev().find(|&i| e.is_char_boundary(i)).unwrap_or(0);
            e.truncate(cut);
            e.push('…');
        }
        e.replace('|', "/")
    })
}

fn bottlenecks(ms: &[&Measurement], clk: u64) -> String {
    let ok: Vec<_> = ms.iter().filter(|m| m.ok()).collect();
    let count = |b: Bottleneck| ok.iter().filter(|m| m.bottleneck(clk) == b).count();
    let n = ok.len();
    let mut parts = Vec::new();
    let noisy = ok.iter().filter(|m| m.noisy(clk)).count();
    if noisy > 0 {
        parts.push(format!("**NOISY** {noisy}/{n}"));
    }
    for (b, name) in [
        (Bottleneck::Load, "**LOAD-BOUND**"),
        (Bottleneck::Proxy, "proxy"),
        (Bottleneck::Neither, "neither"),
    ] {
        let c = count(b);
        if c > 0 {
            parts.push(format!("{name} {c}/{n}"));
        }
    }
    parts.join(", ")
}

/// The markdown for one run: settings, the main table, ratios, idle RSS, warm http, raw rounds.
pub fn render(info: &RunInfo, ms: &[Measurement]) -> String {
    let clk = info.clk_tck.0;
    let plan = &info.plan;
    let groups = grouped(ms);
    let mut s = String::new();
    let _ = writeln!(s, "## {} — {} mode, {}\n", info.label, info.mode, info.date);
    let _ = writeln!(s, "- command: `{}`", info.command);
    let _ = writeln!(
        s,
        "- machine: {}; {} CPUs; Linux {}; {} RAM",
        info.machine.cpu, info.machine.cores, info.machine.kernel, info.machine.memory
    );
    let _ = writeln!(s, "- placement: {}", info.placement.describe());
    let _ = writeln!(
        s,
        "- rounds: {}, each window {} s after {} s of warm-up; idle-rss {} connections; \
         warm-http after {} handshakes",
        plan.rounds, plan.duration, plan.warmup, plan.idle_conns, plan.warm_handshakes
    );
    let _ = writeln!(
        s,
        "- CPU time: utime+stime from /proc/<pid>/stat at CLK_TCK = {} ({})",
        clk,
        if info.clk_tck.1 {
            "from getconf"
        } else {
            "assumed"
        }
    );
    for v in &info.versions {
        let _ = writeln!(s, "- {v}");
    }
    for n in &info.notes {
        let _ = writeln!(s, "- note: {n}");
    }

    // Main table.
    let _ = writeln!(
        s,
        "\n### Throughput and CPU cost (medians over rounds)\n\n\
         | scenario (unit) | target | throughput | proxy CPU µs/unit | proxy CPU | busiest load core | load side µs/unit | limited by | errors |\n\
         |---|---|---:|---:|---:|---:|---:|---|---|"
    );
    for (&(scenario, target), group) in &groups {
        if scenario == Scenario::IdleRss {
            continue;
        }
        let ok: Vec<&Measurement> = group.iter().copied().filter(|m| m.ok()).collect();
        let med = |f: &dyn Fn(&Measurement) -> Option<f64>| {
            median(&ok.iter().filter_map(|m| f(m)).collect::<Vec<_>>())
        };
        let thr = med(&|m| Some(m.throughput()));
        let mut throughput = fmt_opt(thr, |t| format!("{}/s", fmt_rate(t)));
        if scenario.streams() {
            if let Some(t) = thr {
                let _ = write!(throughput, " ({:.0} MB/s)", t * STREAM_SIZE as f64 / 1e6);
            }
        }
        let errors = match first_error(group) {
            Some(e) => format!("{}/{} rounds: {e}", group.len() - ok.len(), group.len()),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "| {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} |",
            scenario.name(),
            scenario.unit(),
            target.name(),
            throughput,
            fmt_opt(med(&|m| m.proxy_us_per_unit(clk)), |x| format!("{x:.2}")),
            fmt_opt(med(&|m| m.proxy_pct(clk)), |x| format!("{x:.0}%")),
            fmt_opt(med(&|m| Some(m.load_pct(clk))), |x| format!("{x:.0}%")),
            fmt_opt(med(&|m| m.load_us_per_unit(clk)), |x| format!("{x:.2}")),
            bottlenecks(group, clk),
            errors
        );
    }

    // Ratios.
    let pairs = [
        (Target::SwitchyardTokio, Target::Nginx),
        (Target::SwitchyardTokio, Target::Haproxy),
        (Target::SwitchyardSmol, Target::Nginx),
        (Target::SwitchyardSmol, Target::Haproxy),
        // What the frame-aware tunnel costs over the opaque one.
        (Target::SwitchyardFrames, Target::SwitchyardTokio),
        // What the metrics cost.
        (Target::SwitchyardMetrics, Target::SwitchyardTokio),
    ];
    let present = |t: Target| ms.iter().any(|m| m.target == t);
    let pairs: Vec<_> = pairs
        .into_iter()
        .filter(|&(a, b)| present(a) && present(b))
        .collect();
    if !pairs.is_empty() {
        let _ = write!(
            s,
            "\n### switchyard ÷ peer (median of per-round ratios)\n\n\
             CPU per unit and idle RSS: below 1× means switchyard is cheaper. Throughput: above 1× \
             means switchyard is faster (but see \"limited by\": a load-bound round compares the \
             load side, not the proxies).\n\n| scenario | metric |"
        );
        for (a, b) in &pairs {
            let _ = write!(s, " {} ÷ {} |", a.name(), b.name());
        }
        let _ = write!(s, "\n|---|---|");
        for _ in &pairs {
            let _ = write!(s, "---:|");
        }
        let _ = writeln!(s);
        let ok_of = |sc: Scenario, t: Target| -> Vec<&Measurement> {
            groups
                .get(&(sc, t))
                .map(|g| g.iter().copied().filter(|m| m.ok()).collect())
                .unwrap_or_default()
        };
        for &scenario in &plan.scenarios {
            type Metric<'a> = (&'a str, Box<dyn Fn(&Measurement) -> Option<f64>>);
            let metrics: Vec<Metric<'_>> = if scenario == Scenario::IdleRss {
                vec![(
                    "KiB/connection",
                    Box::new(|m: &Measurement| m.kib_per_conn()),
                )]
            } else {
                vec![
                    (
                        "CPU µs/unit",
                        Box::new(move |m: &Measurement| m.proxy_us_per_unit(clk)),
                    ),
                    (
                        "throughput",
                        Box::new(|m: &Measurement| Some(m.throughput())),
                    ),
                ]
            };
            for (name, metric) in &metrics {
                let _ = write!(s, "| {} | {name} |", scenario.name());
                for &(a, b) in &pairs {
                    let r = median_ratio(&ok_of(scenario, a), &ok_of(scenario, b), metric);
                    let _ = write!(s, " {} |", fmt_ratio(r));
                }
                let _ = writeln!(s);
            }
        }
    }

    // Idle RSS.
    if plan.scenarios.contains(&Scenario::IdleRss) {
        let _ = writeln!(
            s,
            "\n### idle-rss: proxy RSS growth per upgraded idle connection (medians)\n\n\
             | target | connections | RSS before | RSS with all open | KiB per connection | errors |\n\
             |---|---:|---:|---:|---:|---|"
        );
        for (&(scenario, target), group) in &groups {
            if scenario != Scenario::IdleRss {
                continue;
            }
            let ok: Vec<&Measurement> = group.iter().copied().filter(|m| m.ok()).collect();
            let conns = median(&ok.iter().map(|m| m.units as f64).collect::<Vec<_>>());
            let before = median(
                &ok.iter()
                    .filter_map(|m| m.rss_kib.map(|r| r.0 as f64))
                    .collect::<Vec<_>>(),
            );
            let after = median(
                &ok.iter()
                    .filter_map(|m| m.rss_kib.map(|r| r.1 as f64))
                    .collect::<Vec<_>>(),
            );
            let per = median(
                &ok.iter()
                    .filter_map(|m| m.kib_per_conn())
                    .collect::<Vec<_>>(),
            );
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                target.name(),
                fmt_opt(conns, |c| format!("{c:.0}")),
                fmt_opt(before, mib),
                fmt_opt(after, mib),
                fmt_opt(per, |k| format!("{k:.1}")),
                first_error(group).unwrap_or_default()
            );
        }
    }

    // Warm vs fresh http.
    if plan.scenarios.contains(&Scenario::WarmHttp) && plan.scenarios.contains(&Scenario::Http) {
        let _ = writeln!(
            s,
            "\n### warm-http: http after {} handshakes on the same process, beside fresh http\n\n\
             | target | fresh req/s | warm req/s | warm ÷ fresh | fresh µs/req | warm µs/req | warm ÷ fresh | handshakes took | RSS fresh → after handshakes |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|",
            plan.warm_handshakes
        );
        for &target in &plan.targets {
            let get = |sc| -> Vec<&Measurement> {
                groups
                    .get(&(sc, target))
                    .map(|g| g.iter().copied().filter(|m| m.ok()).collect())
                    .unwrap_or_default()
            };
            let (fresh, warm) = (get(Scenario::Http), get(Scenario::WarmHttp));
            if warm.is_empty() && !groups.contains_key(&(Scenario::WarmHttp, target)) {
                continue;
            }
            let thr = |m: &Measurement| Some(m.throughput());
            let cpu = |m: &Measurement| m.proxy_us_per_unit(clk);
            let med = |v: &[&Measurement], f: &dyn Fn(&Measurement) -> Option<f64>| {
                median(&v.iter().filter_map(|m| f(m)).collect::<Vec<_>>())
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} → {} |",
                target.name(),
                fmt_opt(med(&fresh, &thr), fmt_rate),
                fmt_opt(med(&warm, &thr), fmt_rate),
                fmt_ratio(median_ratio(&warm, &fresh, thr)),
                fmt_opt(med(&fresh, &cpu), |x| format!("{x:.2}")),
                fmt_opt(med(&warm, &cpu), |x| format!("{x:.2}")),
                fmt_ratio(median_ratio(&warm, &fresh, cpu)),
                fmt_opt(med(&warm, &|m| m.warm_secs), |x| format!("{x:.1} s")),
                fmt_opt(med(&warm, &|m| m.rss_kib.map(|r| r.0 as f64)), mib),
                fmt_opt(med(&warm, &|m| m.rss_kib.map(|r| r.1 as f64)), mib),
            );
        }
    }

    // Raw rounds.
    let _ = writeln!(
        s,
        "\n<details><summary>Every round</summary>\n\n\
         | round | scenario | target | units | window | throughput | proxy µs/unit | proxy CPU | busiest load core | other use of proxy CPU | limited by | note |\n\
         |---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
    );
    let mut sorted: Vec<&Measurement> = ms.iter().collect();
    sorted.sort_by_key(|m| (m.round, m.scenario));
    for m in sorted {
        let note = if !m.ok() {
            first_error(&[m]).unwrap_or_default()
        } else if let Some(k) = m.kib_per_conn() {
            format!("{k:.1} KiB/conn")
        } else if let Some(w) = m.warm_secs {
            format!("after handshakes ({w:.1} s)")
        } else if let Some(t) = &m.tls {
            t.clone()
        } else {
            String::new()
        };
        let note = if m.attempt > 1 {
            format!("attempt {} (earlier ones NOISY) {note}", m.attempt)
        } else {
            note
        };
        if m.scenario == Scenario::IdleRss {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | — | — | — | — | — | — | | {note} |",
                m.round + 1,
                m.scenario.name(),
                m.target.name(),
                m.units,
            );
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.2} s | {} | {} | {} | {:.0}% | {} | {}{} | {} |",
            m.round + 1,
            m.scenario.name(),
            m.target.name(),
            m.units,
            m.window,
            fmt_rate(m.throughput()),
            fmt_opt(m.proxy_us_per_unit(clk), |x| format!("{x:.2}")),
            fmt_opt(m.proxy_pct(clk), |x| format!("{x:.0}%")),
            m.load_pct(clk),
            fmt_opt(m.foreign_pct(clk), |x| format!("{x:.0}%")),
            if m.ok() && m.noisy(clk) {
                "NOISY, "
            } else {
                ""
            },
            match m.bottleneck(clk) {
                _ if !m.ok() => "",
                Bottleneck::Load => "LOAD-BOUND",
                Bottleneck::Proxy => "proxy",
                Bottleneck::Neither => "neither",
            },
            note
        );
    }
    let _ = writeln!(s, "\n</details>");
    s
}

const SECTION_START: &str = "<!-- compare:section ";
const SECTION_END: &str = "<!-- compare:end -->";

/// Merges one run's `section` into the text of RESULTS.md: the intro is replaced by `intro`, a
/// section with the same `key` is replaced in place, any other is kept, and a new key is
/// appended.
pub fn merge_results(existing: &str, intro: &str, key: &str, section: &str) -> String {
    let key = key.replace("--", "- -");
    let mut sections: Vec<(String, String)> = Vec::new();
    let mut rest = existing;
    while let Some(start) = rest.find(SECTION_START) {
        let after = &rest[start + SECTION_START.len()..];
        let Some(close) = after.find("-->") else {
            break;
        };
        let k = after[..close].trim().to_string();
        let body_and_more = &after[close + 3..];
        let Some(end) = body_and_more.find(SECTION_END) else {
            break;
        };
        sections.push((k, body_and_more[..end].trim().to_string()));
        rest = &body_and_more[end + SECTION_END.len()..];
    }
    let new = section.trim().to_string();
    match sections.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = new,
        None => sections.push((key.clone(), new)),
    }
    let mut out = intro.trim_end().to_string();
    out.push_str("\n\n");
    for (k, body) in sections {
        let _ = write!(out, "{SECTION_START}{k} -->\n{body}\n{SECTION_END}\n\n");
    }
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 2.0]), Some(2.0));
    }

    fn m(round: usize, target: Target, units: u64, ticks: u64) -> Measurement {
        let mut m = Measurement::new(round, Scenario::PingPong, target);
        m.units = units;
        m.window = 1.0;
        m.proxy_ticks = Some(ticks);
        m
    }

    #[test]
    fn ratios_pair_rounds_and_take_the_median() {
        // Per round: switchyard 1.0, 2.0, 4.0 µs-ish; nginx constant → ratios 0.5, 1, 2.
        let sy = [
            m(0, Target::SwitchyardTokio, 100, 50),
            m(1, Target::SwitchyardTokio, 100, 100),
            m(2, Target::SwitchyardTokio, 100, 200),
        ];
        let ng = [
            m(2, Target::Nginx, 100, 100),
            m(0, Target::Nginx, 100, 100),
            m(1, Target::Nginx, 100, 100),
        ];
        let a: Vec<&Measurement> = sy.iter().collect();
        let b: Vec<&Measurement> = ng.iter().collect();
        assert_eq!(
            median_ratio(&a, &b, |m| m.proxy_us_per_unit(100)),
            Some(1.0)
        );
        // A round missing on one side is left out: rounds 0 and 2 give 0.5 and 2 → 1.25.
        let b2: Vec<&Measurement> = ng.iter().filter(|m| m.round != 1).collect();
        assert_eq!(
            median_ratio(&a, &b2, |m| m.proxy_us_per_unit(100)),
            Some(1.25)
        );
        assert_eq!(median_ratio(&a, &[], |m| Some(m.throughput())), None);
    }

    #[test]
    fn results_sections_are_replaced_by_key_and_kept_otherwise() {
        let one = merge_results("", "# R\n", "before / quick", "## q1\n");
        assert_eq!(
            one,
            "# R\n\n<!-- compare:section before / quick -->\n## q1\n<!-- compare:end -->\n"
        );
        let two = merge_results(&one, "# R2\n", "before / full", "## f1");
        let three = merge_results(&two, "# R3\n", "before / quick", "## q2");
        assert!(three.starts_with("# R3\n"));
        assert!(three.contains("## q2") && !three.contains("## q1"));
        assert!(three.find("## q2") < three.find("## f1"), "order kept");
        assert_eq!(three.matches(SECTION_END).count(), 2);
    }
}
