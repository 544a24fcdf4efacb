//! The Postgres target's mapping (`schemas/postgres/README.md`; JSON Schema in
//! `schemas/postgres/mapping.schema.json`): which source table feeds which target table, with
//! renames, dropped columns, constants and a row filter.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use sluice_core::Problem;

use crate::translate::filter::filter_problems;
use crate::translate::mapping::{Constant, MappingFile, Predicate};

/// The mapping of a Postgres target.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgMapping {
    /// What a TRUNCATE of a mapped table does.
    #[serde(default)]
    pub on_truncate: PgTruncatePolicy,
    pub tables: Vec<PgTableMapping>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PgTruncatePolicy {
    /// Truncate the target table (refused for a target table fed by several sources).
    #[default]
    Truncate,
    /// Skip it (the target keeps its rows).
    Ignore,
    /// Stop with an error naming the table.
    Error,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgTableMapping {
    /// `schema.table` in the source.
    pub source: String,
    /// `schema.table` in the target; its primary key identifies rows.
    pub target: String,
    /// Source column → target column.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Columns never written (secrets, PII).
    #[serde(default)]
    pub drop: Vec<String>,
    /// Target columns set to the same value in every row (a tenant, an origin marker).
    #[serde(default)]
    pub constants: BTreeMap<String, Constant>,
    /// Rows must satisfy every predicate; a row that stops satisfying them is deleted.
    #[serde(default)]
    pub filter: Vec<Predicate>,
}

impl MappingFile for PgMapping {
    fn sources(&self) -> Vec<&str> {
        self.tables.iter().map(|t| t.source.as_str()).collect()
    }

    /// Problems visible without either database.
    fn problems(&self, problems: &mut Vec<Problem>) {
        for (i, table) in self.tables.iter().enumerate() {
            let prefix = format!("mapping.tables[{i}]");
            for (key, name) in [("source", &table.source), ("target", &table.target)] {
                if sluice_postgres::catalog::split_table(name).is_none() || name.split('.').count() != 2 {
                    problems.push(Problem::new(&prefix, key, format!("{name:?} must be schema.table")));
                }
            }
            let mut written: HashMap<&str, &str> = HashMap::new();
            for (column, target) in &table.rename {
                if let Some(other) = written.insert(target, column) {
                    problems.push(Problem::new(
                        &prefix,
                        &format!("rename.{column}"),
                        format!("{other} is renamed to {target:?} too"),
                    ));
                }
            }
            for name in table.constants.keys() {
                if written.contains_key(name.as_str()) {
                    problems.push(Problem::new(
                        &prefix,
                        &format!("constants.{name}"),
                        "collides with a renamed column",
                    ));
                }
            }
            filter_problems(&prefix, &table.filter, problems);
        }
    }
}
