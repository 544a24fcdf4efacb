//! Typed column values and their decoding from pgoutput's text format.
//!
//! The replication session runs with `DateStyle=ISO`, `IntervalStyle=iso_8601`, `TimeZone=UTC`,
//! `bytea_output=hex` and `extra_float_digits=3` (see `client.rs`), so each type has exactly one
//! text form to parse. Temporal values are kept the way Postgres stores them (days or
//! microseconds since 2000-01-01, infinities as the extreme values), numerics as their exact
//! decimal text: nothing is rounded on the way through. `Display` prints the text Postgres
//! prints for the same value under those settings.

use std::fmt;

use crate::types::TypeKind;

/// One column value of a row.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Float4(f32),
    Float8(f64),
    Numeric(Numeric),
    /// text, varchar, bpchar (blank-padded as stored), name.
    Text(String),
    Bytea(Vec<u8>),
    Uuid([u8; 16]),
    /// json or jsonb, as the server printed it (valid JSON text).
    Json(String),
    Date(Date),
    Time(Time),
    Timestamp(Timestamp),
    TimestampTz(Timestamp),
    Interval(Interval),
    /// An enum label.
    Enum(String),
    /// A one- or multi-dimensional array; inner dimensions are nested arrays.
    Array(Vec<Value>),
    /// A type sluice does not decode: its text form and type OID, passed on unchanged.
    Unknown {
        type_oid: u32,
        text: String,
    },
    /// A type sluice does not decode, received in pgoutput's binary format (`binary = true`):
    /// the type's send-function bytes and type OID.
    UnknownBinary {
        type_oid: u32,
        bytes: Vec<u8>,
    },
}

/// An exact decimal. Finite values keep the server's text (any precision, trailing zeros of the scale).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Numeric {
    Finite(String),
    NaN,
    Infinity,
    NegativeInfinity,
}

/// Days since 2000-01-01; `i32::MIN` and `i32::MAX` are `-infinity` and `infinity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date(pub i32);

/// Microseconds since midnight, 0 to 24:00:00 inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time(pub i64);

/// Microseconds since 2000-01-01 00:00:00 (UTC for timestamptz); `i64::MIN`/`i64::MAX` are the infinities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

/// Postgres' three-field interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interval {
    pub months: i32,
    pub days: i32,
    pub micros: i64,
}

/// Text the decoder could not read as the column's type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode {type_name} value: {reason}")]
pub struct ValueError {
    pub type_name: &'static str,
    pub reason: String,
}

fn invalid(type_name: &'static str, reason: impl Into<String>) -> ValueError {
    ValueError { type_name, reason: reason.into() }
}

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;
/// Days from 1970-01-01 to 2000-01-01.
const UNIX_TO_PG_DAYS: i64 = 10_957;

impl TypeKind {
    /// Decodes the text form of a value of this type.
    pub fn decode_text(&self, type_oid: u32, text: &str) -> Result<Value, ValueError> {
        Ok(match self {
            TypeKind::Bool => match text {
                "t" => Value::Bool(true),
                "f" => Value::Bool(false),
                _ => return Err(invalid("bool", "expected t or f")),
            },
            TypeKind::Int2 => Value::Int2(text.parse().map_err(|_| invalid("int2", "not a 16-bit integer"))?),
            TypeKind::Int4 => Value::Int4(text.parse().map_err(|_| invalid("int4", "not a 32-bit integer"))?),
            TypeKind::Int8 => Value::Int8(text.parse().map_err(|_| invalid("int8", "not a 64-bit integer"))?),
            TypeKind::Float4 => Value::Float4(text.parse().map_err(|_| invalid("float4", "not a number"))?),
            TypeKind::Float8 => Value::Float8(text.parse().map_err(|_| invalid("float8", "not a number"))?),
            TypeKind::Numeric => Value::Numeric(Numeric::parse(text)?),
            TypeKind::Text => Value::Text(text.to_owned()),
            TypeKind::Bytea => Value::Bytea(decode_bytea_hex(text)?),
            TypeKind::Uuid => Value::Uuid(decode_uuid(text)?),
            TypeKind::Json | TypeKind::Jsonb => Value::Json(text.to_owned()),
            TypeKind::Date => Value::Date(Date::parse(text)?),
            TypeKind::Time => Value::Time(Time::parse(text)?),
            TypeKind::Timestamp => Value::Timestamp(Timestamp::parse(text, false)?),
            TypeKind::TimestampTz => Value::TimestampTz(Timestamp::parse(text, true)?),
            TypeKind::Interval => Value::Interval(Interval::parse(text)?),
            TypeKind::Enum => Value::Enum(text.to_owned()),
            TypeKind::Array { element, element_oid, delimiter } => {
                Value::Array(parse_array(text, *delimiter, &mut |item| {
                    element.decode_text(*element_oid, item)
                })?)
            }
            TypeKind::Unknown => Value::Unknown { type_oid, text: text.to_owned() },
        })
    }
}

impl Numeric {
    pub fn parse(text: &str) -> Result<Numeric, ValueError> {
        match text {
            "NaN" => return Ok(Numeric::NaN),
            "Infinity" => return Ok(Numeric::Infinity),
            "-Infinity" => return Ok(Numeric::NegativeInfinity),
            _ => {}
        }
        let digits = text.strip_prefix('-').unwrap_or(text);
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty()
            || !all_digits(int)
            || !all_digits(frac)
            || (digits.contains('.') && frac.is_empty())
        {
            return Err(invalid("numeric", "not a decimal number"));
        }
        Ok(Numeric::Finite(text.to_owned()))
    }
}

impl fmt::Display for Numeric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Numeric::Finite(text) => f.write_str(text),
            Numeric::NaN => f.write_str("NaN"),
            Numeric::Infinity => f.write_str("Infinity"),
            Numeric::NegativeInfinity => f.write_str("-Infinity"),
        }
    }
}

fn decode_bytea_hex(text: &str) -> Result<Vec<u8>, ValueError> {
    let hex = text.strip_prefix("\\x").ok_or_else(|| invalid("bytea", "expected hex format (\\x…)"))?;
    if hex.len() % 2 != 0 {
        return Err(invalid("bytea", "odd number of hex digits"));
    }
    hex.as_bytes()
        .chunks_exact(2)
        .map(|pair| Ok(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?))
        .collect::<Result<_, _>>()
        .map_err(|()| invalid("bytea", "invalid hex digit"))
}

fn hex_digit(b: u8) -> Result<u8, ()> {
    match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        b'A'..=b'F' => Ok(b - b'A' + 10),
        _ => Err(()),
    }
}

fn decode_uuid(text: &str) -> Result<[u8; 16], ValueError> {
    let hex: Vec<u8> = text.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 {
        return Err(invalid("uuid", "expected 32 hex digits"));
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = (hex_digit(pair[0]).and_then(|h| hex_digit(pair[1]).map(|l| h << 4 | l)))
            .map_err(|()| invalid("uuid", "invalid hex digit"))?;
    }
    Ok(out)
}

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
    pub const NEG_INFINITY: Date = Date(i32::MIN);
    pub const INFINITY: Date = Date(i32::MAX);

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
        i32::try_from(days).map(Date).map_err(|_| invalid("date", "out of range"))
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
fn parse_fraction(frac: &str) -> Option<i64> {
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

fn write_fraction(f: &mut fmt::Formatter<'_>, frac: i64) -> fmt::Result {
    if frac != 0 {
        let text = format!("{frac:06}");
        write!(f, ".{}", text.trim_end_matches('0'))?;
    }
    Ok(())
}

impl Time {
    pub fn parse(text: &str) -> Result<Time, ValueError> {
        let micros = parse_hms(text, "time")?;
        if micros > MICROS_PER_DAY {
            return Err(invalid("time", "after 24:00:00"));
        }
        Ok(Time(micros))
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hms(f, self.0)
    }
}

impl Timestamp {
    pub const NEG_INFINITY: Timestamp = Timestamp(i64::MIN);
    pub const INFINITY: Timestamp = Timestamp(i64::MAX);

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
        Ok(Timestamp(micros))
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

/// Parses the text form of an array: `{1,2,NULL}`, `{{1,2},{3,4}}`, `{"a b","c\"d"}`, with an
/// optional bounds decoration (`[0:1]={…}`) which is skipped.
fn parse_array(
    text: &str,
    delimiter: u8,
    element: &mut dyn FnMut(&str) -> Result<Value, ValueError>,
) -> Result<Vec<Value>, ValueError> {
    let body = match text.find("={") {
        Some(at) if text.starts_with('[') => &text[at + 1..],
        _ => text,
    };
    let mut parser = ArrayParser { bytes: body.as_bytes(), pos: 0, delimiter };
    let values = parser.parse_level(element)?;
    if parser.pos != parser.bytes.len() {
        return Err(invalid("array", "trailing characters"));
    }
    Ok(values)
}

struct ArrayParser<'a> {
    bytes: &'a [u8],
    pos: usize,
    delimiter: u8,
}

impl ArrayParser<'_> {
    fn expect(&mut self, b: u8) -> Result<(), ValueError> {
        if self.bytes.get(self.pos) == Some(&b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(invalid("array", format!("expected {:?} at offset {}", b as char, self.pos)))
        }
    }

    fn parse_level(
        &mut self,
        element: &mut dyn FnMut(&str) -> Result<Value, ValueError>,
    ) -> Result<Vec<Value>, ValueError> {
        self.expect(b'{')?;
        let mut values = Vec::new();
        if self.bytes.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            return Ok(values);
        }
        loop {
            let value = match self.bytes.get(self.pos) {
                Some(b'{') => Value::Array(self.parse_level(element)?),
                Some(b'"') => element(&self.quoted()?)?,
                Some(_) => {
                    let start = self.pos;
                    while let Some(&b) = self.bytes.get(self.pos) {
                        if b == self.delimiter || b == b'}' {
                            break;
                        }
                        self.pos += 1;
                    }
                    let raw = std::str::from_utf8(&self.bytes[start..self.pos])
                        .map_err(|_| invalid("array", "invalid UTF-8"))?;
                    if raw.eq_ignore_ascii_case("NULL") {
                        Value::Null
                    } else {
                        element(raw)?
                    }
                }
                None => return Err(invalid("array", "unterminated")),
            };
            values.push(value);
            match self.bytes.get(self.pos) {
                Some(&b) if b == self.delimiter => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(values);
                }
                _ => return Err(invalid("array", "expected a delimiter or '}'")),
            }
        }
    }

    fn quoted(&mut self) -> Result<String, ValueError> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            match self.bytes.get(self.pos) {
                Some(b'\\') => {
                    let escaped = *self
                        .bytes
                        .get(self.pos + 1)
                        .ok_or_else(|| invalid("array", "unterminated escape"))?;
                    out.push(escaped);
                    self.pos += 2;
                }
                Some(b'"') => {
                    self.pos += 1;
                    return String::from_utf8(out).map_err(|_| invalid("array", "invalid UTF-8"));
                }
                Some(&b) => {
                    out.push(b);
                    self.pos += 1;
                }
                None => return Err(invalid("array", "unterminated quoted element")),
            }
        }
    }
}

impl fmt::Display for Value {
    /// The value's text as Postgres prints it under the replication session's settings.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Bool(b) => f.write_str(if *b { "t" } else { "f" }),
            Value::Int2(v) => write!(f, "{v}"),
            Value::Int4(v) => write!(f, "{v}"),
            Value::Int8(v) => write!(f, "{v}"),
            Value::Float4(v) => write_float(f, *v as f64, v.is_finite(), 6, &v.to_string()),
            Value::Float8(v) => write_float(f, *v, v.is_finite(), 15, &v.to_string()),
            Value::Numeric(n) => write!(f, "{n}"),
            Value::Text(s) | Value::Json(s) | Value::Enum(s) => f.write_str(s),
            Value::Unknown { text, .. } => f.write_str(text),
            Value::Bytea(bytes) | Value::UnknownBinary { bytes, .. } => {
                f.write_str("\\x")?;
                bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
            Value::Uuid(b) => write!(
                f,
                "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
                b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
            ),
            Value::Date(d) => write!(f, "{d}"),
            Value::Time(t) => write!(f, "{t}"),
            Value::Timestamp(ts) => ts.write_pg(f, false),
            Value::TimestampTz(ts) => ts.write_pg(f, true),
            Value::Interval(i) => write!(f, "{i}"),
            Value::Array(items) => {
                f.write_str("{")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    match item {
                        Value::Array(_) | Value::Null => write!(f, "{item}")?,
                        _ => write_array_element(f, &item.to_string())?,
                    }
                }
                f.write_str("}")
            }
        }
    }
}

/// Quotes an array element the way array_out does.
fn write_array_element(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    let needs_quotes = text.is_empty()
        || text.eq_ignore_ascii_case("NULL")
        || text.bytes().any(|b| {
            matches!(b, b'{' | b'}' | b',' | b'"' | b'\\' | b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
        });
    if !needs_quotes {
        return f.write_str(text);
    }
    f.write_str("\"")?;
    for c in text.chars() {
        if c == '"' || c == '\\' {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

/// Shortest round-trip digits, in exponent form where Postgres uses it (exponent < -4 or ≥ `digits`).
fn write_float(f: &mut fmt::Formatter<'_>, v: f64, finite: bool, digits: i32, shortest: &str) -> fmt::Result {
    if !finite {
        return f.write_str(if v.is_nan() {
            "NaN"
        } else if v > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        });
    }
    if v == 0.0 {
        return f.write_str(if v.is_sign_negative() { "-0" } else { "0" });
    }
    let exponent = v.abs().log10().floor() as i32;
    if exponent < -4 || exponent >= digits {
        let sci = format!("{:e}", shortest.parse::<f64>().unwrap_or(v));
        let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        write!(f, "{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    } else {
        f.write_str(shortest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(kind: &TypeKind, text: &str) -> String {
        kind.decode_text(0, text).unwrap().to_string()
    }

    #[test]
    fn temporal_values_print_as_postgres_does() {
        for text in [
            "2000-01-01",
            "1970-01-01",
            "0044-03-15 BC",
            "5874897-12-31",
            "infinity",
            "-infinity",
            "2024-02-29",
        ] {
            assert_eq!(round_trip(&TypeKind::Date, text), text);
        }
        for text in ["00:00:00", "23:59:59.999999", "24:00:00", "12:30:00.5"] {
            assert_eq!(round_trip(&TypeKind::Time, text), text);
        }
        for text in
            ["2024-05-01 12:00:00", "1999-12-31 23:59:59.000001", "0001-01-01 00:00:00 BC", "infinity"]
        {
            assert_eq!(round_trip(&TypeKind::Timestamp, text), text);
        }
        assert_eq!(
            round_trip(&TypeKind::TimestampTz, "2024-05-01 12:00:00.25+00"),
            "2024-05-01 12:00:00.25+00"
        );
        assert_eq!(round_trip(&TypeKind::TimestampTz, "2024-05-01 14:30:00+02:30"), "2024-05-01 12:00:00+00");
    }

    #[test]
    fn date_outside_calendar_is_rejected() {
        assert!(Date::parse("2023-02-29").is_err());
        assert!(Date::parse("2023-13-01").is_err());
    }

    #[test]
    fn interval_round_trips_iso_8601() {
        for text in
            ["PT0S", "P1Y2M3DT4H5M6.5S", "P-1Y-2M3DT-4H-5M-6.000001S", "PT-0.5S", "P10D", "PT1000000H"]
        {
            assert_eq!(round_trip(&TypeKind::Interval, text), text);
        }
    }

    #[test]
    fn numeric_keeps_every_digit() {
        let text = "-1234567890123456789012345678901234567890.0123456789";
        assert_eq!(Numeric::parse(text).unwrap(), Numeric::Finite(text.into()));
        assert_eq!(Numeric::parse("NaN").unwrap(), Numeric::NaN);
        assert_eq!(Numeric::parse("-Infinity").unwrap(), Numeric::NegativeInfinity);
        assert!(Numeric::parse("1e5").is_err());
        assert!(Numeric::parse("1.").is_err());
    }

    #[test]
    fn arrays_parse_quotes_nulls_and_dimensions() {
        let text_array =
            TypeKind::Array { element: Box::new(TypeKind::Text), element_oid: 25, delimiter: b',' };
        let value =
            text_array.decode_text(1009, r#"{plain,"with space","quote\"d",NULL,"NULL",""}"#).unwrap();
        assert_eq!(
            value,
            Value::Array(vec![
                Value::Text("plain".into()),
                Value::Text("with space".into()),
                Value::Text("quote\"d".into()),
                Value::Null,
                Value::Text("NULL".into()),
                Value::Text("".into()),
            ])
        );
        assert_eq!(value.to_string(), r#"{plain,"with space","quote\"d",NULL,"NULL",""}"#);
        let int_array =
            TypeKind::Array { element: Box::new(TypeKind::Int4), element_oid: 23, delimiter: b',' };
        assert_eq!(round_trip(&int_array, "{{1,2},{3,4}}"), "{{1,2},{3,4}}");
        assert_eq!(round_trip(&int_array, "{}"), "{}");
        assert!(int_array.decode_text(1007, "{1,2").is_err());
    }

    #[test]
    fn floats_print_as_postgres_does() {
        assert_eq!(Value::Float8(1e300).to_string(), "1e+300");
        assert_eq!(Value::Float8(0.1).to_string(), "0.1");
        assert_eq!(Value::Float8(1.5e-5).to_string(), "1.5e-05");
        assert_eq!(Value::Float8(f64::NEG_INFINITY).to_string(), "-Infinity");
        assert_eq!(Value::Float4(123456.0).to_string(), "123456");
        assert_eq!(Value::Float4(1234567.0).to_string(), "1.234567e+06");
    }

    #[test]
    fn bytea_and_uuid_decode_hex() {
        assert_eq!(TypeKind::Bytea.decode_text(17, "\\x00ff10").unwrap(), Value::Bytea(vec![0, 255, 16]));
        assert!(TypeKind::Bytea.decode_text(17, "\\x0").is_err());
        let uuid = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        assert_eq!(round_trip(&TypeKind::Uuid, uuid), uuid);
    }

    proptest! {
        #[test]
        fn any_date_round_trips(days in -2_451_545i32..2_000_000_000) {
            let date = Date(days);
            prop_assert_eq!(Date::parse(&date.to_string()).unwrap(), date);
        }

        #[test]
        fn any_timestamp_round_trips(micros in -211_813_488_000_000_000i64..9_223_371_331_200_000_000) {
            let ts = Value::TimestampTz(Timestamp(micros));
            prop_assert_eq!(TypeKind::TimestampTz.decode_text(1184, &ts.to_string()).unwrap(), ts);
        }

        #[test]
        fn any_interval_round_trips(months in any::<i32>(), days in any::<i32>(), micros in any::<i64>()) {
            let interval = Interval { months, days, micros };
            prop_assert_eq!(Interval::parse(&interval.to_string()).unwrap(), interval);
        }

        #[test]
        fn any_text_array_round_trips(items in proptest::collection::vec(proptest::option::of(".*"), 0..6)) {
            let value = Value::Array(items.into_iter().map(|i| i.map_or(Value::Null, Value::Text)).collect());
            let kind = TypeKind::Array { element: Box::new(TypeKind::Text), element_oid: 25, delimiter: b',' };
            prop_assert_eq!(kind.decode_text(1009, &value.to_string()).unwrap(), value);
        }

        #[test]
        fn decoders_never_panic_on_garbage(text in ".*") {
            for kind in [TypeKind::Date, TypeKind::Time, TypeKind::Timestamp, TypeKind::TimestampTz, TypeKind::Interval, TypeKind::Numeric, TypeKind::Bytea, TypeKind::Uuid] {
                let _ = kind.decode_text(0, &text);
            }
        }
    }
}
