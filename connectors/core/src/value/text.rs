//! Decoding of each type's text form, as pgoutput and the queries that read tables send it.

use super::{invalid, Date, Interval, Numeric, Time, Timestamp, Value, ValueError};
use crate::TypeKind;

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
    let values = parser.parse_level(element, 1)?;
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
        depth: usize,
    ) -> Result<Vec<Value>, ValueError> {
        // Postgres' limit (MAXDIM); deeper nesting would only exhaust the stack.
        if depth > 6 {
            return Err(invalid("array", "more than 6 dimensions"));
        }
        self.expect(b'{')?;
        let mut values = Vec::new();
        if self.bytes.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            return Ok(values);
        }
        loop {
            let value = match self.bytes.get(self.pos) {
                Some(b'{') => Value::Array(self.parse_level(element, depth + 1)?),
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
