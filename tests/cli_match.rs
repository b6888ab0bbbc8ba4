//! `livegrid match`: the real binary reading stdin and writing stdout.

use std::io::Write;
use std::process::{Command, Stdio};

fn run(args: &[&str], input: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_livegrid"))
        .arg("match")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("livegrid runs");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

const DOCS: &str = r#"{"_id": 1, "name": "a", "score": 10, "tags": ["x"]}
{"_id": 2, "name": "b", "score": 30}

{"_id": 3, "name": "c", "score": {"$numberLong": "20"}, "tags": ["x", "y"]}
{"_id": {"$oid": "507f1f77bcf86cd799439011"}, "name": "d", "score": 25.5, "at": {"$date": "2024-01-01T00:00:00Z"}}
"#;

#[test]
fn filters_in_input_order_without_sort() {
    let (code, out, err) =
        run(&["--filter", r#"{"score": {"$gte": 20}}"#, "--projection", r#"{"name": 1, "_id": 0}"#], DOCS);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "{\"name\":\"b\"}\n{\"name\":\"c\"}\n{\"name\":\"d\"}\n");
}

#[test]
fn sorts_skips_and_limits() {
    let (code, out, err) = run(
        &[
            "--filter",
            "{}",
            "--sort",
            r#"{"score": -1}"#,
            "--skip",
            "1",
            "--limit",
            "2",
            "--projection",
            r#"{"score": 1}"#,
        ],
        DOCS,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "{\"_id\":{\"$oid\":\"507f1f77bcf86cd799439011\"},\"score\":25.5}\n{\"_id\":3,\"score\":20}\n");
}

#[test]
fn limit_without_sort_stops_early() {
    let (code, out, _) = run(&["--filter", r#"{"tags": "x"}"#, "--limit", "1"], DOCS);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1);
    assert!(out.starts_with("{\"_id\":1,"));
}

#[test]
fn bad_query_exits_2_with_one_line() {
    let (code, out, err) = run(&["--filter", r#"{"a": {"$where": 1}}"#], DOCS);
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("$where") && err.contains("at a"), "{err}");

    let (code, _, err) = run(&["--filter", "{not json"], DOCS);
    assert_eq!(code, 2);
    assert!(err.starts_with("error: bad query: bad query json: --filter"), "{err}");

    let (code, _, err) = run(&["--sort", r#"{"a": 0}"#], DOCS);
    assert_eq!(code, 2);
    assert!(err.contains("bad sort at a"), "{err}");
}

#[test]
fn bad_input_names_the_line() {
    let (code, _, err) = run(&[], "{\"_id\": 1}\n[1, 2]\n");
    assert_eq!(code, 1);
    assert!(err.contains("line 2") && err.contains("expected a json object"), "{err}");
}

#[test]
fn the_largest_limit_does_not_wrap() {
    // Regression: skip + limit used to wrap around and return nothing.
    let max = u64::MAX.to_string();
    let (code, out, _) = run(&["--sort", r#"{"_id": 1}"#, "--skip", "1", "--limit", &max], DOCS);
    assert_eq!((code, out.lines().count()), (0, 3), "{out}");
    let (code, out, _) = run(&["--skip", "1", "--limit", &max], DOCS);
    assert_eq!((code, out.lines().count()), (0, 3), "{out}");
}
