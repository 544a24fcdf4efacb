//! Values as DynamoDB attributes, and positions as item versions: what the row translator and
//! the event log share.

use std::collections::BTreeMap;

use sluice_dynamodb::Attr;

use super::mapping::{AttrKind, NullPolicy};
use crate::translate::mapping::Constant;
use crate::translate::{iso, text_of};
use sluice_core::{Position, Value};

/// The version number of a position.
pub(crate) fn version(position: Position) -> String {
    (((position.commit_lsn.0 as u128) << 32) | position.tx_ordinal as u128).to_string()
}

/// DynamoDB numbers: at most 38 significant digits, magnitude between 1e-130 and 1e126.
fn dynamo_number(text: &str) -> Result<String, String> {
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().map_err(|_| format!("{text:?} is not a number"))?),
        None => (unsigned, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: String = format!("{int}{frac}");
    let significant = digits.trim_start_matches('0').trim_end_matches('0');
    if significant.is_empty() {
        return Ok("0".into());
    }
    if significant.len() > 38 {
        return Err(format!(
            "{} significant digits exceed DynamoDB's 38; map the column with as = \"string\"",
            significant.len()
        ));
    }
    let leading_zeros = digits.len() - digits.trim_start_matches('0').len();
    let magnitude = int.len() as i64 - leading_zeros as i64 + exponent;
    if !(-129..=126).contains(&magnitude) {
        return Err(
            "magnitude outside DynamoDB's range (1e-130 to 1e126); map the column with as = \"string\""
                .into(),
        );
    }
    Ok(text.to_owned())
}

fn float_text(v: f64) -> Result<String, String> {
    if !v.is_finite() {
        return Err(format!("{v} is not a DynamoDB number; map the column with as = \"string\""));
    }
    let text =
        if v != 0.0 && (v.abs() >= 1e21 || v.abs() < 1e-7) { format!("{v:e}") } else { format!("{v}") };
    dynamo_number(&text)
}

/// A value as an attribute; `Ok(None)` for a NULL left out.
pub(crate) fn to_attr(
    value: &Value,
    kind: Option<AttrKind>,
    nulls: NullPolicy,
) -> Result<Option<Attr>, String> {
    if matches!(value, Value::Null) {
        return Ok(match nulls {
            NullPolicy::Omit => None,
            NullPolicy::Null => Some(Attr::Null),
        });
    }
    if kind == Some(AttrKind::String) {
        return Ok(Some(Attr::S(text_of(value))));
    }
    let wrong = |kind: AttrKind| Err(format!("as = {kind:?} does not fit this column's type"));
    Ok(Some(match (value, kind) {
        (Value::Bool(b), None) => Attr::Bool(*b),
        (Value::Int2(v), None | Some(AttrKind::Number)) => Attr::N(v.to_string()),
        (Value::Int4(v), None | Some(AttrKind::Number)) => Attr::N(v.to_string()),
        (Value::Int8(v), None | Some(AttrKind::Number)) => Attr::N(v.to_string()),
        (Value::Float4(v), None | Some(AttrKind::Number)) => Attr::N(float_text(*v as f64)?),
        (Value::Float8(v), None | Some(AttrKind::Number)) => Attr::N(float_text(*v)?),
        (Value::Numeric(n), None | Some(AttrKind::Number)) => match n {
            sluice_core::Numeric::Finite(text) => Attr::N(dynamo_number(text)?),
            other => {
                return Err(format!(
                    "numeric {other} is not a DynamoDB number; map the column with as = \"string\""
                ))
            }
        },
        (Value::Text(s) | Value::Enum(s), None) => Attr::S(s.clone()),
        (Value::Unknown { text, .. }, None) => Attr::S(text.clone()),
        (Value::Bytea(b) | Value::UnknownBinary { bytes: b, .. }, None) => Attr::B(b.clone()),
        (Value::Uuid(_) | Value::Time(_) | Value::Interval(_), None) => Attr::S(value.to_string()),
        (Value::Json(text), None | Some(AttrKind::Map)) => {
            let json: serde_json::Value =
                serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
            json_attr(&json)?
        }
        (Value::Timestamp(ts), None | Some(AttrKind::Iso8601)) => Attr::S(iso(*ts, false)),
        (Value::TimestampTz(ts), None | Some(AttrKind::Iso8601)) => Attr::S(iso(*ts, true)),
        (Value::Timestamp(ts) | Value::TimestampTz(ts), Some(AttrKind::EpochMillis)) => {
            let micros = ts
                .unix_micros()
                .ok_or("an infinite timestamp has no epoch millis; map the column with as = \"string\"")?;
            Attr::N(micros.div_euclid(1000).to_string())
        }
        (Value::Date(_), None | Some(AttrKind::Iso8601)) => Attr::S(text_of(value)),
        (Value::Date(date), Some(AttrKind::EpochMillis)) => {
            if date.ymd().is_none() {
                return Err(
                    "an infinite date has no epoch millis; map the column with as = \"string\"".into()
                );
            }
            Attr::N(((date.0 as i64 + 10_957) * 86_400_000).to_string())
        }
        (Value::Array(items), None | Some(AttrKind::List)) => Attr::L(
            items
                .iter()
                .map(|i| to_attr(i, None, NullPolicy::Null).map(|a| a.unwrap_or(Attr::Null)))
                .collect::<Result<_, _>>()?,
        ),
        (Value::Array(items), Some(AttrKind::Set)) => return set_attr(items),
        (_, Some(kind)) => return wrong(kind),
        (Value::Null, None) => unreachable!("NULL is handled above"),
    }))
}

fn set_attr(items: &[Value]) -> Result<Option<Attr>, String> {
    if items.is_empty() {
        // DynamoDB has no empty sets: the attribute is left out.
        return Ok(None);
    }
    let mut strings = std::collections::BTreeSet::new();
    let mut numbers = std::collections::BTreeSet::new();
    for item in items {
        match to_attr(item, None, NullPolicy::Null)? {
            Some(Attr::S(s)) => {
                strings.insert(s);
            }
            Some(Attr::N(n)) => {
                numbers.insert(n);
            }
            Some(Attr::Null) | None => {
                return Err("a set cannot hold NULL; map the column with as = \"list\"".into())
            }
            Some(_) => return Err("only arrays of text or numbers can be sets".into()),
        }
    }
    match (strings.is_empty(), numbers.is_empty()) {
        (false, true) => Ok(Some(Attr::Ss(strings.into_iter().collect()))),
        (true, false) => Ok(Some(Attr::Ns(numbers.into_iter().collect()))),
        _ => Err("a set must hold only text or only numbers".into()),
    }
}

pub(crate) fn json_attr(json: &serde_json::Value) -> Result<Attr, String> {
    Ok(match json {
        serde_json::Value::Null => Attr::Null,
        serde_json::Value::Bool(b) => Attr::Bool(*b),
        serde_json::Value::Number(n) => Attr::N(dynamo_number(&n.to_string())?),
        serde_json::Value::String(s) => Attr::S(s.clone()),
        serde_json::Value::Array(items) => Attr::L(items.iter().map(json_attr).collect::<Result<_, _>>()?),
        serde_json::Value::Object(map) => Attr::M(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), json_attr(v)?)))
                .collect::<Result<BTreeMap<_, _>, String>>()?,
        ),
    })
}

pub(crate) fn constant_attr(constant: &Constant) -> Attr {
    match constant {
        Constant::Bool(b) => Attr::Bool(*b),
        Constant::Integer(i) => Attr::N(i.to_string()),
        Constant::Float(f) => Attr::N(f.to_string()),
        Constant::Text(s) => Attr::S(s.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamodb_number_limits() {
        assert!(dynamo_number("12345678901234567890123456789012345678").is_ok());
        assert!(dynamo_number("0.000000000000000000000000000000000000001").is_ok());
        assert!(dynamo_number("9.9e125").is_ok());
        assert!(dynamo_number("1e126").is_err());
        assert!(dynamo_number("1e-130").is_ok());
        assert!(dynamo_number("1e-131").is_err());
        assert!(float_text(f64::NAN).is_err());
        assert_eq!(
            float_text(1e300).unwrap_err(),
            "magnitude outside DynamoDB's range (1e-130 to 1e126); map the column with as = \"string\""
        );
        assert_eq!(float_text(0.1).unwrap(), "0.1");
    }
}
