//! `sluice validate` beyond the files: the source database can serve the pipeline (the same
//! checks `run` makes before streaming) and the mapping fits its catalog.

use sluice_postgres::Problem;

use crate::config::{Config, TargetConfig};
use crate::translate::mapping::Mapping;

/// Problems found in the database; `Err` when the database cannot be asked.
pub async fn against_database(config: &Config) -> Result<Vec<Problem>, sluice_postgres::Error> {
    let source = &config.source;
    let sql = sluice_postgres::connect_sql(&source.connection).await?;
    let mut problems = Vec::new();
    match sluice_postgres::setup::check(&sql, &source.connection, &source.replication).await {
        Ok(_) | Err(sluice_postgres::Error::SlotInUse { .. }) => {}
        Err(e) => problems.push(Problem::new("source", "replication", e.to_string())),
    }
    for warning in sluice_postgres::setup::identity_warnings(&sql, &source.replication.publication).await? {
        problems.push(Problem::new("source.replication", "publication", format!("table {}: {}", warning.table, warning.reason)));
    }
    if let TargetConfig::Dynamodb(dynamo) = &config.target {
        if let Ok(mapping) = Mapping::load(&dynamo.mapping) {
            problems.extend(crate::translate::catalog::check(&sql, &mapping, &source.replication.publication).await?);
        }
    }
    Ok(problems)
}
