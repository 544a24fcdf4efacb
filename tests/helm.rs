//! The Helm chart in `helm/sluice`: `helm lint` and `helm template` with the default values and
//! with a values file that turns everything on; the rendered manifests validated against the
//! Kubernetes API schemas; the rendered configuration accepted by `sluice validate`; the alert
//! rules accepted by promtool; bad values refused by `values.schema.json`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/sluice");

/// A tool from `env`, else where .ci/run caches it, else from PATH.
fn tool(env: &str, name: &str) -> PathBuf {
    let cached = match name {
        "helm" => "helm/helm",
        _ => "kubeval/bin/kubernetes-validate",
    };
    let cached =
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/sluice-ci").join(cached));
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .or(cached.filter(|p| p.exists()))
        .unwrap_or_else(|| PathBuf::from(name));
    assert!(
        Command::new(&path).arg("--help").output().is_ok_and(|o| o.status.success()),
        "{name} is needed for the chart tests (.ci/run installs it; or set {env})"
    );
    path
}

fn helm(home: &Path, args: &[&str]) -> Output {
    Command::new(tool("SLUICE_TEST_HELM", "helm"))
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .expect("run helm")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// The rendered manifests for these values.
fn render(home: &Path, values: Option<&str>) -> String {
    let mut args = vec!["lint", CHART, "--strict"];
    if let Some(values) = values {
        args.extend(["-f", values]);
    }
    let lint = helm(home, &args);
    assert!(lint.status.success(), "helm lint: {}", text(&lint));
    args[0] = "template";
    args[1] = "release";
    args[2] = CHART;
    let rendered = helm(home, &args);
    assert!(rendered.status.success(), "helm template: {}", text(&rendered));
    String::from_utf8(rendered.stdout).unwrap()
}

fn kubernetes_validate(file: &Path) -> Output {
    Command::new(tool("SLUICE_TEST_KUBE_VALIDATE", "kubernetes-validate"))
        .args(["--strict", "-k", "1.33.0"])
        .arg(file)
        .output()
        .unwrap()
}

/// The block of lines indented under the line that equals `header` (trimmed), dedented.
fn block_under(manifest: &str, header: &str) -> String {
    let mut lines = manifest.lines().skip_while(|l| l.trim() != header);
    let header_line = lines.next().unwrap_or_else(|| panic!("no {header:?} in {manifest}"));
    let header_indent = header_line.len() - header_line.trim_start().len();
    let body: Vec<&str> =
        lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > header_indent).collect();
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    body.iter().map(|l| l.get(indent..).unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Validates one rendering: Kubernetes schemas, the sluice configuration, the alert rules.
fn check_rendering(dir: &Path, name: &str, manifests: &str) {
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, manifests).unwrap();
    let validated = kubernetes_validate(&file);
    assert!(validated.status.success(), "kubernetes-validate {name}: {}", text(&validated));
    for kind in ["deployment", "configmap", "service", "poddisruptionbudget", "serviceaccount"] {
        assert!(
            text(&validated).contains(&format!("passed for resource {kind}/")),
            "{name}: {kind} validated: {}",
            text(&validated)
        );
    }
    assert!(
        manifests.contains("path: /healthz") && manifests.contains("path: /readyz?standby=ok"),
        "probes: {manifests}"
    );
    assert!(manifests.contains("readOnlyRootFilesystem: true") && manifests.contains("runAsNonRoot: true"));

    // The configuration the pod reads passes `sluice validate`.
    let config = dir.join(format!("{name}.json"));
    let mut json: serde_json::Value =
        serde_json::from_str(&block_under(manifests, "sluice.json: |")).unwrap();
    if (json["target"]["kind"] == "dynamodb" && json["target"]["outbox"].is_null())
        || json["target"]["kind"] == "postgres"
    {
        assert_eq!(json["target"]["mapping"], "/etc/sluice/mapping.toml");
        let mapping = dir.join(format!("{name}-mapping.toml"));
        std::fs::write(&mapping, block_under(manifests, "mapping.toml: |")).unwrap();
        json["target"]["mapping"] = serde_json::Value::String(mapping.display().to_string());
    }
    // The pod mounts an emptyDir there; here a temp dir stands in for it.
    if json["source"]["poll"].is_null() {
        assert_eq!(json["source"]["replication"]["spill_dir"], "/var/lib/sluice/spill");
        json["source"]["replication"]["spill_dir"] = serde_json::Value::String(dir.display().to_string());
    } else {
        assert!(json["source"]["replication"].is_null(), "one source: {json}");
    }
    assert_eq!(
        json["monitoring"]["listen"].as_str().unwrap().rsplit(':').next(),
        manifests.split("containerPort: ").nth(1).and_then(|s| s.lines().next())
    );
    std::fs::write(&config, serde_json::to_string(&json).unwrap()).unwrap();
    let (code, out) = crate::harness::sluice_output(
        &["validate", "--offline", "-c", config.to_str().unwrap()],
        std::time::Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "{name}: the rendered configuration is valid: {out}");
}

#[test]
fn chart_renders_valid_manifests_with_default_and_full_values() {
    let dir = tempfile::tempdir().unwrap();
    let default = render(dir.path(), None);
    check_rendering(dir.path(), "default", &default);
    assert!(
        !default.contains("kind: ServiceMonitor") && !default.contains("kind: PrometheusRule"),
        "off by default"
    );

    let full_values = format!("{CHART}/ci/full-values.yaml");
    let full = render(dir.path(), Some(&full_values));
    check_rendering(dir.path(), "full", &full);
    assert!(full.contains("kind: ServiceMonitor") && full.contains("kind: PrometheusRule"));
    assert!(
        full.contains("name: SLUICE__SOURCE__CONNECTION__PASSWORD") && full.contains("name: orders-db"),
        "password from the Secret"
    );
    assert!(full.contains("eks.amazonaws.com/role-arn"), "service account annotations for IRSA");

    // The alert rules are valid Prometheus rules.
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, format!("groups:\n{}\n", block_under(&full, "groups:"))).unwrap();
    let promtool = std::env::var_os("SLUICE_TEST_PROMTOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("promtool"));
    let checked = Command::new(promtool).args(["check", "rules"]).arg(&rules).output().expect("promtool");
    assert!(checked.status.success(), "promtool check rules: {}", text(&checked));
    assert!(text(&checked).contains("4 rules found"), "{}", text(&checked));

    // The polling outbox source into a DynamoDB event log: no slot, no spill directory, no mapping.
    let poll_values = dir.path().join("poll-values.yaml");
    std::fs::write(
        &poll_values,
        "config:\n  source:\n    replication: null\n    poll:\n      table: public.outbox\n      after_publish: mark\n  target:\n    kind: dynamodb\n    outbox:\n      table: public.outbox\n      event_table: events\n",
    )
    .unwrap();
    let poll = render(dir.path(), Some(poll_values.to_str().unwrap()));
    check_rendering(dir.path(), "poll", &poll);
    assert!(!poll.contains("mapping.toml"), "no mapping without one");

    // A Postgres target with its mapping.
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/postgres/examples/shop_v2.toml"
    ))
    .unwrap();
    let pg_values = dir.path().join("pg-values.yaml");
    let mapping: String = example.lines().map(|l| format!("  {l}\n")).collect();
    std::fs::write(
        &pg_values,
        format!(
            "config:\n  target:\n    kind: postgres\n    connection:\n      host: shop-v2-db\n      dbname: shop_v2\n\
             targetPostgresPassword: {{ secretName: shop-v2-db }}\nmapping: |\n{mapping}"
        ),
    )
    .unwrap();
    let pg = render(dir.path(), Some(pg_values.to_str().unwrap()));
    check_rendering(dir.path(), "pg", &pg);
    assert!(pg.contains("v2.customers"), "the mapping is in the ConfigMap");
    assert!(
        pg.contains("name: SLUICE__TARGET__CONNECTION__PASSWORD") && pg.contains("name: shop-v2-db"),
        "target password from the Secret"
    );
    // The way back as a second Deployment of the release: `run --reverse`, its pods selected
    // apart from the forward ones.
    let reverse = helm(
        dir.path(),
        &["template", "release", CHART, "-f", pg_values.to_str().unwrap(), "--set", "reverse.enabled=true"],
    );
    assert!(reverse.status.success(), "{}", text(&reverse));
    let reverse = String::from_utf8_lossy(&reverse.stdout).into_owned();
    check_rendering(dir.path(), "reverse", &reverse);
    assert_eq!(reverse.matches("kind: Deployment").count(), 2, "{reverse}");
    assert!(
        reverse.contains("name: release-sluice-reverse")
            && reverse.contains(r#"args: ["run", "--reverse", "--config", "/etc/sluice/sluice.json"]"#)
            && reverse.contains("app.kubernetes.io/name: sluice-reverse")
            && !pg.contains("sluice-reverse"),
        "{reverse}"
    );
    // A DynamoDB target's way back reads the tables' streams: the same second Deployment.
    let shop =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/examples/shop.toml")).unwrap();
    let dynamo_values = dir.path().join("dynamo-values.yaml");
    let mapping: String = shop.lines().map(|l| format!("  {l}\n")).collect();
    std::fs::write(
        &dynamo_values,
        format!("config:\n  target:\n    kind: dynamodb\nreverse:\n  enabled: true\nmapping: |\n{mapping}"),
    )
    .unwrap();
    let dynamo = render(dir.path(), Some(dynamo_values.to_str().unwrap()));
    check_rendering(dir.path(), "dynamo-reverse", &dynamo);
    assert_eq!(dynamo.matches("kind: Deployment").count(), 2, "{dynamo}");
    assert!(
        dynamo.contains(r#"args: ["run", "--reverse", "--config", "/etc/sluice/sluice.json"]"#),
        "{dynamo}"
    );
    let out = helm(dir.path(), &["template", "release", CHART, "--set", "reverse.enabled=true"]);
    assert!(
        !out.status.success() && text(&out).contains("config.target.kind must be postgres"),
        "{}",
        text(&out)
    );
    let out = helm(
        dir.path(),
        &[
            "template",
            "release",
            CHART,
            "--set",
            "config.target.kind=postgres",
            "--set",
            "config.target.connection.dbname=v2",
        ],
    );
    assert!(!out.status.success() && text(&out).contains("Postgres mapping"), "{}", text(&out));
}

/// The `config` part of `values.schema.json` is generated from sluice's configuration types
/// (`sluice::config::schema`), so that the chart refuses exactly what sluice would. After a
/// change to the configuration, `SLUICE_UPDATE_CHART_SCHEMA=1 cargo test chart_schema` writes it.
#[test]
fn chart_schema_config_is_the_generated_one() {
    let path = Path::new(CHART).join("values.schema.json");
    let current: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let generated = sluice::config::schema::with_chart_config(&current);
    if std::env::var_os("SLUICE_UPDATE_CHART_SCHEMA").is_some() {
        std::fs::write(&path, format!("{generated:#}\n")).unwrap();
        return;
    }
    // `sluice config-schema` prints the configuration's schema the chart's is made from.
    let out = crate::harness::sluice().arg("config-schema").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, sluice::config::schema::config_schema());
    assert!(printed.pointer("/properties/source/properties/connection/properties/password").is_some());
    assert!(
        current == generated,
        "helm/sluice/values.schema.json's config is not the one generated from the configuration \
         types: run SLUICE_UPDATE_CHART_SCHEMA=1 cargo test --test main chart_schema"
    );
}

#[test]
fn chart_refuses_bad_values_and_the_validator_catches_bad_manifests() {
    let dir = tempfile::tempdir().unwrap();
    for (setting, complaint) in [
        ("config.source.connection.password=plaintext", "/config/source/connection"),
        ("log.format=xml", "/log/format"),
        ("config.source.replication.on_slot_lost=ignore", "on_slot_lost"),
        ("metricsPort=0", "/metricsPort"),
        ("config.source.poll.table=outbox", "/config/source"),
        ("config.target.connection.password=plaintext", "/config/target"),
        // Unknown keys and wrong types in the configuration's own sections.
        ("config.pipline.name=orders", "pipline"),
        ("config.pipeline.max_in_flght=8", "max_in_flght"),
        ("config.pipeline.max_in_flight=many", "/config/pipeline/max_in_flight"),
        ("config.ha.retry_interval=soon", "/config/ha/retry_interval"),
        ("config.monitoring.listen=0.0.0.0:1", "listen"),
        ("config.backfill.chunk_size=-5", "/config/backfill/chunk_size"),
        ("config.source.replication.streaming=yes", "/config/source/replication/streaming"),
        ("config.source.connection.sslmode=prefer", "/config/source/connection/sslmode"),
        // A key of another kind of target, named against the kind chosen.
        ("config.target.brokers=kafka:9092", "additional properties 'brokers' not allowed"),
        ("config.target.kind=kafka", "missing property 'brokers'"),
        ("config.target.kind=s3", "/config/target/kind"),
    ] {
        let out = helm(dir.path(), &["template", "release", CHART, "--set", setting]);
        assert!(!out.status.success(), "{setting} must be refused");
        let message = text(&out);
        assert!(message.contains(complaint), "{setting}: {message}");
        // Messages a person reads: no bare "'not' failed" nor "none matched" without a reason.
        assert!(!message.contains("'not' failed"), "{setting}: {message}");
    }
    let mut args = vec!["template", "release", CHART];
    for setting in ["config.target.kind=dynamodb", "config.target.secret_access_key=x", "mapping=x"] {
        args.extend(["--set", setting]);
    }
    let out = helm(dir.path(), &args);
    assert!(
        !out.status.success() && text(&out).contains("additional properties 'secret_access_key' not allowed"),
        "{}",
        text(&out)
    );
    let out = helm(dir.path(), &["template", "release", CHART, "--set", "config.target.kind=dynamodb"]);
    assert!(!out.status.success() && text(&out).contains("set mapping"), "{}", text(&out));

    // A deployment with a misspelt field: the validator must fail, or its passes mean nothing.
    let broken =
        render(dir.path(), None).replace("terminationGracePeriodSeconds:", "terminationGracePeriod:");
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, broken).unwrap();
    assert!(!kubernetes_validate(&file).status.success());
}

/// Appliers: a second Deployment running `[source.kafka]` over the topics the pipeline writes,
/// its Service and disruption budget, and an autoscaler bounded by the partition count.
#[test]
fn chart_deploys_appliers_in_a_consumer_group_bounded_by_the_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("appliers-values.yaml");
    std::fs::write(
        &values,
        "config:\n  target:\n    kind: kafka\n    brokers: kafka:9092\n    topic: \"cdc.{schema}.{table}\"\n\
         appliers:\n  enabled: true\n  replicaCount: 3\n  partitions: 6\n  source:\n    brokers: kafka:9092\n    \
         topics: [\"cdc.public.orders\"]\n    group_id: orders-appliers\n  target:\n    kind: dynamodb\n  \
         autoscaling:\n    enabled: true\n\
         mapping: |\n  [[tables]]\n  source = \"public.orders\"\n  target = \"orders\"\n  \
         partition_key = { attribute = \"pk\", template = \"ORDER#{id}\" }\n",
    )
    .unwrap();
    let manifests = render(dir.path(), Some(values.to_str().unwrap()));
    let file = dir.path().join("appliers.yaml");
    std::fs::write(&file, &manifests).unwrap();
    let validated = kubernetes_validate(&file);
    assert!(validated.status.success(), "kubernetes-validate: {}", text(&validated));
    for resource in [
        "deployment/release-sluice-appliers",
        "horizontalpodautoscaler/release-sluice-appliers",
        "service/release-sluice-appliers",
        "poddisruptionbudget/release-sluice-appliers",
    ] {
        assert!(
            text(&validated).contains(&format!("passed for resource {resource}")),
            "{resource}: {}",
            text(&validated)
        );
    }
    assert_eq!(manifests.matches("\nkind: Deployment").count(), 2, "the pipeline and the appliers");
    assert!(manifests.contains(r#"args: ["run", "--config", "/etc/sluice/applier.json"]"#), "{manifests}");
    assert!(manifests.contains("maxReplicas: 6") && manifests.contains("name: sluice_kafka_consumer_lag"));

    // The appliers' configuration passes `sluice validate`, with the mapping mounted.
    let mut json: serde_json::Value =
        serde_json::from_str(&block_under(&manifests, "applier.json: |")).unwrap();
    assert_eq!(json["source"]["kafka"]["group_id"], "orders-appliers");
    assert!(json["source"]["connection"].is_null(), "an applier reads no database");
    assert_eq!(json["target"]["mapping"], "/etc/sluice/mapping.toml");
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(&mapping, block_under(&manifests, "mapping.toml: |")).unwrap();
    json["target"]["mapping"] = serde_json::Value::String(mapping.display().to_string());
    let config = dir.path().join("applier.json");
    std::fs::write(&config, json.to_string()).unwrap();
    let (code, out) = crate::harness::sluice_output(
        &["validate", "--offline", "-c", config.to_str().unwrap()],
        std::time::Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "{out}");

    // Refused: more replicas than partitions, and appliers behind a pipeline that writes no topics.
    let values = values.to_str().unwrap();
    let out =
        helm(dir.path(), &["template", "release", CHART, "-f", values, "--set", "appliers.replicaCount=7"]);
    assert!(
        !out.status.success() && text(&out).contains("more than appliers.partitions (6)"),
        "{}",
        text(&out)
    );
    let jsonl = dir.path().join("jsonl-values.yaml");
    let text_of = std::fs::read_to_string(values).unwrap();
    std::fs::write(
        &jsonl,
        text_of.split_once("appliers:").map(|(_, rest)| format!("appliers:{rest}")).unwrap(),
    )
    .unwrap();
    let out = helm(dir.path(), &["template", "release", CHART, "-f", jsonl.to_str().unwrap()]);
    assert!(
        !out.status.success() && text(&out).contains("config.target.kind must be kafka"),
        "{}",
        text(&out)
    );
}
