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
    /// The way back (an inverted mapping): a row that fails the filter is not the mapping's
    /// to carry, and is refused (dead-lettered) rather than deleted from the old table.
    #[serde(skip)]
    pub refuse_filtered: bool,
}

impl PgMapping {
    /// The mapping of the way back, new tables → old tables: targets become sources, renames
    /// are undone, constants' columns dropped, and the filter, renamed onto the new columns,
    /// refuses rows instead of deleting them. A mapping that cannot be inverted is named by
    /// table: a target table several sources feed (its rows cannot be told apart), a filter
    /// on a column that is not written.
    pub fn inverted(&self) -> Result<PgMapping, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut feeds: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for t in &self.tables {
            feeds.entry(t.target.as_str()).or_default().push(t.source.as_str());
        }
        let mut tables = Vec::with_capacity(self.tables.len());
        for (i, t) in self.tables.iter().enumerate() {
            let prefix = format!("mapping.tables[{i}]");
            let sources = &feeds[t.target.as_str()];
            if sources.len() > 1 {
                problems.push(Problem::new(
                    &prefix,
                    "target",
                    format!(
                        "{} is fed by {}: the way back cannot tell their rows apart",
                        t.target,
                        sources.join(" and ")
                    ),
                ));
                continue;
            }
            let target_name =
                |column: &str| t.rename.get(column).cloned().unwrap_or_else(|| column.to_owned());
            let mut filter = Vec::with_capacity(t.filter.len());
            for (j, predicate) in t.filter.iter().enumerate() {
                if t.drop.contains(&predicate.column) {
                    problems.push(Problem::new(
                        &prefix,
                        &format!("filter[{j}].column"),
                        format!(
                            "the filter reads {}, which the mapping drops: the way back cannot check it",
                            predicate.column
                        ),
                    ));
                    continue;
                }
                let mut renamed = predicate.clone();
                renamed.column = target_name(&predicate.column);
                filter.push(renamed);
            }
            tables.push(PgTableMapping {
                source: t.target.clone(),
                target: t.source.clone(),
                rename: t.rename.iter().map(|(from, to)| (to.clone(), from.clone())).collect(),
                drop: t.constants.keys().cloned().collect(),
                constants: BTreeMap::new(),
                filter,
                refuse_filtered: true,
            });
        }
        if problems.is_empty() {
            Ok(PgMapping { on_truncate: self.on_truncate, tables })
        } else {
            Err(problems)
        }
    }
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
