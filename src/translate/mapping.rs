//! What every mapping format shares: constants, row filters, and reading a mapping file with
//! problems named by their dotted key under `mapping`.

use std::path::Path;

use serde::Deserialize;
use sluice_core::Problem;

use crate::config::toml_error;

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
        toml::from_str(text).map_err(|e| vec![Problem::new("", "mapping", toml_error(text, &e))])?;
    let mapping: T = serde_path_to_error::deserialize(value).map_err(|e| {
        vec![Problem { key: format!("mapping.{}", e.path()), message: toml_error("", &e.into_inner()) }]
    })?;
    let problems = validate(&mapping);
    if problems.is_empty() {
        Ok(mapping)
    } else {
        Err(problems)
    }
}

/// A mapping format: a TOML document with a `tables` list whose `source` tables are each mapped
/// once, read with its problems named by their dotted key under `mapping`.
pub trait MappingFile: serde::de::DeserializeOwned {
    /// The source table of each table mapping, in order.
    fn sources(&self) -> Vec<&str>;

    /// The format's own problems, visible without any database.
    fn problems(&self, problems: &mut Vec<Problem>);

    /// Every problem: no table mapping, a source mapped twice, and the format's own.
    fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let sources = self.sources();
        if sources.is_empty() {
            problems.push(Problem::new("mapping", "tables", "at least one table mapping is needed"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, source) in sources.iter().enumerate() {
            if !seen.insert(*source) {
                problems.push(Problem::new(
                    &format!("mapping.tables[{i}]"),
                    "source",
                    format!("{source} is mapped twice"),
                ));
            }
        }
        self.problems(&mut problems);
        problems
    }

    /// Reads and checks the file at `path`.
    fn load(path: &Path) -> Result<Self, Vec<Problem>> {
        Self::parse(&read(path)?)
    }

    /// Parses and checks a mapping document.
    fn parse(text: &str) -> Result<Self, Vec<Problem>> {
        parse_toml(text, Self::validate)
    }
}
