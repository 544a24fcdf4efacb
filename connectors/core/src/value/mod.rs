//! Typed column values and their decoding from pgoutput's text format.
//!
//! The replication session runs with `DateStyle=ISO`, `IntervalStyle=iso_8601`, `TimeZone=UTC`,
//! `bytea_output=hex` and `extra_float_digits=3` (see `client.rs`), so each type has exactly one
//! text form to parse. Temporal values are kept the way Postgres stores them (days or
//! microseconds since 2000-01-01, infinities as the extreme values), numerics as their exact
//! decimal text: nothing is rounded on the way through. `Display` prints the text Postgres
//! prints for the same value under those settings.
//!
//! `text.rs` decodes the text forms, `temporal.rs` holds the date and time types, `interval.rs` the
//! interval type.

use std::fmt;

mod interval;
mod temporal;
mod text;

pub use interval::Interval;
pub use temporal::{Date, Time, Timestamp};

/// One column value of a row. Variants without a comment hold the Postgres type they name.
#[derive(Clone, Debug, PartialEq)]
#[expect(missing_docs, reason = "uncommented variants are the Postgres type they name")]
pub enum Value {
    /// SQL NULL.
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
        /// The column's type.
        type_oid: u32,
        /// The value as the type's output function printed it.
        text: String,
    },
    /// A type sluice does not decode, received in pgoutput's binary format (`binary = true`):
    /// the type's send-function bytes and type OID.
    UnknownBinary {
        /// The column's type.
        type_oid: u32,
        /// The type's send-function bytes.
        bytes: Vec<u8>,
    },
}

/// An exact decimal. Finite values keep the server's text (any precision, trailing zeros of the scale).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Numeric {
    /// A finite value's text, as the server printed it.
    Finite(String),
    /// `NaN`.
    NaN,
    /// `Infinity`.
    Infinity,
    /// `-Infinity`.
    NegativeInfinity,
}

/// Text the decoder could not read as the column's type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode {type_name} value: {reason}")]
pub struct ValueError {
    /// The type the text was read as.
    pub type_name: &'static str,
    /// What is wrong with the text (never the text itself: it may be personal data).
    pub reason: String,
}

fn invalid(type_name: &'static str, reason: impl Into<String>) -> ValueError {
    ValueError { type_name, reason: reason.into() }
}

impl Numeric {
    /// Reads the server's text form of a numeric; checks it is one.
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

/// Key values' identity as text, for maps and sets of keys: each value's type and its text
/// (what Postgres prints), length-prefixed, so that no two different keys read the same.
pub fn key_identity<'a>(values: impl IntoIterator<Item = &'a Value>) -> String {
    use fmt::Write;
    let mut text = String::new();
    for value in values {
        let shown = value.to_string();
        let _ = write!(text, "{}:{}:{shown}", value.type_tag(), shown.len());
    }
    text
}

impl Value {
    /// A short name of the value's type, for identities.
    fn type_tag(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int2(_) | Value::Int4(_) | Value::Int8(_) => "int",
            Value::Float4(_) | Value::Float8(_) => "float",
            Value::Numeric(_) => "numeric",
            Value::Text(_) => "text",
            Value::Bytea(_) => "bytea",
            Value::Uuid(_) => "uuid",
            Value::Json(_) => "json",
            Value::Date(_) => "date",
            Value::Time(_) => "time",
            Value::Timestamp(_) => "timestamp",
            Value::TimestampTz(_) => "timestamptz",
            Value::Interval(_) => "interval",
            Value::Enum(_) => "enum",
            Value::Array(_) => "array",
            Value::Unknown { .. } => "unknown",
            Value::UnknownBinary { .. } => "unknown-binary",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::TypeKind;
    use proptest::prelude::*;

    fn round_trip(kind: &TypeKind, text: &str) -> String {
        kind.decode_text(0, text).unwrap().to_string()
    }

    #[test]
    fn key_identities_tell_keys_apart() {
        let text = |s: &str| Value::Text(s.into());
        assert_ne!(key_identity(&[text("1:b"), text("")]), key_identity(&[text("1"), text("b:")]));
        assert_ne!(key_identity(&[Value::Int8(1)]), key_identity(&[text("1")]));
        assert_eq!(key_identity(&[Value::Int4(7)]), key_identity(&[Value::Int8(7)]));
    }

    // Found by the fuzzer's corpus replayed in a debug build (tests/fuzz/corpus/text_value):
    // thousands of `{` overflowed the stack; a year of 19 digits overflowed the day count.
    #[test]
    fn nesting_and_years_beyond_postgres_limits_are_refused() {
        let ints = TypeKind::Array { element: Box::new(TypeKind::Int4), element_oid: 23, delimiter: b',' };
        assert_eq!(round_trip(&ints, "{{{{{{1}}}}}}"), "{{{{{{1}}}}}}");
        assert!(ints.decode_text(0, &"{".repeat(100_000)).is_err());
        assert!(ints.decode_text(0, "{{{{{{{1}}}}}}}").is_err());
        assert!(TypeKind::Date.decode_text(0, "9223372036854775807-01-01").is_err());
        assert!(TypeKind::Timestamp.decode_text(0, "5874898-01-01 00:00:00").is_err());
        assert!(TypeKind::Date.decode_text(0, "5874898-01-01").is_err());
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
