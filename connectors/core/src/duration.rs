//! Durations in configuration files: `"250ms"`, `"10s"`, `"5m"`, `"1h"`.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses `<integer><unit>` with unit one of `ms`, `s`, `m`, `h`.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        format!("invalid duration {text:?}: expected a whole number and a unit, like \"10s\"")
    })?;
    let seconds = |factor: u64| number.checked_mul(factor).map(Duration::from_secs);
    let duration = match unit {
        "ms" => Some(Duration::from_millis(number)),
        "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        _ => return Err(format!("invalid duration {text:?}: the unit must be ms, s, m or h")),
    };
    duration.ok_or_else(|| format!("invalid duration {text:?}: too large"))
}

/// Reads a duration written with a unit (`250ms`, `10s`, `5m`, `1h`), for serde's `with`.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(serde::de::Error::custom)
}

/// The JSON Schema of a duration written with a unit, for `#[schemars(schema_with)]`.
pub fn schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "pattern": "^[0-9]+(ms|s|m|h)$",
        "description": "A whole number and a unit: ms, s, m or h (\"250ms\", \"10s\", \"5m\", \"1h\")."
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("1h").unwrap(), Duration::from_secs(3600));
    }

    #[test]
    fn durations_without_unit_are_rejected() {
        assert!(parse("10").unwrap_err().contains("unit"));
        assert!(parse("s").is_err());
        assert!(parse("1.5s").is_err());
    }
}
