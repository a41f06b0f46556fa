//! `switchboard-bench`: load generator for Switchboard and for the
//! tutorial's Node server (same wire protocol for `broadcast`).
//!
//! * `idle`: server memory per idle connection and handshakes/s.
//! * `fanout`: deliveries/s, loss, publish→deliver latency, CPU per delivery.
//! * `smoke`: a few-second run of both, for CI.
//!
//! Loopback only; every run is bounded in time and in connections.

mod conn;
mod fanout;
mod idle;
mod procfs;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(name = "switchboard-bench", version, about)]
struct Cli {
    /// Tokio worker threads of the tool.
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Open N idle connections; server VmRSS per connection, handshakes/s.
    Idle(idle::IdleArgs),
    /// Publishers → server → subscribers: throughput, loss, latency, CPU.
    Fanout(fanout::FanoutArgs),
    /// Idle (100 connections) + fan-out (10 subscribers, 1 publisher, 1 s).
    Smoke(SmokeArgs),
}

#[derive(clap::Args, Debug)]
struct SmokeArgs {
    #[arg(long)]
    url: String,
    /// Server process id (optional: memory and CPU figures need it).
    #[arg(long)]
    pid: Option<u32>,
    #[arg(long, value_enum, default_value_t = fanout::Mode::Broadcast)]
    mode: fanout::Mode,
}

fn write_json<T: Serialize>(path: &Option<std::path::PathBuf>, value: &T) -> Result<(), String> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

async fn run(cmd: Cmd) -> Result<(), String> {
    match cmd {
        Cmd::Idle(args) => {
            let r = idle::run(&args).await?;
            idle::print(&r);
            write_json(&args.json, &r)?;
            if r.connected == 0 {
                return Err("no connection succeeded".into());
            }
        }
        Cmd::Fanout(args) => {
            let r = fanout::run(&args).await?;
            fanout::print(&r);
            write_json(&args.json, &r)?;
            if r.received == 0 {
                return Err("nothing was received".into());
            }
        }
        Cmd::Smoke(args) => {
            let idle = idle::run(&idle::IdleArgs {
                url: args.url.clone(),
                pid: args.pid,
                n: 100,
                concurrency: 50,
                warmup: 4,
                settle_ms: 300,
                json: None,
            })
            .await?;
            idle::print(&idle);
            if idle.connected == 0 {
                return Err("smoke: could not open any connection".into());
            }
            let fan = fanout::run(&fanout::FanoutArgs {
                urls: vec![args.url.clone()],
                pids: args.pid.into_iter().collect(),
                bus_pid: None,
                subscribers: 10,
                publishers: 1,
                rate: Some(1000.0),
                saturate: false,
                window: 8,
                duration: 1.0,
                size: 64,
                mode: args.mode,
                channel: "bench".into(),
                drain_ms: 1000,
                concurrency: 16,
                json: None,
            })
            .await?;
            fanout::print(&fan);
            if fan.received == 0 {
                return Err("smoke: nothing was received".into());
            }
            println!("smoke: ok");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchboard-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Run on a worker, not inside `block_on` on this thread: tasks the
    // tool spawns then start on that worker's own queue instead of waking
    // a worker through the injection queue each time.
    let result = rt.block_on(async {
        tokio::spawn(run(cli.cmd))
            .await
            .unwrap_or_else(|e| Err(format!("the benchmark task failed: {e}")))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
