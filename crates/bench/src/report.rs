//! Rows of the result table: ours, the raw limit, their ratio and the
//! verdict; printed as a table and written as JSON.

use serde::Serialize;

use crate::load::Run;

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// The figure the ratio is taken on (a rate, or a latency or size when
    /// the row has no raw limit).
    pub value: f64,
    pub unit: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// Operations (or units) measured, and over how long.
    pub count: u64,
    pub secs: f64,
}

impl Figure {
    pub fn rate(run: &Run, unit: &'static str) -> Figure {
        Figure {
            value: run.rate(),
            unit,
            p50_ms: Some(run.quantile_ms(0.50)),
            p99_ms: Some(run.quantile_ms(0.99)),
            count: run.units,
            secs: run.secs,
        }
    }

    pub fn rate_only(units: u64, secs: f64, unit: &'static str) -> Figure {
        Figure {
            value: if secs > 0.0 { units as f64 / secs } else { 0.0 },
            unit,
            p50_ms: None,
            p99_ms: None,
            count: units,
            secs,
        }
    }

    pub fn plain(value: f64, unit: &'static str) -> Figure {
        Figure {
            value,
            unit,
            p50_ms: None,
            p99_ms: None,
            count: 0,
            secs: 0.0,
        }
    }

    fn show(&self) -> String {
        let mut s = format!("{} {}", human(self.value), self.unit);
        if let (Some(p50), Some(p99)) = (self.p50_ms, self.p99_ms) {
            s.push_str(&format!(" (p50 {p50:.1} / p99 {p99:.1} ms)"));
        }
        s
    }
}

fn human(v: f64) -> String {
    if v >= 100.0 {
        let n = v.round() as u64;
        let digits = n.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    NotBuilt,
    Error,
}

impl Verdict {
    fn show(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::NotBuilt => "not built",
            Verdict::Error => "ERROR",
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: &'static str,
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ours: Option<Figure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<Figure>,
    /// ours / raw on the row's main figure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    pub target: &'static str,
    /// How the row was measured, and anything a reader must know.
    pub note: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Row {
    pub fn not_built(name: &'static str, target: &'static str, why: impl Into<String>) -> Row {
        Row {
            name,
            verdict: Verdict::NotBuilt,
            ours: None,
            raw: None,
            ratio: None,
            target,
            note: why.into(),
            error: None,
        }
    }

    pub fn error(name: &'static str, target: &'static str, e: &anyhow::Error) -> Row {
        Row {
            name,
            verdict: Verdict::Error,
            ours: None,
            raw: None,
            ratio: None,
            target,
            note: String::new(),
            error: Some(format!("{e:#}")),
        }
    }

    /// A row judged on `ours.value / raw.value >= min_ratio` (plus any
    /// extra condition the caller folds into `extra_ok`).
    pub fn ratio(
        name: &'static str,
        target: &'static str,
        ours: Figure,
        raw: Figure,
        min_ratio: f64,
        extra_ok: bool,
        note: impl Into<String>,
    ) -> Row {
        let ratio = ratio(ours.value, raw.value);
        Row {
            name,
            verdict: if ratio >= min_ratio && extra_ok {
                Verdict::Pass
            } else {
                Verdict::Fail
            },
            ours: Some(ours),
            raw: Some(raw),
            ratio: Some(ratio),
            target,
            note: note.into(),
            error: None,
        }
    }
}

impl Row {
    /// A row judged on the p99 latency of `run` being under `limit_ms`
    /// (no raw limit: a fixed bound).
    pub fn p99_under(
        name: &'static str,
        target: &'static str,
        run: &Run,
        limit_ms: f64,
        note: impl Into<String>,
    ) -> Row {
        let p99 = run.quantile_ms(0.99);
        let ours = Figure {
            value: p99,
            unit: "ms p99",
            p50_ms: Some(run.quantile_ms(0.5)),
            p99_ms: Some(p99),
            count: run.ops,
            secs: run.secs,
        };
        let mut row = Row::ratio(
            name,
            target,
            ours,
            Figure::plain(limit_ms, "ms"),
            0.0,
            p99 < limit_ms,
            note,
        );
        row.raw = None;
        row.ratio = None;
        row
    }
}

/// `a / b`, or 0 when `b` is not positive (a raw limit that measured
/// nothing).
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// Prints the table: one line per row, notes below.
pub fn print_table(rows: &[Row]) {
    let head = ["row", "ours", "raw limit", "ratio", "target", "result"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.name.to_owned(),
                r.ours.as_ref().map(Figure::show).unwrap_or_default(),
                r.raw
                    .as_ref()
                    .map(Figure::show)
                    .unwrap_or_else(|| "-".into()),
                r.ratio.map(|x| format!("{x:.2}")).unwrap_or_default(),
                r.target.to_owned(),
                r.verdict.show().to_owned(),
            ]
        })
        .collect();
    let mut width = head.map(str::len);
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |c: [&str; 6]| {
        let mut s = String::new();
        for (i, (cell, w)) in c.iter().zip(width).enumerate() {
            if i > 0 {
                s.push_str(" | ");
            }
            s.push_str(&format!("{cell:<w$}"));
        }
        println!("{}", s.trim_end());
    };
    println!();
    line(head);
    let rule = width.map(|w| "-".repeat(w));
    line(rule.each_ref().map(String::as_str));
    for c in &cells {
        line(c.each_ref().map(String::as_str));
    }
    println!();
    for r in rows {
        if let Some(e) = &r.error {
            println!("{}: error: {e}", r.name);
        }
        if !r.note.is_empty() {
            println!("{}: {}", r.name, r.note);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_at_a_glance() {
        assert_eq!(human(1234567.4), "1,234,567");
        assert_eq!(human(123.4), "123");
        assert_eq!(human(12.34), "12.3");
        assert_eq!(human(0.5), "0.50");
    }

    #[test]
    fn a_row_passes_on_its_ratio() {
        let ours = Figure::plain(60.0, "ops/s");
        let raw = Figure::plain(100.0, "ops/s");
        let row = Row::ratio("r", "t", ours.clone(), raw.clone(), 0.5, true, "");
        assert_eq!(row.verdict, Verdict::Pass);
        let row = Row::ratio("r", "t", ours, raw, 0.7, true, "");
        assert_eq!(row.verdict, Verdict::Fail);
    }
}
