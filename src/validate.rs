//! `sluice validate` beyond the files, and `run`'s checks before it streams: the source
//! database can serve the pipeline (settings, publication, slot, the role's rights), the
//! mapping fits its catalog and the publication, and the target has what sluice writes to
//! (DynamoDB tables and their keys, Kafka topics, Postgres tables and rights). Each
//! connector's own checks live in its `targets/<name>/check.rs`.

use sluice_core::Classify;
use sluice_core::Problem;

use crate::config::Config;
use crate::targets::dynamodb::mapping::Mapping;
use crate::targets::TargetConfig;
use crate::translate::mapping::MappingFile;

/// What the live checks found, by weight.
#[derive(Debug, Default)]
pub struct Findings {
    /// The pipeline cannot work as configured: `validate` and `run` exit 2.
    pub problems: Vec<Problem>,
    /// It can work, but maybe not as meant (a published table no mapping names): `run`
    /// refuses them too, unless `pipeline.allow_warnings` (or `run --allow-warnings`).
    pub warnings: Vec<Problem>,
    /// A side that could not be asked (an endpoint down): a problem for `validate`; `run`
    /// starts anyway, and its writes retry within the target's `retry_for`.
    pub unreachable: Vec<Problem>,
    /// What was checked, for the closing line (`source database`, `DynamoDB tables`).
    pub checked: Vec<String>,
    /// What was not, and why.
    pub skipped: Vec<String>,
    /// What the way back could not do: a reverse direction (after a cutover) could not
    /// write some source rows from the target's (a dropped NOT NULL column without a default,
    /// two tables in one target table that nothing tells apart). The forward direction does
    /// not need it: `validate` prints these as `way back:` lines, `run` streams.
    pub irreversible: Vec<Problem>,
}

impl Findings {
    /// True when nothing stands in the way.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.warnings.is_empty() && self.unreachable.is_empty()
    }
}

/// What the way back could not do, visible in the files alone (`validate --offline`).
pub fn offline_way_back(config: &Config) -> Vec<Problem> {
    match &config.target {
        TargetConfig::Dynamodb(dynamo) => match dynamo.mapping.as_deref().map(Mapping::load) {
            Some(Ok(mapping)) => crate::targets::dynamodb::inverse::offline_problems(&mapping),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// Every live check of `config`: the source database, then the target. `Err` when the
/// source database cannot be asked at all.
pub async fn live(config: &Config) -> Result<Findings, sluice_postgres::Error> {
    let mut findings = Findings::default();
    let sql = sluice_postgres::connect_sql(&config.source.connection).await?;
    source(config, &sql, &mut findings).await?;
    findings.checked.push(format!("source database {}", config.source.connection.dbname));
    target(config, &sql, &mut findings).await?;
    Ok(findings)
}

async fn source(
    config: &Config,
    sql: &tokio_postgres::Client,
    findings: &mut Findings,
) -> Result<(), sluice_postgres::Error> {
    let source = &config.source;
    let problems = &mut findings.problems;
    if let Some(replication) = source.replication() {
        match sluice_postgres::setup::check_only(sql, &source.connection, replication).await {
            Ok(_) | Err(sluice_postgres::Error::SlotInUse { .. }) => {}
            Err(e) => problems.push(Problem::new("source", "replication", e.to_string())),
        }
        if let Some(failover) = sluice_postgres::setup::failover_state(sql, &replication.slot).await? {
            if let Some(warning) = failover.warning {
                findings.warnings.push(Problem::new("source.replication", "failover", warning));
            }
        }
        if let Some(problem) = replication_role(sql, &source.connection).await? {
            problems.push(problem);
        }
        for warning in sluice_postgres::setup::identity_warnings(sql, &replication.publication).await? {
            findings.warnings.push(Problem::new(
                "source.replication",
                "publication",
                format!("table {}: {}", warning.table, warning.reason),
            ));
        }
    }
    if let Some(poll) = source.poll() {
        match sluice_postgres::poll::load_relation(sql, poll).await {
            Ok(_) => {}
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => findings.problems.push(Problem::new("source", "poll", e.to_string())),
        }
    }
    let publication = source.replication().map(|r| r.publication.as_str());
    if let Some(outbox) = config.target.outbox() {
        findings.problems.extend(outbox_table(sql, outbox, publication).await?);
    }
    let Some(publication) = publication else { return Ok(()) };
    // The tables a mapping names; published tables outside it are skipped by the stream.
    let mapped: Option<Vec<String>> = match &config.target {
        TargetConfig::Dynamodb(dynamo) => match dynamo.mapping.as_deref().map(Mapping::load) {
            Some(Ok(mapping)) => {
                findings
                    .problems
                    .extend(crate::targets::dynamodb::check::check(sql, &mapping, publication).await?);
                crate::targets::dynamodb::check::way_back(sql, &mapping, &mut findings.irreversible).await?;
                Some(mapping.tables.iter().map(|t| t.source.clone()).collect())
            }
            _ => None,
        },
        TargetConfig::Postgres(pg) => match pg.load_mapping() {
            Ok(mapping) => {
                crate::targets::postgres::check::check(
                    sql,
                    &config.source.connection,
                    pg,
                    &mapping,
                    publication,
                    findings,
                )
                .await?;
                findings.checked.push(format!("target database {}", pg.connection.dbname));
                Some(mapping.tables.iter().map(|t| t.source.clone()).collect())
            }
            Err(_) => None,
        },
        _ => None,
    };
    if let Some(mapped) = mapped {
        let own: Vec<String> = config.own_tables().iter().map(ToString::to_string).collect();
        let outbox = config.target.outbox().and_then(|o| o.table.as_ref()).map(|t| t.to_string());
        let published = sluice_postgres::catalog::publication_tables(sql, publication).await?;
        for table in published {
            if !mapped.contains(&table) && !own.contains(&table) && outbox.as_ref() != Some(&table) {
                findings.warnings.push(Problem::new(
                    "source.replication",
                    "publication",
                    format!(
                        "table {table} is in publication {publication:?} but no table of the mapping names it: its changes are skipped; \
                         map it (target.mapping) or drop it from the publication (ALTER PUBLICATION {publication} DROP TABLE {table})"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// A role that may not stream: neither `REPLICATION` nor superuser (nor, on RDS and Aurora,
/// a member of `rds_replication`).
async fn replication_role(
    sql: &tokio_postgres::Client,
    connection: &sluice_postgres::ConnectionConfig,
) -> Result<Option<Problem>, tokio_postgres::Error> {
    let row = sql
        .query_one(
            "SELECT current_user::text, r.rolreplication OR r.rolsuper \
                 OR (to_regrole('rds_replication') IS NOT NULL AND pg_has_role(current_user, 'rds_replication', 'member')) \
             FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let (role, may): (String, bool) = (row.get(0), row.get(1));
    Ok((!may).then(|| {
        Problem::new(
            "source.connection",
            "user",
            format!(
                "role {role:?} on {} may not stream changes: it lacks the REPLICATION attribute; \
                 grant it with ALTER ROLE {role} REPLICATION (as a superuser), or connect as a role that has it",
                connection.addr()
            ),
        )
    }))
}

/// The target side: each connector's own checks.
async fn target(
    config: &Config,
    sql: &tokio_postgres::Client,
    findings: &mut Findings,
) -> Result<(), sluice_postgres::Error> {
    match &config.target {
        TargetConfig::Dynamodb(dynamo) => crate::targets::dynamodb::check::target(dynamo, findings).await,
        TargetConfig::Kafka(kafka) => {
            crate::targets::kafka::check::target(
                kafka,
                sql,
                config.source.replication(),
                &config.own_tables().map(ToString::to_string),
                findings,
            )
            .await?
        }
        TargetConfig::Postgres(_) => {}
        TargetConfig::Jsonl(jsonl) if jsonl.path.as_os_str() == "-" => {
            findings.skipped.push("target: standard output needs no check".into())
        }
        TargetConfig::Jsonl(jsonl) => match jsonl.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(dir) if !dir.is_dir() => findings.problems.push(Problem::new(
                "target",
                "path",
                format!("directory {} does not exist", dir.display()),
            )),
            _ => findings.checked.push("target directory".into()),
        },
        other => findings.skipped.push(format!("target {}: nothing to check", other.kind())),
    }
    Ok(())
}

/// The outbox table exists, is published (when streamed from a publication), and has the
/// router's columns.
async fn outbox_table(
    sql: &tokio_postgres::Client,
    outbox: &crate::translate::outbox::OutboxConfig,
    publication: Option<&str>,
) -> Result<Vec<Problem>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    let Some(table) = &outbox.table else { return Ok(problems) };
    let (schema, name) = (table.schema(), table.name());
    let columns: Vec<String> = sql
        .query(
            "SELECT a.attname::text FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&schema, &name],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if columns.is_empty() {
        problems.push(Problem::new("target.outbox", "table", format!("table {table} does not exist")));
        return Ok(problems);
    }
    if let Some(publication) = publication {
        let published = sql
            .query_opt("SELECT 1 FROM pg_catalog.pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3", &[&publication, &schema, &name])
            .await?
            .is_some();
        if !published {
            problems.push(Problem::new(
                "target.outbox",
                "table",
                format!("table {table} is not in publication {publication:?}"),
            ));
        }
    }
    let required = [
        ("aggregate_type_column", &outbox.aggregate_type_column),
        ("aggregate_id_column", &outbox.aggregate_id_column),
        ("payload_column", &outbox.payload_column),
        ("id_column", &outbox.id_column),
    ];
    for (key, column) in required {
        if !columns.contains(column) {
            problems.push(Problem::new(
                "target.outbox",
                key,
                format!("table {table} has no column {column:?}"),
            ));
        }
    }
    for column in &outbox.header_columns {
        if !columns.contains(column) {
            problems.push(Problem::new(
                "target.outbox",
                "header_columns",
                format!("table {table} has no column {column:?}"),
            ));
        }
    }
    Ok(problems)
}

/// `sluice validate` over several configurations (one deployment's pipelines): DynamoDB tables
/// written by more than one pipeline where one of them writes without per-write guards
/// (`write_mode = "batch"` is correct only for a table's single writer). The replicas of one
/// pipeline (one slot, or one consumer group) count as one writer: the HA lock and the group
/// give each change one writer at a time. Each problem names both files and the table.
pub fn shared_unguarded_tables(configs: &[(std::path::PathBuf, Config)]) -> Vec<Problem> {
    /// One pipeline's DynamoDB writes: who writes, where (endpoint, region, table), guarded or not.
    struct Writer<'a> {
        path: &'a std::path::Path,
        pipeline: String,
        tables: Vec<(String, String, String)>,
        unguarded: bool,
    }
    let writers: Vec<Writer> = configs
        .iter()
        .filter_map(|(path, config)| {
            let TargetConfig::Dynamodb(dynamo) = &config.target else { return None };
            let mut names = Vec::new();
            if let Some(mapping) = dynamo.mapping.as_deref().and_then(|m| Mapping::load(m).ok()) {
                names.extend(mapping.tables.into_iter().map(|t| t.target));
            }
            names.extend(dynamo.outbox.as_ref().and_then(|o| o.event_table.clone()));
            let endpoint = dynamo.endpoint_url.clone().unwrap_or_else(|| "aws".into());
            let region = dynamo.region.clone().unwrap_or_default();
            let pipeline = match config.source.kafka() {
                Some(kafka) => format!("kafka {} {}", kafka.brokers, kafka.group_id),
                None => format!(
                    "{} {} {}",
                    config.source.connection.addr(),
                    config.source.connection.dbname,
                    config.source.lock_name()
                ),
            };
            Some(Writer {
                path,
                pipeline,
                tables: names.into_iter().map(|name| (endpoint.clone(), region.clone(), name)).collect(),
                unguarded: config.target.unconditional_writes().is_some(),
            })
        })
        .collect();
    let mut problems = Vec::new();
    for (i, a) in writers.iter().enumerate() {
        for b in &writers[i + 1..] {
            if a.pipeline == b.pipeline || !(a.unguarded || b.unguarded) {
                continue;
            }
            for (_, _, name) in a.tables.iter().filter(|t| b.tables.contains(t)) {
                problems.push(Problem::new(
                    "target",
                    "write_mode",
                    format!(
                        "{} and {} both write DynamoDB table {name:?}, and {} writes it with write_mode = \"batch\", \
                         which is correct only for a table's single writer: use write_mode = \"single\" in both, or \
                         give each pipeline its own tables",
                        a.path.display(),
                        b.path.display(),
                        if a.unguarded { a.path.display() } else { b.path.display() }
                    ),
                ));
            }
        }
    }
    problems
}
