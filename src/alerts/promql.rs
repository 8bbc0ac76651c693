//! The PromQL functions the seven alerts use, with Prometheus 2.x semantics, so that the embedded
//! engine and a real Prometheus reach the same verdicts on the same samples.

use crate::core::clock::UnixMillis;

/// `rate()` / `increase()`: Prometheus's extrapolated rate over the samples of one series in the
/// range `[range_start, range_end]`. `None` with fewer than two samples (the series drops out).
pub fn extrapolated_rate(
    points: &[(UnixMillis, f64)],
    range_start: UnixMillis,
    range_end: UnixMillis,
    is_rate: bool,
) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let (first_t, first_v) = points[0];
    let (last_t, last_v) = points[points.len() - 1];
    let mut result = last_v - first_v;
    // Counter resets: add back the value before each drop.
    let mut previous = 0.0;
    for (_, v) in points {
        if *v < previous {
            result += previous;
        }
        previous = *v;
    }
    let mut duration_to_start = (first_t - range_start) as f64 / 1000.0;
    let duration_to_end = (range_end - last_t) as f64 / 1000.0;
    let sampled_interval = (last_t - first_t) as f64 / 1000.0;
    let average_between = sampled_interval / (points.len() - 1) as f64;
    if result > 0.0 && first_v >= 0.0 {
        let duration_to_zero = sampled_interval * (first_v / result);
        if duration_to_zero < duration_to_start {
            duration_to_start = duration_to_zero;
        }
    }
    let threshold = average_between * 1.1;
    let mut extrapolate_to = sampled_interval;
    extrapolate_to += if duration_to_start < threshold {
        duration_to_start
    } else {
        average_between / 2.0
    };
    extrapolate_to += if duration_to_end < threshold {
        duration_to_end
    } else {
        average_between / 2.0
    };
    result *= extrapolate_to / sampled_interval;
    if is_rate {
        result /= (range_end - range_start) as f64 / 1000.0;
    }
    Some(result)
}

/// `histogram_quantile`'s arithmetic lives with the histograms it reads.
pub use crate::core::series::bucket_quantile;

fn kahan_inc(inc: f64, sum: f64, c: f64) -> (f64, f64) {
    let t = sum + inc;
    let c = if sum.abs() >= inc.abs() {
        c + ((sum - t) + inc)
    } else {
        c + ((inc - t) + sum)
    };
    (t, c)
}

/// `predict_linear(v[w], horizon_secs)` at `at`: least squares over the samples, intercept at `at`.
pub fn predict_linear(
    points: &[(UnixMillis, f64)],
    at: UnixMillis,
    horizon_secs: f64,
) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let init_y = points[0].1;
    let mut const_y = true;
    let (mut n, mut sum_x, mut c_x, mut sum_y, mut c_y) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let (mut sum_xy, mut c_xy, mut sum_x2, mut c_x2) = (0.0, 0.0, 0.0, 0.0);
    for (i, (t, v)) in points.iter().enumerate() {
        if const_y && i > 0 && *v != init_y {
            const_y = false;
        }
        n += 1.0;
        let x = (t - at) as f64 / 1e3;
        (sum_x, c_x) = kahan_inc(x, sum_x, c_x);
        (sum_y, c_y) = kahan_inc(*v, sum_y, c_y);
        (sum_xy, c_xy) = kahan_inc(x * v, sum_xy, c_xy);
        (sum_x2, c_x2) = kahan_inc(x * x, sum_x2, c_x2);
    }
    if const_y {
        if init_y.is_infinite() {
            return Some(f64::NAN);
        }
        return Some(init_y);
    }
    let (sum_x, sum_y, sum_xy, sum_x2) = (sum_x + c_x, sum_y + c_y, sum_xy + c_xy, sum_x2 + c_x2);
    let cov_xy = sum_xy - sum_x * sum_y / n;
    let var_x = sum_x2 - sum_x * sum_x / n;
    let slope = cov_xy / var_x;
    let intercept = sum_y / n - slope * sum_x / n;
    Some(slope * horizon_secs + intercept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_matches_prometheus_for_a_steady_counter() {
        // 10 per 15 s, sampled every 15 s, window 1 m ending on a sample: 0.6667/s.
        let points: Vec<_> = (0..5)
            .map(|i| (i * 15_000, (i * 10) as f64 + 100.0))
            .collect();
        let r = extrapolated_rate(&points, 0, 60_000, true).unwrap();
        assert!((r - 10.0 / 15.0).abs() < 1e-12, "{r}");
        assert_eq!(extrapolated_rate(&points[..1], 0, 60_000, true), None);
    }

    #[test]
    fn quantile_interpolates_within_the_bucket() {
        let mut b = vec![(300.0, 0.0), (450.0, 10.0), (f64::INFINITY, 10.0)];
        assert_eq!(bucket_quantile(0.95, &mut b), 300.0 + 150.0 * 0.95);
        let mut only_inf = vec![(300.0, 0.0), (f64::INFINITY, 4.0)];
        assert_eq!(bucket_quantile(0.5, &mut only_inf), 300.0);
    }

    #[test]
    fn predict_linear_extends_the_trend() {
        let points: Vec<_> = (0..=4)
            .map(|i| (i * 60_000, 1000.0 - 10.0 * i as f64))
            .collect();
        let p = predict_linear(&points, 240_000, 3600.0).unwrap();
        assert!((p - (960.0 - 600.0)).abs() < 1e-9, "{p}");
    }
}
