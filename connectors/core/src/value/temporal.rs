//! Dates, times of day and timestamps, kept as Postgres stores them: days or microseconds since
//! 2000-01-01, the infinities as the extreme values.

use std::fmt;

use super::{invalid, ValueError};

/// Days since 2000-01-01; `i32::MIN` and `i32::MAX` are `-infinity` and `infinity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date(pub i32);

/// Microseconds since midnight, 0 to 24:00:00 inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time(pub i64);

/// Microseconds since 2000-01-01 00:00:00 (UTC for timestamptz); `i64::MIN`/`i64::MAX` are the infinities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

pub(super) const MICROS_PER_SECOND: i64 = 1_000_000;
pub(super) const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;
/// Days from 1970-01-01 to 2000-01-01.
pub(super) const UNIX_TO_PG_DAYS: i64 = 10_957;

/// Days since 1970-01-01 of a proleptic Gregorian date with astronomical year numbering.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of `days_from_civil`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Parses `YYYY-MM-DD` (year of four or more digits) into days since 2000-01-01.
fn parse_ymd(text: &str, bc: bool, type_name: &'static str) -> Result<i64, ValueError> {
    let mut parts = text.splitn(3, '-');
    let (y, m, d) = match (parts.next(), parts.next(), parts.next()) {
        (Some(y), Some(m), Some(d)) => (y, m, d),
        _ => return Err(invalid(type_name, "expected YYYY-MM-DD")),
    };
    let bad = || invalid(type_name, "expected YYYY-MM-DD");
    let year: i64 = y.parse().map_err(|_| bad())?;
    let month: u32 = m.parse().map_err(|_| bad())?;
    let day: u32 = d.parse().map_err(|_| bad())?;
    // Postgres' dates end in 5874897; far larger years would overflow the day count.
    if !(0..=9_999_999).contains(&year) {
        return Err(invalid(type_name, "year out of range"));
    }
    let year = if bc { 1 - year } else { year };
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(invalid(type_name, "month or day out of range"));
    }
    Ok(days_from_civil(year, month, day) - UNIX_TO_PG_DAYS)
}

fn write_ymd(f: &mut fmt::Formatter<'_>, pg_days: i64) -> Result<bool, fmt::Error> {
    let (year, month, day) = civil_from_days(pg_days + UNIX_TO_PG_DAYS);
    let bc = year <= 0;
    let shown = if bc { 1 - year } else { year };
    write!(f, "{shown:04}-{month:02}-{day:02}")?;
    Ok(bc)
}

impl Date {
    /// `-infinity`.
    pub const NEG_INFINITY: Date = Date(i32::MIN);
    /// `infinity`.
    pub const INFINITY: Date = Date(i32::MAX);

    /// A date Postgres can hold: from 4713-11-24 BC (Julian day 0) to 5874897-12-31, or an
    /// infinity.
    pub fn checked(self) -> Result<Date, ValueError> {
        if self == Date::INFINITY
            || self == Date::NEG_INFINITY
            || (-2_451_545..2_145_031_949).contains(&self.0)
        {
            Ok(self)
        } else {
            Err(invalid("date", "out of range"))
        }
    }

    /// Reads the server's ISO text form (`2024-01-31`, BC years, the infinities).
    pub fn parse(text: &str) -> Result<Date, ValueError> {
        match text {
            "infinity" => return Ok(Date::INFINITY),
            "-infinity" => return Ok(Date::NEG_INFINITY),
            _ => {}
        }
        let (ymd, bc) = match text.strip_suffix(" BC") {
            Some(rest) => (rest, true),
            None => (text, false),
        };
        let days = parse_ymd(ymd, bc, "date")?;
        i32::try_from(days).map_err(|_| invalid("date", "out of range")).map(Date)?.checked()
    }

    /// The calendar date (astronomical year, month, day); `None` for the infinities.
    pub fn ymd(self) -> Option<(i64, u32, u32)> {
        (self != Date::INFINITY && self != Date::NEG_INFINITY)
            .then(|| civil_from_days(self.0 as i64 + UNIX_TO_PG_DAYS))
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Date::INFINITY => f.write_str("infinity"),
            Date::NEG_INFINITY => f.write_str("-infinity"),
            Date(days) => {
                if write_ymd(f, days as i64)? {
                    f.write_str(" BC")?;
                }
                Ok(())
            }
        }
    }
}

/// Parses `HH:MM:SS[.ffffff]` into microseconds.
fn parse_hms(text: &str, type_name: &'static str) -> Result<i64, ValueError> {
    let bad = || invalid(type_name, "expected HH:MM:SS[.ffffff]");
    let mut parts = text.splitn(3, ':');
    let (h, m, s) = match (parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(m), Some(s)) => (h, m, s),
        _ => return Err(bad()),
    };
    let hours: i64 = h.parse().map_err(|_| bad())?;
    let minutes: i64 = m.parse().map_err(|_| bad())?;
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    let seconds: i64 = sec.parse().map_err(|_| bad())?;
    let micros = parse_fraction(frac).ok_or_else(bad)?;
    if !(0..=24).contains(&hours) || !(0..60).contains(&minutes) || !(0..=60).contains(&seconds) {
        return Err(invalid(type_name, "time of day out of range"));
    }
    Ok(((hours * 60 + minutes) * 60 + seconds) * MICROS_PER_SECOND + micros)
}

/// Up to six fractional digits as microseconds.
pub(super) fn parse_fraction(frac: &str) -> Option<i64> {
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut micros: i64 = if frac.is_empty() { 0 } else { frac.parse().ok()? };
    for _ in frac.len()..6 {
        micros *= 10;
    }
    Some(micros)
}

fn write_hms(f: &mut fmt::Formatter<'_>, micros: i64) -> fmt::Result {
    let seconds = micros / MICROS_PER_SECOND;
    let frac = micros % MICROS_PER_SECOND;
    write!(f, "{:02}:{:02}:{:02}", seconds / 3600, seconds / 60 % 60, seconds % 60)?;
    write_fraction(f, frac)
}

pub(super) fn write_fraction(f: &mut fmt::Formatter<'_>, frac: i64) -> fmt::Result {
    if frac != 0 {
        let text = format!("{frac:06}");
        write!(f, ".{}", text.trim_end_matches('0'))?;
    }
    Ok(())
}

impl Time {
    /// Reads `HH:MM:SS[.ffffff]`.
    pub fn parse(text: &str) -> Result<Time, ValueError> {
        Time(parse_hms(text, "time")?).checked()
    }

    /// A time of day from 00:00:00 to 24:00:00.
    pub fn checked(self) -> Result<Time, ValueError> {
        if (0..=MICROS_PER_DAY).contains(&self.0) {
            Ok(self)
        } else {
            Err(invalid("time", "outside 00:00:00 to 24:00:00"))
        }
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hms(f, self.0)
    }
}

impl Timestamp {
    /// `-infinity`.
    pub const NEG_INFINITY: Timestamp = Timestamp(i64::MIN);
    /// `infinity`.
    pub const INFINITY: Timestamp = Timestamp(i64::MAX);

    /// A timestamp Postgres can hold: from 4713-11-24 00:00:00 BC to before 294277-01-01, or
    /// an infinity.
    pub fn checked(self, with_zone: bool) -> Result<Timestamp, ValueError> {
        const MIN: i64 = -211_813_488_000_000_000;
        const END: i64 = 9_223_371_331_200_000_000;
        if self == Timestamp::INFINITY || self == Timestamp::NEG_INFINITY || (MIN..END).contains(&self.0) {
            Ok(self)
        } else {
            Err(invalid(if with_zone { "timestamptz" } else { "timestamp" }, "out of range"))
        }
    }

    /// Parses `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]][ BC]`; the offset only `with_zone`.
    pub fn parse(text: &str, with_zone: bool) -> Result<Timestamp, ValueError> {
        let type_name = if with_zone { "timestamptz" } else { "timestamp" };
        match text {
            "infinity" => return Ok(Timestamp::INFINITY),
            "-infinity" => return Ok(Timestamp::NEG_INFINITY),
            _ => {}
        }
        let (text, bc) = match text.strip_suffix(" BC") {
            Some(rest) => (rest, true),
            None => (text, false),
        };
        let (date, time) =
            text.split_once(' ').ok_or_else(|| invalid(type_name, "expected a date and a time"))?;
        let (time, offset_seconds) = if with_zone {
            let sign_at =
                time.rfind(['+', '-']).ok_or_else(|| invalid(type_name, "missing time zone offset"))?;
            (
                &time[..sign_at],
                parse_offset(&time[sign_at..]).ok_or_else(|| invalid(type_name, "bad time zone offset"))?,
            )
        } else {
            (time, 0)
        };
        let days = parse_ymd(date, bc, type_name)?;
        let micros = days
            .checked_mul(MICROS_PER_DAY)
            .and_then(|d| d.checked_add(parse_hms(time, type_name).ok()?))
            .and_then(|t| t.checked_sub(offset_seconds * MICROS_PER_SECOND))
            .ok_or_else(|| invalid(type_name, "out of range"))?;
        Timestamp(micros).checked(with_zone)
    }

    /// Microseconds since 1970-01-01 00:00:00 UTC; `None` for the infinities.
    pub fn unix_micros(self) -> Option<i64> {
        (self != Timestamp::INFINITY && self != Timestamp::NEG_INFINITY)
            .then(|| self.0 + UNIX_TO_PG_DAYS * MICROS_PER_DAY)
    }

    /// Writes the value as Postgres prints it, with `+00` after the time when `with_zone`.
    pub fn write_pg(self, f: &mut fmt::Formatter<'_>, with_zone: bool) -> fmt::Result {
        match self {
            Timestamp::INFINITY => f.write_str("infinity"),
            Timestamp::NEG_INFINITY => f.write_str("-infinity"),
            Timestamp(micros) => {
                let days = micros.div_euclid(MICROS_PER_DAY);
                let bc = write_ymd(f, days)?;
                f.write_str(" ")?;
                write_hms(f, micros.rem_euclid(MICROS_PER_DAY))?;
                if with_zone {
                    f.write_str("+00")?;
                }
                if bc {
                    f.write_str(" BC")?;
                }
                Ok(())
            }
        }
    }

    /// Writes RFC 3339 (`2024-05-01T12:00:00.5Z`, or without the `Z` when `!with_zone`);
    /// the infinities as `infinity` / `-infinity`, BC years as negative astronomical years.
    pub fn write_iso(self, f: &mut impl fmt::Write, with_zone: bool) -> fmt::Result {
        match self {
            Timestamp::INFINITY => f.write_str("infinity"),
            Timestamp::NEG_INFINITY => f.write_str("-infinity"),
            Timestamp(micros) => {
                let (year, month, day) = civil_from_days(micros.div_euclid(MICROS_PER_DAY) + UNIX_TO_PG_DAYS);
                let time = micros.rem_euclid(MICROS_PER_DAY);
                let seconds = time / MICROS_PER_SECOND;
                if year < 0 {
                    write!(f, "-{:04}", -year)?;
                } else {
                    write!(f, "{year:04}")?;
                }
                write!(
                    f,
                    "-{month:02}-{day:02}T{:02}:{:02}:{:02}",
                    seconds / 3600,
                    seconds / 60 % 60,
                    seconds % 60
                )?;
                let frac = time % MICROS_PER_SECOND;
                if frac != 0 {
                    write!(f, ".{}", format!("{frac:06}").trim_end_matches('0'))?;
                }
                if with_zone {
                    f.write_str("Z")?;
                }
                Ok(())
            }
        }
    }
}

/// `+HH`, `+HH:MM` or `+HH:MM:SS` (or `-`) as seconds east of UTC.
fn parse_offset(text: &str) -> Option<i64> {
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    let mut seconds = 0;
    let mut factor = 3600;
    for part in rest.split(':') {
        if factor == 0 || part.len() != 2 {
            return None;
        }
        seconds += part.parse::<i64>().ok()? * factor;
        factor /= 60;
    }
    Some(sign * seconds)
}
