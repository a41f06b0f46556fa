//! The binary's log output as a file or pipe receives it: plain text with
//! no ANSI escapes, or JSON lines in Cloud Logging's shape (`severity`,
//! `message`, `time`), with the format chosen by flag or TOML key; and on a
//! terminal, colour unless `NO_COLOR` is set.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Whether `GET /readyz` on the port answers 200.
fn ready(port: u16) -> bool {
    let probe = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut head = String::new();
        s.read_to_string(&mut head)?;
        Ok(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"))
    };
    probe().unwrap_or(false)
}

/// Run the binary with stdout to a pipe until it serves, stop it with
/// SIGTERM, and return every line it wrote.
fn run_until_served(args: &[&str]) -> Vec<String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--demo", "false"])
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .env_remove("SWITCHBOARD_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    // The signal handler is in place once the server answers.
    let mut serving = false;
    for _ in 0..400 {
        if ready(port) {
            serving = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = BufReader::new(child.stdout.take().unwrap());
    let lines: Vec<String> = out.lines().map(Result::unwrap).collect();
    assert!(serving, "the server did not answer /readyz: {lines:#?}");
    assert!(child.wait().unwrap().success(), "{lines:#?}");
    lines
}

#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    let lines = run_until_served(&["--log", "debug"]);
    for line in &lines {
        assert!(!line.contains('\u{1b}'), "an ANSI escape in {line:?}");
    }
    assert!(lines.iter().any(|l| l.contains("INFO")), "{lines:#?}");
}

fn check_cloud_logging_shape(lines: &[String]) {
    assert!(lines.len() >= 2, "{lines:#?}");
    for line in lines {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"));
        let severity = entry["severity"].as_str().expect("a severity");
        assert!(
            ["DEBUG", "INFO", "WARNING", "ERROR"].contains(&severity),
            "{line}"
        );
        assert!(entry["message"].is_string(), "{line}");
        // RFC 3339 in UTC, e.g. 2026-01-02T03:04:05.678901Z.
        let time = entry["time"].as_str().expect("a time");
        let b = time.as_bytes();
        assert!(
            time.len() >= 20
                && b[4] == b'-'
                && b[7] == b'-'
                && b[10] == b'T'
                && b[13] == b':'
                && b[16] == b':'
                && time.ends_with('Z'),
            "{line}"
        );
        assert!(entry.get("level").is_none(), "Cloud Logging reads severity");
    }
    let listening = lines
        .iter()
        .find(|l| l.contains("switchboard listening"))
        .unwrap();
    let entry: serde_json::Value = serde_json::from_str(listening).unwrap();
    assert_eq!(entry["message"], "switchboard listening");
    assert_eq!(entry["severity"], "INFO");
    assert!(
        entry["addr"].is_string(),
        "the event's fields are kept: {entry}"
    );
}

#[test]
fn json_logs_are_in_cloud_loggings_shape() {
    check_cloud_logging_shape(&run_until_served(&["--log-format", "json"]));
}

#[test]
fn log_and_log_format_are_toml_keys() {
    let dir = std::env::temp_dir().join(format!("sb-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("logs.toml");
    std::fs::write(&file, "log_format = \"json\"\n").unwrap();
    check_cloud_logging_shape(&run_until_served(&["--config", file.to_str().unwrap()]));
    std::fs::write(&file, "log = \"warn\"\nlog_format = \"json\"\n").unwrap();
    let lines = run_until_served(&["--config", file.to_str().unwrap()]);
    assert!(
        lines.iter().all(|l| !l.contains("\"severity\":\"INFO\"")),
        "the file's log filter applies: {lines:#?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Run the binary on a pseudo-terminal (util-linux `script`) for a second
/// and return what it wrote there.
fn run_on_a_terminal(no_color: Option<&str>) -> String {
    let command = format!(
        "timeout 1 {} --host 127.0.0.1 --port 0 --demo false",
        env!("CARGO_BIN_EXE_switchboard")
    );
    let mut script = Command::new("script");
    script.args(["-qec", &command, "/dev/null"]);
    script
        .env_remove("NO_COLOR")
        .env_remove("SWITCHBOARD_LOG_FORMAT");
    if let Some(v) = no_color {
        script.env("NO_COLOR", v);
    }
    let out = script
        .stdin(Stdio::null())
        .output()
        .expect("util-linux `script` runs the binary on a pseudo-terminal");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("switchboard listening"), "{text:?}");
    text
}

#[test]
fn colour_on_a_terminal_unless_no_color() {
    assert!(
        run_on_a_terminal(None).contains('\u{1b}'),
        "colour on a terminal"
    );
    assert!(
        !run_on_a_terminal(Some("1")).contains('\u{1b}'),
        "NO_COLOR turns it off"
    );
    assert!(
        run_on_a_terminal(Some("")).contains('\u{1b}'),
        "an empty NO_COLOR does not"
    );
}
