//! Decoding of pgoutput's binary value format (`binary = true`, PG 14+): each type's
//! send-function output. Temporal types are Postgres' own integers, numerics base-10000 digit
//! groups, arrays a header with dimensions followed by length-prefixed elements.

use sluice_core::value::{Date, Interval, Numeric, Time, Timestamp, Value, ValueError};
use sluice_core::TypeKind;

fn invalid(type_name: &'static str, reason: impl Into<String>) -> ValueError {
    ValueError { type_name, reason: reason.into() }
}

fn fixed<const N: usize>(raw: &[u8], type_name: &'static str) -> Result<[u8; N], ValueError> {
    raw.try_into().map_err(|_| invalid(type_name, format!("expected {N} bytes, got {}", raw.len())))
}

fn utf8(raw: &[u8], type_name: &'static str) -> Result<String, ValueError> {
    String::from_utf8(raw.to_vec()).map_err(|_| invalid(type_name, "not UTF-8"))
}

/// Decoding of a type's binary (send function) form.
pub(crate) trait DecodeBinary {
    /// Decodes the binary form of a value of this type.
    fn decode_binary(&self, type_oid: u32, raw: &[u8]) -> Result<Value, ValueError>;
}

impl DecodeBinary for TypeKind {
    fn decode_binary(&self, type_oid: u32, raw: &[u8]) -> Result<Value, ValueError> {
        Ok(match self {
            TypeKind::Bool => Value::Bool(fixed::<1>(raw, "bool")?[0] != 0),
            TypeKind::Int2 => Value::Int2(i16::from_be_bytes(fixed(raw, "int2")?)),
            TypeKind::Int4 => Value::Int4(i32::from_be_bytes(fixed(raw, "int4")?)),
            TypeKind::Int8 => Value::Int8(i64::from_be_bytes(fixed(raw, "int8")?)),
            TypeKind::Float4 => Value::Float4(f32::from_be_bytes(fixed(raw, "float4")?)),
            TypeKind::Float8 => Value::Float8(f64::from_be_bytes(fixed(raw, "float8")?)),
            TypeKind::Numeric => Value::Numeric(decode_numeric(raw)?),
            TypeKind::Text => Value::Text(utf8(raw, "text")?),
            TypeKind::Enum => Value::Enum(utf8(raw, "enum")?),
            TypeKind::Bytea => Value::Bytea(raw.to_vec()),
            TypeKind::Uuid => Value::Uuid(fixed(raw, "uuid")?),
            TypeKind::Json => Value::Json(utf8(raw, "json")?),
            TypeKind::Jsonb => match raw.split_first() {
                Some((1, text)) => Value::Json(utf8(text, "jsonb")?),
                _ => return Err(invalid("jsonb", "unknown jsonb binary version")),
            },
            // Checked against Postgres' ranges: a value out of them would print as text that
            // no Postgres accepts back.
            TypeKind::Date => Value::Date(Date(i32::from_be_bytes(fixed(raw, "date")?)).checked()?),
            TypeKind::Time => Value::Time(Time(i64::from_be_bytes(fixed(raw, "time")?)).checked()?),
            TypeKind::Timestamp => {
                Value::Timestamp(Timestamp(i64::from_be_bytes(fixed(raw, "timestamp")?)).checked(false)?)
            }
            TypeKind::TimestampTz => {
                Value::TimestampTz(Timestamp(i64::from_be_bytes(fixed(raw, "timestamptz")?)).checked(true)?)
            }
            TypeKind::Interval => {
                let b: [u8; 16] = fixed(raw, "interval")?;
                Value::Interval(Interval {
                    micros: i64::from_be_bytes(b[0..8].try_into().expect("8 bytes")),
                    days: i32::from_be_bytes(b[8..12].try_into().expect("4 bytes")),
                    months: i32::from_be_bytes(b[12..16].try_into().expect("4 bytes")),
                })
            }
            TypeKind::Array { element, element_oid, .. } => decode_array(raw, element, *element_oid)?,
            TypeKind::Unknown => Value::UnknownBinary { type_oid, bytes: raw.to_vec() },
        })
    }
}

const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;

/// `ndigits, weight, sign, dscale` then `ndigits` base-10000 groups; printed as numeric_out does.
fn decode_numeric(raw: &[u8]) -> Result<Numeric, ValueError> {
    let word = |i: usize| -> Result<u16, ValueError> {
        raw.get(i * 2..i * 2 + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| invalid("numeric", "too short"))
    };
    let ndigits = word(0)? as usize;
    let weight = word(1)? as i16 as i64;
    let sign = word(2)?;
    let dscale = word(3)? as i64;
    match sign {
        NUMERIC_NAN => return Ok(Numeric::NaN),
        NUMERIC_PINF => return Ok(Numeric::Infinity),
        NUMERIC_NINF => return Ok(Numeric::NegativeInfinity),
        0 | NUMERIC_NEG => {}
        _ => return Err(invalid("numeric", "unknown sign")),
    }
    if raw.len() != 8 + ndigits * 2 {
        return Err(invalid("numeric", "length does not match the digit count"));
    }
    let digits: Vec<u16> = (0..ndigits).map(|i| word(4 + i)).collect::<Result<_, _>>()?;
    if digits.iter().any(|&d| d >= 10_000) {
        return Err(invalid("numeric", "digit group out of range"));
    }
    let group =
        |index: i64| -> u16 { usize::try_from(index).ok().and_then(|i| digits.get(i)).copied().unwrap_or(0) };
    let mut text = String::new();
    if sign == NUMERIC_NEG {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        for index in 0..=weight {
            if index == 0 {
                text.push_str(&group(index).to_string());
            } else {
                text.push_str(&format!("{:04}", group(index)));
            }
        }
    }
    if dscale > 0 {
        text.push('.');
        let mut fraction = String::new();
        let mut index = weight + 1;
        while (fraction.len() as i64) < dscale {
            fraction.push_str(&format!("{:04}", group(index)));
            index += 1;
        }
        fraction.truncate(dscale as usize);
        text.push_str(&fraction);
    }
    Ok(Numeric::Finite(text))
}

/// `ndim, has_nulls, element oid, (length, lower bound) per dimension, elements`.
fn decode_array(raw: &[u8], element: &TypeKind, element_oid: u32) -> Result<Value, ValueError> {
    let mut pos = 0;
    fn int(raw: &[u8], pos: &mut usize) -> Result<i32, ValueError> {
        let b = raw.get(*pos..*pos + 4).ok_or_else(|| invalid("array", "too short"))?;
        *pos += 4;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    let int = |pos: &mut usize| int(raw, pos);
    let ndim = int(&mut pos)?;
    let _has_nulls = int(&mut pos)?;
    let _oid = int(&mut pos)?;
    if !(0..=6).contains(&ndim) {
        return Err(invalid("array", "bad dimension count"));
    }
    let mut dims = Vec::with_capacity(ndim as usize);
    for _ in 0..ndim {
        let len = int(&mut pos)?;
        let _lower_bound = int(&mut pos)?;
        dims.push(usize::try_from(len).map_err(|_| invalid("array", "negative dimension"))?);
    }
    let total: usize = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| invalid("array", "too large"))?;
    // A dimension of length 0 makes the array empty, as array_recv reads it; nesting the
    // others would build up to 2³¹ empty arrays from a few bytes.
    if ndim == 0 || total == 0 {
        return if pos == raw.len() {
            Ok(Value::Array(Vec::new()))
        } else {
            Err(invalid("array", "trailing bytes"))
        };
    }
    if total > raw.len() {
        return Err(invalid("array", "more elements than bytes"));
    }
    let mut elements = Vec::with_capacity(total);
    for _ in 0..total {
        let len = int(&mut pos)?;
        if len < 0 {
            elements.push(Value::Null);
            continue;
        }
        let bytes =
            raw.get(pos..pos + len as usize).ok_or_else(|| invalid("array", "element past the end"))?;
        pos += len as usize;
        elements.push(element.decode_binary(element_oid, bytes)?);
    }
    if pos != raw.len() {
        return Err(invalid("array", "trailing bytes"));
    }
    Ok(nest(&dims, &mut elements.into_iter()))
}

fn nest(dims: &[usize], elements: &mut impl Iterator<Item = Value>) -> Value {
    match dims.split_first() {
        None => Value::Array(Vec::new()),
        Some((&len, [])) => Value::Array(elements.take(len).collect()),
        Some((&len, rest)) => Value::Array((0..len).map(|_| nest(rest, elements)).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn numeric(ndigits: &[u16], weight: i16, sign: u16, dscale: u16) -> Vec<u8> {
        let mut raw = Vec::new();
        for w in [ndigits.len() as u16, weight as u16, sign, dscale] {
            raw.extend_from_slice(&w.to_be_bytes());
        }
        for d in ndigits {
            raw.extend_from_slice(&d.to_be_bytes());
        }
        raw
    }

    #[test]
    fn numerics_print_as_numeric_out_does() {
        assert_eq!(
            decode_numeric(&numeric(&[1, 2345], 1, 0, 2)).unwrap(),
            Numeric::Finite("12345.00".into())
        );
        assert_eq!(
            decode_numeric(&numeric(&[12, 3400], 0, NUMERIC_NEG, 3)).unwrap(),
            Numeric::Finite("-12.340".into())
        );
        assert_eq!(decode_numeric(&numeric(&[5], -2, 0, 8)).unwrap(), Numeric::Finite("0.00000005".into()));
        assert_eq!(decode_numeric(&numeric(&[], 0, 0, 0)).unwrap(), Numeric::Finite("0".into()));
        assert_eq!(decode_numeric(&numeric(&[], 0, NUMERIC_NAN, 0)).unwrap(), Numeric::NaN);
        assert!(decode_numeric(&numeric(&[10_000], 0, 0, 0)).is_err());
    }

    #[test]
    fn two_dimensional_array_nests() {
        let mut raw = Vec::new();
        for v in [2i32, 0, 23, 2, 1, 2, 1] {
            raw.extend_from_slice(&v.to_be_bytes());
        }
        for v in [1i32, 2, 3, 4] {
            raw.extend_from_slice(&4i32.to_be_bytes());
            raw.extend_from_slice(&v.to_be_bytes());
        }
        let kind = TypeKind::Array { element: Box::new(TypeKind::Int4), element_oid: 23, delimiter: b',' };
        assert_eq!(kind.decode_binary(1007, &raw).unwrap().to_string(), "{{1,2},{3,4}}");
    }

    // Found by the fuzzer (tests/fuzz/regressions/binary_value): 2³¹ - 1 empty rows from 28 bytes.
    #[test]
    fn an_array_with_a_zero_dimension_is_empty_whatever_the_others() {
        let mut raw = Vec::new();
        for v in [2i32, 0, 23, i32::MAX, 1, 0, 1] {
            raw.extend_from_slice(&v.to_be_bytes());
        }
        let kind = TypeKind::Array { element: Box::new(TypeKind::Int4), element_oid: 23, delimiter: b',' };
        assert_eq!(kind.decode_binary(1007, &raw).unwrap(), Value::Array(Vec::new()));
        raw.push(0);
        assert!(kind.decode_binary(1007, &raw).is_err(), "trailing bytes");
    }

    // Found by the fuzzer: a time of day past 24:00:00 printed as text no Postgres accepts.
    #[test]
    fn temporal_values_outside_postgres_ranges_are_refused() {
        let past_midnight = (86_400_000_001i64).to_be_bytes();
        assert!(TypeKind::Time.decode_binary(1083, &past_midnight).is_err());
        assert!(TypeKind::Time.decode_binary(1083, &86_400_000_000i64.to_be_bytes()).is_ok());
        assert!(TypeKind::Date.decode_binary(1082, &i32::MAX.to_be_bytes()).is_ok(), "infinity");
        assert!(TypeKind::Date.decode_binary(1082, &(i32::MAX - 1).to_be_bytes()).is_err());
        assert!(TypeKind::Timestamp.decode_binary(1114, &(i64::MAX - 1).to_be_bytes()).is_err());
        assert!(TypeKind::TimestampTz.decode_binary(1184, &i64::MIN.to_be_bytes()).is_ok(), "-infinity");
    }

    proptest! {
        #[test]
        fn binary_decoders_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            let kinds = [TypeKind::Numeric, TypeKind::Interval, TypeKind::Jsonb,
                TypeKind::Array { element: Box::new(TypeKind::Numeric), element_oid: 1700, delimiter: b',' }];
            for kind in kinds {
                let _ = kind.decode_binary(0, &raw);
            }
        }
    }
}
