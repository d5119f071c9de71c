//! Report helpers every benchmark of `densevm bench` shares: the min / median /
//! max [`Spread`] of a figure over interleaved repetitions, ratios that tolerate
//! a missing or zero side, and the cells and verdicts of the printed tables.

use serde::Serialize;

/// Smallest, median and largest of a metric over the repetitions.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    /// Smallest.
    pub min: f64,
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Largest.
    pub max: f64,
    /// Repetitions that measured it.
    pub n: usize,
}

/// The spread of the measured values (`None` when none was measured; values
/// that are missing or not finite are left out).
pub fn spread(values: impl IntoIterator<Item = Option<f64>>) -> Option<Spread> {
    let mut v: Vec<f64> = values.into_iter().flatten().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some(Spread { min: v[0], median, max: v[n - 1], n })
}

/// `a / b` when both were measured, are finite and `b` is positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    a.zip(b).filter(|&(a, b)| b > 0.0 && a.is_finite() && b.is_finite()).map(|(a, b)| a / b)
}

/// A table cell: `v` with `digits` decimals, or `-` when not measured.
pub fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into())
}

/// A table cell `min / median / max` with `digits` decimals, or `-` when not measured.
pub fn cell(s: Option<Spread>, digits: usize) -> String {
    match s {
        Some(s) => {
            format!("{} / {} / {}", fmt(Some(s.min), digits), fmt(Some(s.median), digits), fmt(Some(s.max), digits))
        }
        None => "-".into(),
    }
}

/// The verdict on a target: met, NOT met, or not measured.
pub fn say(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_min_median_max() {
        let s = spread([Some(3.0), None, Some(1.0), Some(2.0), Some(f64::NAN)]).unwrap();
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 2.0, 3.0, 3));
        let s = spread([Some(4.0), Some(1.0)]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(spread([None]).is_none());
    }

    #[test]
    fn ratio_needs_both_sides() {
        assert_eq!(ratio(Some(10.0), Some(4.0)), Some(2.5));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(ratio(Some(f64::NAN), Some(1.0)), None);
        assert_eq!(fmt(Some(1.234), 2), "1.23");
        assert_eq!(fmt(None, 2), "-");
        assert_eq!((say(Some(true)), say(Some(false)), say(None)), ("met", "NOT met", "not measured"));
    }
}
