//! Tests of parsing, overrides and validation.

use super::*;

const MINIMAL: &str = r#"
    [source.connection]
    dbname = "app"
    [source.replication]
    slot = "sluice"
    publication = "sluice_pub"
    [target]
    kind = "null"
"#;

fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_toml(text, env.iter().map(|(k, v)| (k.to_string(), v.to_string())), Path::new("test.toml"))
}

#[test]
fn json_config_reads_like_toml_with_env_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.json");
    std::fs::write(
        &path,
        r#"{"source": {"connection": {"dbname": "app", "port": 6432}, "replication": {"slot": "s", "publication": "p"}},
            "target": {"kind": "null"}, "monitoring": {"listen": "0.0.0.0:9187"}}"#,
    )
    .unwrap();
    let config = Config::load(&path).unwrap();
    assert_eq!(config.source.connection.port, 6432);
    assert_eq!(config.monitoring.listen, Some("0.0.0.0:9187".parse().unwrap()));
    std::fs::write(&path, r#"{"source": {"connection": {"dbname": "app", "port": 6432.5}}}"#).unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("source.connection.port"), "{err}");
    std::fs::write(&path, "{").unwrap();
    assert!(Config::load(&path).unwrap_err().to_string().contains("not valid JSON"));
}

#[test]
fn minimal_config_gets_defaults() {
    let config = load(MINIMAL, &[]).unwrap();
    assert_eq!(config.source.connection.port, 5432);
    assert_eq!(config.pipeline.max_in_flight, 4);
    assert!(matches!(config.target, TargetConfig::Null));
}

#[test]
fn environment_overrides_nested_keys_with_types() {
    let config = load(
        MINIMAL,
        &[
            ("SLUICE__SOURCE__CONNECTION__PORT", "6543"),
            ("SLUICE__SOURCE__CONNECTION__PASSWORD", "s3cret"),
            ("OTHER", "x"),
        ],
    )
    .unwrap();
    assert_eq!(config.source.connection.port, 6543);
    assert_eq!(config.source.connection.password.as_ref().unwrap().expose(), "s3cret");
    assert!(!format!("{config:?}").contains("s3cret"), "the password must not print");
}

#[test]
fn an_invalid_override_names_its_variable_and_the_expected_format() {
    let err = load(MINIMAL, &[("SLUICE__PIPELINE__RETRY_FOR", "soon")]).unwrap_err().to_string();
    assert!(
        err.contains("pipeline.retry_for")
            && err.contains("like \"10s\"")
            && err.contains("environment variable SLUICE__PIPELINE__RETRY_FOR"),
        "{err}"
    );
    let err = load(MINIMAL, &[("SLUICE__PIPELINE__MAX_IN_FLIGHT", "0")]).unwrap_err().to_string();
    assert!(
        err.contains("pipeline.max_in_flight") && err.contains("SLUICE__PIPELINE__MAX_IN_FLIGHT"),
        "{err}"
    );
    let err = load(MINIMAL, &[("SLUICE__PIPELINE__MAX_IN_FLIGHT", "many")]).unwrap_err().to_string();
    assert!(err.contains("SLUICE__PIPELINE__MAX_IN_FLIGHT") && err.contains("expected usize"), "{err}");
}

#[test]
fn unknown_key_is_named_with_its_path() {
    let text = MINIMAL.replace("dbname = \"app\"", "dbname = \"app\"\nhots = \"x\"");
    let err = load(&text, &[]).unwrap_err().to_string();
    assert!(err.contains("source.connection") && err.contains("hots"), "{err}");
}

#[test]
fn every_semantic_problem_is_reported_with_its_key() {
    let text = MINIMAL
        .replace(
            "slot = \"sluice\"",
            "slot = \"Bad-Slot\"\nstreaming = true\nstatus_interval = \"0s\"\nread_coalesce = \"1s\"\nreceive_buffer = 100",
        )
        + "\n[pipeline]\nmax_in_flight = 0\n[backfill]\ntable_concurrency = 0\n";
    let ConfigError::Invalid { problems } = load(&text, &[]).unwrap_err() else {
        panic!("expected problems")
    };
    let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "pipeline.max_in_flight",
            "backfill.table_concurrency",
            "source.replication.slot",
            "source.replication.streaming",
            "source.replication.status_interval",
            "source.replication.read_coalesce",
            "source.replication.receive_buffer"
        ]
    );
}

#[test]
fn bad_duration_names_the_key() {
    let text = MINIMAL
        .replace("publication = \"sluice_pub\"", "publication = \"sluice_pub\"\nstatus_interval = \"10\"");
    let err = load(&text, &[]).unwrap_err().to_string();
    assert!(err.contains("source.replication.status_interval") && err.contains("unit"), "{err}");
}

#[test]
fn a_dynamodb_target_needs_a_mapping_or_an_outbox_with_an_event_table() {
    let dynamo = MINIMAL.replace("kind = \"null\"", "kind = \"dynamodb\"");
    let err = load(&dynamo, &[]).unwrap_err().to_string();
    assert!(err.contains("target.mapping: is required"), "{err}");
    let err = load(&format!("{dynamo}\n[target.outbox]\ntable = \"public.outbox\"\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("target.outbox.event_table: is required"), "{err}");
    let config = load(
        &format!("{dynamo}\n[target.outbox]\ntable = \"public.outbox\"\nevent_table = \"events\"\n"),
        &[],
    )
    .unwrap();
    assert_eq!(config.target.outbox().and_then(|o| o.event_table.as_deref()), Some("events"));
}

#[test]
fn a_pipeline_has_exactly_one_source_and_a_polled_table_is_the_outbox_table() {
    let neither = MINIMAL
        .replace("[source.replication]\n    slot = \"sluice\"\n    publication = \"sluice_pub\"\n", "");
    let err = load(&neither, &[]).unwrap_err().to_string();
    assert!(
        err.contains(
            "source.replication: configure [source.replication] (logical replication), [source.poll] (an outbox table) or [source.kafka]"
        ),
        "{err}"
    );
    let both = MINIMAL.replace("[target]", "[source.poll]\ntable = \"public.outbox\"\n[target]");
    let err = load(&both, &[]).unwrap_err().to_string();
    assert!(
        err.contains(
            "source.poll: [source.replication], [source.poll] and [source.kafka] exclude each other"
        ),
        "{err}"
    );
    let kafka =
        "[target]\nkind = \"kafka\"\nbrokers = \"k:9092\"\n[target.outbox]\ntable = \"public.outbox\"\n";
    let poll = |poll: &str| format!("[source.connection]\ndbname = \"app\"\n[source.poll]\n{poll}\n{kafka}");
    let config = load(&poll("table = \"public.outbox\"\ninterval = \"250ms\""), &[]).unwrap();
    let polled = config.source.poll().unwrap();
    assert_eq!(
        (polled.batch_size, polled.interval, polled.after_publish),
        (500, Duration::from_millis(250), sluice_postgres::AfterPublish::Delete)
    );
    assert_eq!(config.source.lock_name(), "poll:public.outbox");
    let err = load(&poll("table = \"public.events\"\nbatch_size = 0"), &[]).unwrap_err().to_string();
    assert!(
        err.contains("source.poll.batch_size")
            && err.contains("source.poll.table: must be the table of target.outbox.table"),
        "{err}"
    );
}

#[test]
fn kafka_properties_take_any_scalar_and_hide_secrets() {
    let text =
        "[source.connection]\ndbname = \"app\"\n[source.replication]\nslot = \"s\"\npublication = \"p\"\n\
                [target]\nkind = \"kafka\"\nbrokers = \"k:9092\"\n[target.properties]\n\"linger.ms\" = 20\n";
    let config = load(text, &[("SLUICE__TARGET__PROPERTIES__SASL.PASSWORD", "12345")]).unwrap();
    let TargetConfig::Kafka(kafka) = &config.target else { panic!("kafka") };
    assert_eq!(kafka.properties.0.get("linger.ms").map(String::as_str), Some("20"));
    assert_eq!(kafka.properties.0.get("sasl.password").map(String::as_str), Some("12345"));
    assert!(!format!("{config:?}").contains("12345"), "{config:?}");
}

#[test]
fn streaming_takes_a_flag_or_a_word_and_parallel_needs_protocol_4() {
    let replication = |extra: &str| {
        let config = load(&MINIMAL.replace("slot = \"sluice\"", &format!("slot = \"sluice\"\n{extra}")), &[]);
        config.map(|c| match c.source.mode {
            SourceMode::Replication(r) => r,
            _ => unreachable!(),
        })
    };
    use sluice_postgres::Streaming;
    assert_eq!(replication("proto_version = 2\nstreaming = true").unwrap().streaming, Streaming::On);
    assert_eq!(replication("proto_version = 2\nstreaming = \"on\"").unwrap().streaming, Streaming::On);
    assert_eq!(replication("streaming = false").unwrap().streaming, Streaming::Off);
    let parallel =
        replication("proto_version = 4\nstreaming = \"parallel\"\nfailover = true\norigin = \"none\"")
            .unwrap();
    assert_eq!(parallel.streaming, Streaming::Parallel);
    assert!(parallel.failover);
    assert_eq!(parallel.origin, sluice_postgres::OriginFilter::None);

    let ConfigError::Invalid { problems } =
        replication("proto_version = 2\nstreaming = \"parallel\"").unwrap_err()
    else {
        panic!("expected problems")
    };
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].key, "source.replication.streaming");
    assert!(problems[0].to_string().contains("proto_version = 4, not 2"), "{}", problems[0]);

    let err = replication("streaming = \"sometimes\"").unwrap_err().to_string();
    assert!(err.contains("source.replication.streaming") && err.contains("parallel"), "{err}");
    let ConfigError::Invalid { problems } = replication("proto_version = 5").unwrap_err() else {
        panic!("expected problems")
    };
    assert_eq!(problems[0].key, "source.replication.proto_version");
}

#[test]
fn several_hosts_are_listed_in_order_with_their_ports() {
    let config = load(
        &MINIMAL.replace(
            "dbname = \"app\"",
            "dbname = \"app\"\nhost = \"pg-a:5433, pg-b,[::1]:5434\"\ntarget_session_attrs = \"primary\"",
        ),
        &[],
    )
    .unwrap();
    let connection = &config.source.connection;
    assert_eq!(
        connection.servers().unwrap(),
        [("pg-a".to_owned(), 5433), ("pg-b".to_owned(), 5432), ("::1".to_owned(), 5434)]
    );
    assert!(connection.chooses());
    assert_eq!(connection.addr(), "pg-a:5433,pg-b:5432,::1:5434");
    let ConfigError::Invalid { problems } =
        load(&MINIMAL.replace("dbname = \"app\"", "dbname = \"app\"\nhost = \"pg-a:x,\""), &[]).unwrap_err()
    else {
        panic!("expected problems")
    };
    assert_eq!(problems[0].key, "source.connection.host");
    assert!(problems[0].to_string().contains("port"), "{}", problems[0]);
    let ConfigError::Invalid { problems } = load(
        &MINIMAL.replace("[target]", "[source.heartbeat_connection]\ndbname = \"app\"\nport = 0\n[target]"),
        &[],
    )
    .unwrap_err() else {
        panic!("expected problems")
    };
    assert_eq!(problems[0].key, "source.heartbeat_connection.port");
}

#[test]
fn a_syntax_error_says_where_without_quoting_the_file() {
    // A NUL byte in a comment: the TOML parser's own message for it is empty.
    let text = format!("{MINIMAL}# a comment\0\n");
    let Err(ConfigError::Syntax { message, .. }) = load(&text, &[]) else { panic!("accepted") };
    assert_eq!(message, "not valid TOML: unexpected character (line 9, column 12)");
    let text = format!("{MINIMAL}[source.connection.more]\npassword = \"hunter2\" x\n");
    let Err(ConfigError::Syntax { message, .. }) = load(&text, &[]) else { panic!("accepted") };
    assert!(message.contains("(line 10, column 22)") && !message.contains("hunter2"), "{message}");
}

const APPLIER: &str = r#"
    [source.kafka]
    brokers = "k:9092"
    topics = ["cdc.public.accounts", "^cdc\\.shop\\..*"]
    group_id = "appliers"
    properties = { "sasl.password" = "hunter2" }
    [target]
    kind = "null"
"#;

#[test]
fn an_applier_reads_kafka_with_no_database_and_its_conflicts_are_named() {
    let config = load(APPLIER, &[]).unwrap();
    let kafka = config.source.kafka().expect("a Kafka source");
    assert_eq!(kafka.topics.len(), 2);
    assert_eq!(kafka.linger, Duration::from_millis(5));
    assert!(!config.source.is_database());
    assert!(!format!("{config:?}").contains("hunter2"));
    let keys = |text: &str| match load(text, &[]) {
        Err(ConfigError::Invalid { problems }) => problems.iter().map(|p| p.key.clone()).collect::<Vec<_>>(),
        other => panic!("refused: {other:?}"),
    };
    let with_database = APPLIER.replace("[target]", "[source.connection]\ndbname = \"app\"\n[target]");
    assert_eq!(keys(&with_database)[0], "source.connection");
    let with_slot =
        APPLIER.replace("[target]", "[source.replication]\nslot = \"s\"\npublication = \"p\"\n[target]");
    assert!(keys(&with_slot).contains(&"source.kafka".to_string()));
    assert_eq!(
        keys(&APPLIER.replace("kind = \"null\"", "kind = \"kafka\"\nbrokers = \"k:9092\"")),
        ["target.kind"]
    );
    assert_eq!(
        keys(&APPLIER.replace("group_id = \"appliers\"", "group_id = \"\"")),
        ["source.kafka.group_id"]
    );
    assert_eq!(
        keys(&APPLIER.replace("properties = {", "properties = { \"enable.auto.commit\" = true, ")),
        ["source.kafka.properties.enable.auto.commit"]
    );
    // A database source still needs its connection, and the message says so.
    let without = MINIMAL.replace("[source.connection]\n    dbname = \"app\"\n", "");
    assert_eq!(keys(&without)[0], "source.connection");
}
