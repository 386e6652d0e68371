//! Samples per runtime, their summaries (min, median, max), and the one table
//! of a run: a row per measurement, a column per runtime, the ratio
//! berth/containerd and the target where the issues set one. The table is
//! Markdown, so docs/PERFORMANCE.md takes it as printed.

use std::fmt::Write as _;

use crate::daemon::Runtime;

/// The values one measurement took in one runtime, in order.
#[derive(Clone, Debug, Default)]
pub struct Samples(Vec<f64>);

impl Samples {
    pub fn push(&mut self, value: f64) {
        self.0.push(value);
    }

    pub fn values(&self) -> &[f64] {
        &self.0
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The statistic `pick` of the samples; None when there are none.
    pub fn pick(&self, pick: Pick) -> Option<f64> {
        let v = self.sorted();
        if v.is_empty() {
            return None;
        }
        Some(match pick {
            Pick::Min => v[0],
            // The lower median: always one of the measured values.
            Pick::P50 => v[(v.len() - 1) / 2],
            // Nearest rank: the smallest value at or above 95 % of them.
            Pick::P95 => v[(v.len() * 95).div_ceil(100).max(1) - 1],
            Pick::Max => v[v.len() - 1],
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    Min,
    P50,
    P95,
    Max,
}

impl Pick {
    fn name(self) -> &'static str {
        match self {
            Pick::Min => "min",
            Pick::P50 => "p50",
            Pick::P95 => "p95",
            Pick::Max => "max",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Seconds,
    MiB,
}

impl Unit {
    fn format(self, value: f64) -> String {
        match self {
            Unit::Seconds if value < 0.001 => format!("{:.0} µs", value * 1e6),
            Unit::Seconds if value < 0.01 => format!("{:.2} ms", value * 1000.0),
            Unit::Seconds if value < 0.1 => format!("{:.1} ms", value * 1000.0),
            Unit::Seconds if value < 1.0 => format!("{:.0} ms", value * 1000.0),
            Unit::Seconds => format!("{value:.2} s"),
            Unit::MiB if value.abs() < 1.0 => format!("{value:.2} MiB"),
            Unit::MiB => format!("{value:.1} MiB"),
        }
    }
}

/// One measurement, sampled in both runtimes.
#[derive(Clone, Debug)]
pub struct Metric {
    pub label: String,
    pub unit: Unit,
    berth: Samples,
    containerd: Samples,
}

impl Metric {
    pub fn new(label: impl Into<String>, unit: Unit) -> Metric {
        Metric {
            label: label.into(),
            unit,
            berth: Samples::default(),
            containerd: Samples::default(),
        }
    }

    pub fn push(&mut self, runtime: Runtime, value: f64) {
        match runtime {
            Runtime::Berth => self.berth.push(value),
            Runtime::Containerd => self.containerd.push(value),
        }
    }

    pub fn samples(&self, runtime: Runtime) -> &Samples {
        match runtime {
            Runtime::Berth => &self.berth,
            Runtime::Containerd => &self.containerd,
        }
    }

    /// "label: berth [..], containerd [..]" with every sample.
    pub fn raw_line(&self) -> String {
        let list = |s: &Samples| {
            s.values()
                .iter()
                .map(|v| self.unit.format(*v))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "{}: berth [{}]; containerd [{}]",
            self.label,
            list(&self.berth),
            list(&self.containerd)
        )
    }
}

/// What the issue asks of a row.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// berth/containerd at most this.
    RatioAtMost(f64),
    /// berth's value below this many MiB.
    BerthBelowMiB(f64),
}

impl Target {
    fn describe(self, berth: f64, ratio: Option<f64>) -> String {
        match self {
            Target::RatioAtMost(max) => {
                let met = ratio.is_some_and(|r| r <= max);
                format!("≤ {max:.2}: {}", if met { "met" } else { "MISSED" })
            }
            Target::BerthBelowMiB(max) => {
                let met = berth < max;
                format!(
                    "berth < {max:.0} MiB: {}",
                    if met { "met" } else { "MISSED" }
                )
            }
        }
    }
}

/// One row of the table: a statistic of a metric, and maybe a target.
pub struct Row<'a> {
    pub metric: &'a Metric,
    pub pick: Pick,
    pub target: Option<Target>,
}

impl<'a> Row<'a> {
    pub fn new(metric: &'a Metric, pick: Pick) -> Row<'a> {
        Row {
            metric,
            pick,
            target: None,
        }
    }

    pub fn target(mut self, target: Target) -> Row<'a> {
        self.target = Some(target);
        self
    }
}

/// The Markdown table of `rows`.
pub fn table(rows: &[Row<'_>]) -> String {
    let mut out = String::new();
    out.push_str("| measurement | berth | containerd | berth/containerd | target |\n");
    out.push_str("|---|---:|---:|---:|---|\n");
    for row in rows {
        let m = row.metric;
        let berth = m.berth.pick(row.pick);
        let containerd = m.containerd.pick(row.pick);
        let cell = |v: Option<f64>| v.map_or_else(|| "–".to_string(), |v| m.unit.format(v));
        let ratio = match (berth, containerd) {
            (Some(b), Some(c)) if c > 0.0 => Some(b / c),
            _ => None,
        };
        let target = match (row.target, berth) {
            (Some(t), Some(b)) => t.describe(b, ratio),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "| {}, {} of {} | {} | {} | {} | {} |",
            m.label,
            row.pick.name(),
            m.berth.values().len().max(m.containerd.values().len()),
            cell(berth),
            cell(containerd),
            ratio.map_or_else(
                || "–".to_string(),
                |r| if r < 0.1 {
                    format!("{r:.3}")
                } else {
                    format!("{r:.2}")
                }
            ),
            target
        );
    }
    out
}
