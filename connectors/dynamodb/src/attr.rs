//! DynamoDB attribute values without the SDK's types, so that translators stay pure and the
//! daemon core does not compile against the SDK. Converted to `AttributeValue` at the edge.

use std::collections::BTreeMap;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;

/// One attribute value, by DynamoDB's type descriptor (`S`, `N`, `B`, `BOOL`, `NULL`, `L`, `M`,
/// `SS`, `NS`).
#[derive(Clone, Debug, PartialEq)]
#[expect(missing_docs, reason = "each variant is the DynamoDB type descriptor it names")]
pub enum Attr {
    S(String),
    /// A number as its decimal text (DynamoDB: up to 38 significant digits).
    N(String),
    B(Vec<u8>),
    Bool(bool),
    Null,
    L(Vec<Attr>),
    M(BTreeMap<String, Attr>),
    Ss(Vec<String>),
    Ns(Vec<String>),
}

/// An item: attribute name to value.
pub type Item = BTreeMap<String, Attr>;

/// A value as an operator reads it: strings quoted, numbers as their text, binaries in hex,
/// sets as `<<…>>` (the console's notation), maps and lists in JSON's brackets. Printed only
/// where an operator asked for values (`verify --values`, the demo), never in a log line.
impl std::fmt::Display for Attr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let quoted = |f: &mut std::fmt::Formatter<'_>, s: &str| write!(f, "{}", serde_json::Value::from(s));
        match self {
            Attr::S(s) => quoted(f, s),
            Attr::N(n) => f.write_str(n),
            Attr::B(bytes) => {
                f.write_str("0x")?;
                bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
            Attr::Bool(b) => write!(f, "{b}"),
            Attr::Null => f.write_str("null"),
            Attr::L(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            Attr::M(map) => {
                f.write_str("{")?;
                for (i, (key, value)) in map.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    quoted(f, key)?;
                    write!(f, ": {value}")?;
                }
                f.write_str("}")
            }
            Attr::Ss(set) => {
                f.write_str("<<")?;
                for (i, s) in set.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    quoted(f, s)?;
                }
                f.write_str(">>")
            }
            Attr::Ns(set) => write!(f, "<<{}>>", set.join(", ")),
        }
    }
}

impl Attr {
    /// DynamoDB's size accounting: UTF-8 bytes of strings, about 21 bytes per number,
    /// raw bytes of binaries, 1 byte for booleans and null, 3 bytes of overhead per list or map
    /// plus each element's (and name's) size.
    pub fn size(&self) -> usize {
        match self {
            Attr::S(s) => s.len(),
            Attr::N(n) => n.len().div_ceil(2) + 1,
            Attr::B(b) => b.len(),
            Attr::Bool(_) | Attr::Null => 1,
            Attr::L(items) => 3 + items.iter().map(|i| 1 + i.size()).sum::<usize>(),
            Attr::M(map) => 3 + map.iter().map(|(k, v)| 1 + k.len() + v.size()).sum::<usize>(),
            Attr::Ss(items) => items.iter().map(String::len).sum(),
            Attr::Ns(items) => items.iter().map(|n| n.len().div_ceil(2) + 1).sum(),
        }
    }

    /// The SDK's form of the value.
    pub fn to_sdk(&self) -> AttributeValue {
        match self {
            Attr::S(s) => AttributeValue::S(s.clone()),
            Attr::N(n) => AttributeValue::N(n.clone()),
            Attr::B(b) => AttributeValue::B(Blob::new(b.clone())),
            Attr::Bool(b) => AttributeValue::Bool(*b),
            Attr::Null => AttributeValue::Null(true),
            Attr::L(items) => AttributeValue::L(items.iter().map(Attr::to_sdk).collect()),
            Attr::M(map) => AttributeValue::M(map.iter().map(|(k, v)| (k.clone(), v.to_sdk())).collect()),
            Attr::Ss(items) => AttributeValue::Ss(items.clone()),
            Attr::Ns(items) => AttributeValue::Ns(items.clone()),
        }
    }

    /// The inverse of `to_sdk`, for reads (verify, tests).
    pub fn from_sdk(value: &AttributeValue) -> Option<Attr> {
        Some(match value {
            AttributeValue::S(s) => Attr::S(s.clone()),
            AttributeValue::N(n) => Attr::N(n.clone()),
            AttributeValue::B(b) => Attr::B(b.as_ref().to_vec()),
            AttributeValue::Bool(b) => Attr::Bool(*b),
            AttributeValue::Null(_) => Attr::Null,
            AttributeValue::L(items) => Attr::L(items.iter().map(Attr::from_sdk).collect::<Option<_>>()?),
            AttributeValue::M(map) => Attr::M(
                map.iter().map(|(k, v)| Some((k.clone(), Attr::from_sdk(v)?))).collect::<Option<_>>()?,
            ),
            AttributeValue::Ss(items) => Attr::Ss(items.clone()),
            AttributeValue::Ns(items) => Attr::Ns(items.clone()),
            _ => return None,
        })
    }
}

/// The size DynamoDB counts for an item: names plus values.
pub fn item_size(item: &Item) -> usize {
    item.iter().map(|(k, v)| k.len() + v.size()).sum()
}

/// DynamoDB's item size limit.
pub const MAX_ITEM_BYTES: usize = 400 * 1024;

/// A key's (or item's) identity as text, for maps and sets of keys: each attribute name
/// length-prefixed, then its value's identity. Numbers compare as written: normalize them
/// first where `1.0` and `1` must be one key.
pub fn key_identity(key: &Item) -> String {
    let mut text = String::new();
    for (name, value) in key {
        length_prefixed(&mut text, name);
        canonical(value, &mut text);
    }
    text
}

/// An attribute's identity as text: a type tag, then its parts length-prefixed, so that no two
/// different values (or a name and a value) read the same.
fn canonical(attr: &Attr, out: &mut String) {
    match attr {
        Attr::S(s) => {
            out.push('S');
            length_prefixed(out, s);
        }
        Attr::N(n) => {
            out.push('N');
            length_prefixed(out, n);
        }
        Attr::B(bytes) => {
            out.push('B');
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            length_prefixed(out, &hex);
        }
        Attr::Bool(b) => out.push_str(if *b { "T" } else { "F" }),
        Attr::Null => out.push('0'),
        Attr::Ss(items) | Attr::Ns(items) => {
            out.push(if matches!(attr, Attr::Ss(_)) { 's' } else { 'n' });
            out.push_str(&format!("{}:", items.len()));
            for item in items {
                length_prefixed(out, item);
            }
        }
        Attr::L(items) => {
            out.push_str(&format!("L{}:", items.len()));
            for item in items {
                canonical(item, out);
            }
        }
        Attr::M(map) => {
            out.push_str(&format!("M{}:", map.len()));
            for (name, value) in map {
                length_prefixed(out, name);
                canonical(value, out);
            }
        }
    }
}

fn length_prefixed(out: &mut String, text: &str) {
    out.push_str(&format!("{}:", text.len()));
    out.push_str(text);
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_display_as_an_operator_reads_them() {
        use super::Attr;
        let map = Attr::M(
            [("n".to_string(), Attr::N("75.00".into())), ("s".to_string(), Attr::S("a\"b".into()))].into(),
        );
        assert_eq!(map.to_string(), r#"{"n": 75.00, "s": "a\"b"}"#);
        assert_eq!(Attr::M(Default::default()).to_string(), "{}");
        assert_eq!(
            Attr::L(vec![Attr::Null, Attr::Bool(true), Attr::B(vec![1, 255])]).to_string(),
            "[null, true, 0x01ff]"
        );
        assert_eq!(Attr::Ss(vec!["x".into()]).to_string(), r#"<<"x">>"#);
        assert_eq!(Attr::Ns(vec!["1".into(), "2".into()]).to_string(), "<<1, 2>>");
    }

    use super::*;

    #[test]
    fn attributes_survive_the_sdk_round_trip() {
        let item = Attr::M(BTreeMap::from([
            ("s".to_string(), Attr::S("x".into())),
            ("n".to_string(), Attr::N("1.5".into())),
            ("l".to_string(), Attr::L(vec![Attr::Bool(true), Attr::Null, Attr::B(vec![1, 2])])),
            ("ss".to_string(), Attr::Ss(vec!["a".into(), "b".into()])),
        ]));
        assert_eq!(Attr::from_sdk(&item.to_sdk()), Some(item));
    }

    #[test]
    fn size_counts_names_and_values() {
        let item = Item::from([
            ("pk".to_string(), Attr::S("USER#1".into())),
            ("n".to_string(), Attr::N("12345".into())),
        ]);
        assert_eq!(item_size(&item), 2 + 6 + 1 + 4);
    }
}
