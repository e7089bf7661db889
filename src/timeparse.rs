//! Timestamps accepted by `index shortlist START END`: RFC 3339, `YYYY-MM-DD` (local midnight;
//! as an END, the end of that day), `YYYY-MM-DD HH:MM:SS` (local time) and `@SECONDS` (Unix).

use chrono::{DateTime, Local, NaiveDate, NaiveDateTime, TimeZone};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "bad time {input:?}: {why} (use RFC 3339, YYYY-MM-DD, \"YYYY-MM-DD HH:MM:SS\" or @SECONDS)"
)]
pub struct TimeError {
    pub input: String,
    pub why: String,
}

/// Which end of a range a time is for: a bare date means the whole day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    Start,
    End,
}

fn err(input: &str, why: &str) -> TimeError {
    TimeError {
        input: input.chars().take(64).collect(),
        why: why.to_string(),
    }
}

fn local_ns(input: &str, dt: NaiveDateTime) -> Result<i64, TimeError> {
    let t = Local
        .from_local_datetime(&dt)
        .earliest()
        .ok_or_else(|| err(input, "that local time does not exist (DST gap)"))?;
    Ok(saturating_ns(t.timestamp(), t.timestamp_subsec_nanos()))
}

/// Nanoseconds since the epoch, clamped to what an i64 holds (years ~1678..2262): a range bound
/// beyond that still means "everything before/after".
fn saturating_ns(secs: i64, nanos: u32) -> i64 {
    secs.checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(nanos as i64))
        .unwrap_or(if secs < 0 { i64::MIN } else { i64::MAX })
}

/// Parse into nanoseconds since the Unix epoch.
pub fn parse_time(input: &str, bound: Bound) -> Result<i64, TimeError> {
    let s = input.trim();
    if s.is_empty() || s.len() > 64 {
        return Err(err(input, "empty or too long"));
    }
    if let Some(secs) = s.strip_prefix('@') {
        let (whole, frac) = match secs.split_once('.') {
            Some((w, f)) => (w, Some(f)),
            None => (secs, None),
        };
        let w: i64 = whole
            .parse()
            .map_err(|_| err(input, "not a number of seconds"))?;
        let mut ns = w
            .checked_mul(1_000_000_000)
            .ok_or_else(|| err(input, "out of range"))?;
        if let Some(f) = frac {
            if f.is_empty() || f.len() > 9 || !f.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(input, "bad fraction of a second"));
            }
            let frac_ns: i64 = format!("{f:0<9}")
                .parse()
                .map_err(|_| err(input, "bad fraction"))?;
            ns = if w < 0 { ns - frac_ns } else { ns + frac_ns };
        }
        return Ok(ns);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(saturating_ns(t.timestamp(), t.timestamp_subsec_nanos()));
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S",
    ] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(s, fmt) {
            return local_ns(input, dt);
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        let dt = match bound {
            Bound::Start => d.and_hms_opt(0, 0, 0),
            Bound::End => d.and_hms_nano_opt(23, 59, 59, 999_999_999),
        }
        .ok_or_else(|| err(input, "bad date"))?;
        return local_ns(input, dt);
    }
    Err(err(input, "unrecognised format"))
}

/// Parse a START/END pair; START after END is an error.
pub fn parse_range(start: &str, end: &str) -> Result<(i64, i64), TimeError> {
    let a = parse_time(start, Bound::Start)?;
    let b = parse_time(end, Bound::End)?;
    if a > b {
        return Err(err(start, "START is after END"));
    }
    Ok((a, b))
}

/// RFC 3339 in UTC for output.
pub fn format_ns(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let sub = ns.rem_euclid(1_000_000_000) as u32;
    match DateTime::from_timestamp(secs, sub) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        None => format!("@{secs}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formats() {
        assert_eq!(parse_time("@0", Bound::Start).unwrap(), 0);
        assert_eq!(
            parse_time("@1700000000", Bound::Start).unwrap(),
            1_700_000_000_000_000_000
        );
        assert_eq!(parse_time("@1.5", Bound::Start).unwrap(), 1_500_000_000);
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z", Bound::Start).unwrap(),
            1_700_000_000_000_000_000
        );
        assert_eq!(
            parse_time("2023-11-14T23:13:20+01:00", Bound::Start).unwrap(),
            1_700_000_000_000_000_000
        );
        let d0 = parse_time("2024-01-01", Bound::Start).unwrap();
        let d1 = parse_time("2024-01-01", Bound::End).unwrap();
        assert_eq!(d1 - d0, 86_400_000_000_000 - 1);
        let t = parse_time("2024-01-01 00:00:00", Bound::Start).unwrap();
        assert_eq!(t, d0);
        for bad in [
            "",
            "yesterday",
            "2024-13-01",
            "@x",
            "@1.",
            "@1.1234567890",
            "2024-01-01 25:00:00",
            &"9".repeat(100),
        ] {
            assert!(parse_time(bad, Bound::Start).is_err(), "{bad:?}");
        }
        assert!(parse_range("@10", "@5").is_err());
        assert_eq!(format_ns(1_700_000_000_000_000_000), "2023-11-14T22:13:20Z");
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,80}") {
            let _ = parse_time(&s, Bound::Start);
            let _ = parse_time(&s, Bound::End);
        }

        #[test]
        fn unix_roundtrip(secs in -9_000_000_000i64..9_000_000_000) {
            let ns = parse_time(&format!("@{secs}"), Bound::Start).unwrap();
            prop_assert_eq!(ns, secs * 1_000_000_000);
            let back = parse_time(&format_ns(ns), Bound::Start).unwrap();
            prop_assert_eq!(back, ns);
        }
    }
}
