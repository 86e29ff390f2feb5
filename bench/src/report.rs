//! Results: rows of (scenario, metric, value), each optionally tied to its ceiling (a baseline
//! figure measured in the same run) and to the target; printed as a table and as one
//! JSON line.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// Whether larger or smaller is better, for a target's check.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    AtMost(f64),
    Below(f64),
    /// value / ceiling at least this.
    RatioAtLeast(f64),
    Zero,
}

#[derive(Clone, Debug)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub value: f64,
    pub unit: &'static str,
    /// Key of the ceiling this figure is compared with.
    pub ceiling: Option<String>,
    pub goal: Option<Goal>,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Ceilings by key, from the baseline scenario.
    pub ceilings: BTreeMap<String, f64>,
    /// Scenario failures: errors, lost events. Any makes the run exit non-zero.
    pub failures: Vec<String>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn add(&mut self, scenario: &str, metric: &str, value: f64, unit: &'static str) -> &mut Row {
        self.rows.push(Row {
            scenario: scenario.into(),
            metric: metric.into(),
            value,
            unit,
            ceiling: None,
            goal: None,
        });
        let last = self.rows.len() - 1;
        &mut self.rows[last]
    }

    pub fn ceiling(&mut self, key: &str, value: f64) {
        self.ceilings.insert(key.into(), value);
    }

    pub fn fail(&mut self, what: String) {
        self.failures.push(what);
    }

    fn ratio(&self, row: &Row) -> Option<f64> {
        let c = *self.ceilings.get(row.ceiling.as_ref()?)?;
        (c != 0.0).then(|| row.value / c)
    }

    fn met(&self, row: &Row) -> Option<bool> {
        Some(match row.goal? {
            Goal::AtMost(t) => row.value <= t,
            Goal::Below(t) => row.value < t,
            Goal::Zero => row.value == 0.0,
            Goal::RatioAtLeast(t) => self.ratio(row)? >= t,
        })
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<9} {:<26} {:>14} {:<6} {:>14} {:>7} {:<18} {}\n",
            "scenario", "metric", "value", "unit", "ceiling", "ratio", "target", "met"
        );
        for row in &self.rows {
            let ceiling = row
                .ceiling
                .as_ref()
                .and_then(|k| self.ceilings.get(k))
                .map_or("-".into(), |c| fmt_num(*c));
            let ratio = self.ratio(row).map_or("-".into(), |r| format!("{r:.3}"));
            let target = row.goal.map_or("-".into(), |g| match g {
                Goal::AtMost(t) => format!("<= {}", fmt_num(t)),
                Goal::Below(t) => format!("< {}", fmt_num(t)),
                Goal::RatioAtLeast(t) => format!("ratio >= {t}"),
                Goal::Zero => "0".into(),
            });
            let met = self.met(row).map_or("-", |m| if m { "yes" } else { "NO" });
            out += &format!(
                "{:<9} {:<26} {:>14} {:<6} {:>14} {:>7} {:<18} {}\n",
                row.scenario,
                row.metric,
                fmt_num(row.value),
                row.unit,
                ceiling,
                ratio,
                target,
                met
            );
        }
        for note in &self.notes {
            out += &format!("note: {note}\n");
        }
        for f in &self.failures {
            out += &format!("FAILED: {f}\n");
        }
        out
    }

    pub fn json(&self, header: Value) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                json!({
                    "scenario": r.scenario,
                    "metric": r.metric,
                    "value": r.value,
                    "unit": r.unit,
                    "ceiling": r.ceiling.as_ref().and_then(|k| self.ceilings.get(k)),
                    "ratio": self.ratio(r),
                    "met": self.met(r),
                })
            })
            .collect();
        json!({
            "editiond_bench": header,
            "rows": rows,
            "notes": self.notes,
            "failures": self.failures,
        })
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}
