//! What every mapping format shares: constants, row filters, and reading a mapping file with
//! problems named by their dotted key under `mapping`.

use std::path::Path;

use serde::Deserialize;
use sluice_core::Problem;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Constant {
    Bool(bool),
    Integer(i64),
    Float(f64),
    Text(String),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Predicate {
    pub column: String,
    pub op: PredicateOp,
    /// Compared with the column's value as text (numbers numerically); a list for `in` / `not_in`.
    #[serde(default)]
    pub value: Option<Constant>,
    #[serde(default)]
    pub values: Vec<Constant>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PredicateOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    NotIn,
    IsNull,
    NotNull,
}

/// A mapping file's text; the error names the file.
pub fn read(path: &Path) -> Result<String, Vec<Problem>> {
    std::fs::read_to_string(path)
        .map_err(|e| vec![Problem::new("", "mapping", format!("cannot read {}: {e}", path.display()))])
}

/// A mapping document that `validate` finds no problem in; errors are named by their dotted
/// key under `mapping`.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    validate: impl Fn(&T) -> Vec<Problem>,
) -> Result<T, Vec<Problem>> {
    let value: toml::Value =
        toml::from_str(text).map_err(|e| vec![Problem::new("", "mapping", e.message().to_owned())])?;
    let mapping: T = serde_path_to_error::deserialize(value).map_err(|e| {
        vec![Problem { key: format!("mapping.{}", e.path()), message: e.into_inner().message().to_owned() }]
    })?;
    let problems = validate(&mapping);
    if problems.is_empty() {
        Ok(mapping)
    } else {
        Err(problems)
    }
}
