//! The `switchboard` binary as an operator runs it: signals, exit codes,
//! configuration errors.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::Client;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the child if the test fails before it exits.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn spawn_server(args: &[&str]) -> (Guard, u16) {
    let port = free_port();
    let guard = Guard(
        Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the binary starts"),
    );
    let url = format!("http://127.0.0.1:{port}/readyz");
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(&url).await {
            if r.status() == 200 {
                return (guard, port);
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the server did not become ready");
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn wait_exit(guard: &mut Guard) -> std::process::ExitStatus {
    for _ in 0..400 {
        if let Some(status) = guard.0.try_wait().unwrap() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the process did not exit");
}

#[tokio::test]
async fn sigterm_asks_clients_to_reconnect_and_exits_0() {
    let (mut guard, port) = spawn_server(&["--drain-timeout", "5s"]).await;
    let url = format!("ws://127.0.0.1:{port}/");
    let mut a = Client::connect_url(&url).await;
    let mut b = Client::connect_url(&url).await;
    signal(&guard.0, "-TERM");
    assert_eq!(a.expect_close().await, 1012);
    assert_eq!(b.expect_close().await, 1012);
    let status = wait_exit(&mut guard).await;
    assert_eq!(status.code(), Some(0), "clean exit after the drain");
}

#[tokio::test]
async fn sigint_exits_0_with_no_clients() {
    let (mut guard, _port) = spawn_server(&[]).await;
    signal(&guard.0, "-INT");
    assert_eq!(wait_exit(&mut guard).await.code(), Some(0));
}

#[test]
fn bad_configuration_is_refused_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--bus", "carrier-pigeon://x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bus"), "{err}");

    let dir = std::env::temp_dir().join(format!("sb-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "port = 9000\nping_interval = \"20s\"\n[namespaces.chat]\nhistory_size = 50\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[namespaces.chat]\nhistroy_size = 50\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("histroy_size"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn healthcheck_probes_the_local_server() {
    let (_guard, port) = spawn_server(&[]).await;
    let probe = |port: u16| {
        Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["--healthcheck", "--port", &port.to_string()])
            .output()
            .unwrap()
            .status
    };
    assert!(probe(port).success());
    assert!(!probe(free_port()).success(), "nothing listens there");
}
