//! Environment overrides: `SLUICE__SECTION__KEY=value` sets `section.key` before the file is
//! deserialized, so that secrets need not be written into it.

use sluice_core::Problem;

const ENV_PREFIX: &str = "SLUICE__";

/// `SLUICE__SOURCE__CONNECTION__PASSWORD=x` sets `source.connection.password = "x"`. Values
/// that read as TOML integers, floats or booleans keep that type; anything else is a string.
/// Returns each dotted key set, with the variable that set it.
pub(super) fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    problems: &mut Vec<Problem>,
) -> Vec<(String, String)> {
    let mut set = Vec::new();
    for (name, raw) in env {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else { continue };
        let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        if keys.iter().any(String::is_empty) {
            problems.push(Problem {
                key: name.clone(),
                message: "environment override has an empty key segment".into(),
            });
            continue;
        }
        match set_path(table, &keys, parse_env_value(&raw)) {
            Ok(()) => set.push((keys.join("."), name)),
            Err(message) => {
                problems.push(Problem { key: keys.join("."), message: format!("{name}: {message}") })
            }
        }
    }
    set
}

/// Names the environment variable behind a problem with a key it set (the file does not
/// hold the value the message is about).
pub(super) fn name_overrides(problems: &mut [Problem], set: &[(String, String)]) {
    for problem in problems {
        let by = set.iter().find(|(key, _)| {
            problem.key == *key
                || problem.key.starts_with(&format!("{key}."))
                || problem.key.starts_with(&format!("{key}["))
        });
        if let Some((_, name)) = by {
            problem.message.push_str(&format!(" (the value comes from the environment variable {name})"));
        }
    }
}

/// Sets `keys` (a dotted path) in `table`, creating tables on the way.
fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) -> Result<(), String> {
    let (first, rest) = keys.split_first().expect("at least one segment");
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return Ok(());
    }
    match table.entry(first.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new())) {
        toml::Value::Table(inner) => set_path(inner, rest, value),
        _ => Err(format!("{first} is not a table, so it cannot hold {}", rest.join("."))),
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match raw {
        "true" => return toml::Value::Boolean(true),
        "false" => return toml::Value::Boolean(false),
        _ => {}
    }
    if let Ok(f) = raw.parse::<f64>() {
        if raw.contains('.') {
            return toml::Value::Float(f);
        }
    }
    toml::Value::String(raw.to_owned())
}
