//! Prometheus-style durations (`30s`, `5m`, `1h30m`), as written in rules and in `hypertool.toml`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration in whole milliseconds, written the Prometheus way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PromDuration(pub i64);

const UNITS: [(&str, i64); 7] = [
    ("y", 365 * 24 * 3_600_000),
    ("w", 7 * 24 * 3_600_000),
    ("d", 24 * 3_600_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

impl PromDuration {
    pub fn secs(s: i64) -> Self {
        Self(s * 1000)
    }

    pub fn mins(m: i64) -> Self {
        Self(m * 60_000)
    }

    pub fn ms(self) -> i64 {
        self.0
    }

    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }

    /// Parses `1h30m`, `5m`, `250ms`, `0s`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let err = || format!("{text:?} is not a duration; write e.g. 30s, 5m, 1h30m");
        if text.is_empty() {
            return Err(err());
        }
        let mut rest = text;
        let mut total: i64 = 0;
        while !rest.is_empty() {
            let digits = rest.chars().take_while(char::is_ascii_digit).count();
            if digits == 0 {
                return Err(err());
            }
            let n: i64 = rest[..digits].parse().map_err(|_| err())?;
            rest = &rest[digits..];
            // "ms" must be tried before "m".
            let unit = ["ms", "y", "w", "d", "h", "m", "s"]
                .into_iter()
                .find(|u| rest.starts_with(u))
                .ok_or_else(err)?;
            let scale = UNITS
                .iter()
                .find(|(u, _)| *u == unit)
                .map(|(_, s)| *s)
                .ok_or_else(err)?;
            total = n
                .checked_mul(scale)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(err)?;
            rest = &rest[unit.len()..];
        }
        Ok(Self(total))
    }
}

impl fmt::Display for PromDuration {
    /// The shortest Prometheus spelling: `90000` ms is `1m30s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0s");
        }
        let mut left = self.0;
        for (unit, scale) in UNITS {
            // Prometheus prints weeks and years only when they divide evenly; keep to h/m/s/ms.
            if matches!(unit, "y" | "w" | "d") {
                continue;
            }
            if left >= scale {
                write!(f, "{}{unit}", left / scale)?;
                left %= scale;
            }
        }
        Ok(())
    }
}

impl Serialize for PromDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for PromDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        PromDuration::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_prometheus_way() {
        assert_eq!(PromDuration::parse("5m"), Ok(PromDuration(300_000)));
        assert_eq!(PromDuration::parse("1h30m"), Ok(PromDuration(5_400_000)));
        assert_eq!(PromDuration::parse("250ms"), Ok(PromDuration(250)));
        assert!(PromDuration::parse("5 minutes").is_err());
        assert!(PromDuration::parse("").is_err());
        assert_eq!(PromDuration(5_400_000).to_string(), "1h30m");
        assert_eq!(PromDuration(600_000).to_string(), "10m");
        assert_eq!(PromDuration(3_600_000).to_string(), "1h");
        assert_eq!(PromDuration(1_500).to_string(), "1s500ms");
    }
}
