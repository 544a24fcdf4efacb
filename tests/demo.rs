//! The quick-start (`sluice demo`, the README's first command) end to end: its own cluster,
//! the changes delivered, exit 0.

use crate::harness::sluice;

fn demo(args: &[&str]) -> (String, String) {
    let out = sluice().arg("demo").args(args).output().expect("run sluice demo");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "demo exits 0: {stderr}");
    (stdout, stderr)
}

#[test]
fn the_demo_prints_every_change_as_json_lines_and_exits_0() {
    let (stdout, stderr) = demo(&[]);
    let lines: Vec<serde_json::Value> =
        stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    let ops: Vec<&str> = lines
        .iter()
        .filter(|l| l["op"] != "begin" && l["op"] != "commit")
        .map(|l| l["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["insert", "insert", "update", "update", "insert", "delete"], "{stdout}");
    assert_eq!(lines.iter().filter(|l| l["op"] == "commit").count(), 4);
    assert!(stderr.contains("every change delivered"), "{stderr}");
}

#[test]
fn the_postgres_demo_reads_the_mapped_rows_back_from_the_second_database() {
    let (stdout, stderr) = demo(&["--postgres"]);
    assert_eq!(
        stdout.trim(),
        "1|ada|75.00|{founder}|2024-05-01 09:30:00+00|demo\n2|grace|275.50|{}|2024-05-01 09:30:00+00|demo",
        "{stderr}"
    );
}
