//! Postgres' three-field interval and its ISO 8601 text form.

use std::fmt;

use super::temporal::{parse_fraction, write_fraction, MICROS_PER_SECOND};
use super::{invalid, ValueError};

/// Postgres' three-field interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interval {
    /// Whole months.
    pub months: i32,
    /// Whole days (not folded into months: a day is not always 24 hours).
    pub days: i32,
    /// Microseconds.
    pub micros: i64,
}

impl Interval {
    /// Parses the ISO 8601 form `IntervalStyle=iso_8601` prints: `P1Y2M3DT4H5M6.5S`, `PT0S`,
    /// each field with its own sign.
    pub fn parse(text: &str) -> Result<Interval, ValueError> {
        let bad = || invalid("interval", "expected ISO 8601 (P1Y2M3DT4H5M6S)");
        let rest = text.strip_prefix('P').ok_or_else(bad)?;
        let (date_part, time_part) = match rest.split_once('T') {
            Some((d, t)) => (d, Some(t)),
            None => (rest, None),
        };
        let mut interval = Interval::default();
        for (number, unit) in fields(date_part).ok_or_else(bad)? {
            let n: i64 = number.parse().map_err(|_| bad())?;
            let n32 = |v: i64| i32::try_from(v).map_err(|_| invalid("interval", "field out of range"));
            match unit {
                'Y' => {
                    interval.months = interval
                        .months
                        .checked_add(n32(n.checked_mul(12).ok_or_else(bad)?)?)
                        .ok_or_else(bad)?
                }
                'M' => interval.months = interval.months.checked_add(n32(n)?).ok_or_else(bad)?,
                'W' => {
                    interval.days =
                        interval.days.checked_add(n32(n.checked_mul(7).ok_or_else(bad)?)?).ok_or_else(bad)?
                }
                'D' => interval.days = interval.days.checked_add(n32(n)?).ok_or_else(bad)?,
                _ => return Err(bad()),
            }
        }
        for (number, unit) in time_part.map(fields).unwrap_or(Some(Vec::new())).ok_or_else(bad)? {
            let micros = match unit {
                'H' => number.parse::<i64>().ok().and_then(|h| h.checked_mul(3600 * MICROS_PER_SECOND)),
                'M' => number.parse::<i64>().ok().and_then(|m| m.checked_mul(60 * MICROS_PER_SECOND)),
                'S' => parse_signed_seconds(number),
                _ => None,
            };
            interval.micros = micros.and_then(|m| interval.micros.checked_add(m)).ok_or_else(bad)?;
        }
        Ok(interval)
    }
}

/// Splits `1Y-2M3D` into `[("1",'Y'), ("-2",'M'), ("3",'D')]`.
fn fields(text: &str) -> Option<Vec<(&str, char)>> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if c.is_ascii_alphabetic() {
            if i == start {
                return None;
            }
            out.push((&text[start..i], c));
            start = i + 1;
        }
    }
    (start == text.len()).then_some(out)
}

/// `-6.5` as microseconds.
fn parse_signed_seconds(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let micros =
        whole.parse::<i64>().ok()?.checked_mul(MICROS_PER_SECOND)?.checked_add(parse_fraction(frac)?)?;
    Some(if negative { -micros } else { micros })
}

impl fmt::Display for Interval {
    /// As `IntervalStyle=iso_8601` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.months == 0 && self.days == 0 && self.micros == 0 {
            return f.write_str("PT0S");
        }
        f.write_str("P")?;
        let (years, months) = (self.months / 12, self.months % 12);
        if years != 0 {
            write!(f, "{years}Y")?;
        }
        if months != 0 {
            write!(f, "{months}M")?;
        }
        if self.days != 0 {
            write!(f, "{}D", self.days)?;
        }
        if self.micros != 0 {
            f.write_str("T")?;
            let hours = self.micros / (3600 * MICROS_PER_SECOND);
            let minutes = self.micros / (60 * MICROS_PER_SECOND) % 60;
            let micros = self.micros % (60 * MICROS_PER_SECOND);
            if hours != 0 {
                write!(f, "{hours}H")?;
            }
            if minutes != 0 {
                write!(f, "{minutes}M")?;
            }
            if micros != 0 {
                if micros < 0 {
                    f.write_str("-")?;
                }
                let abs = micros.abs();
                write!(f, "{}", abs / MICROS_PER_SECOND)?;
                write_fraction(f, abs % MICROS_PER_SECOND)?;
                f.write_str("S")?;
            }
        }
        Ok(())
    }
}
