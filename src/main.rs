//! The `switchboard` binary: parse the configuration, set up logging, bind,
//! and serve until SIGTERM or SIGINT.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use switchboard::config::{Config, Settings};
use switchboard::logging::{self, LogFormat};
use switchboard::{Node, server};

/// A real-time WebSocket server: the App Engine Flex tutorial's protocol,
/// done properly. Every option can also be set in the environment (shown
/// in brackets) or in a TOML file given with --config.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
    /// TOML configuration file; flags and environment take precedence.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration file (and flags) and exit.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Probe a running server on 127.0.0.1:$PORT (`/livez`) and exit 0 if
    /// it answers 200: the container HEALTHCHECK, with no curl needed.
    #[arg(long)]
    healthcheck: bool,
}

/// The settings: flags and environment over the TOML file, if any.
fn settings(cli: &Cli) -> Result<Settings, switchboard::error::Error> {
    let file = match cli.check_config.as_ref().or(cli.config.as_ref()) {
        Some(path) => Settings::from_file(path)?,
        None => Settings::default(),
    };
    Ok(cli.settings.clone().layered_over(file))
}

/// mimalloc instead of the system allocator: measured with
/// `switchboard-bench idle` (BENCHMARKS.md), it keeps the many small,
/// long-lived allocations of idle connections tighter than glibc's malloc,
/// which adds a header to each and fragments around the handshakes'
/// short-lived buffers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    switchboard::auth::init_crypto();
    // Logging is set up from the layered settings (`log` and `log_format`
    // may come from the file); an error before that goes to stderr.
    let config = settings(&cli).and_then(|s| {
        logging::init(
            s.log.as_deref().unwrap_or("info"),
            s.log_format.unwrap_or(LogFormat::Text),
        );
        Config::from_settings(s)
    });
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.healthcheck {
        return healthcheck(config.port);
    }
    if let Some(path) = &cli.check_config {
        println!("{}: configuration is valid", path.display());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchboard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The server runs as a task on a worker thread, not on this thread
    // inside `block_on`: the accept loop then spawns each connection's task
    // onto its own worker's queue instead of waking a worker through the
    // injection queue on every handshake.
    let served = runtime.block_on(async {
        match tokio::spawn(serve(config)).await {
            Ok(r) => r,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => Err(std::io::Error::other(e).into()),
            },
        }
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "switchboard failed");
            eprintln!("switchboard: {e}");
            ExitCode::FAILURE
        }
    }
}

/// GET /livez on the local port; exit 0 on a 200.
fn healthcheck(port: u16) -> ExitCode {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(2);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let probe = || -> std::io::Result<bool> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"GET /livez HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut head = [0u8; 16];
        let n = s.read(&mut head)?;
        Ok(head[..n].starts_with(b"HTTP/1.0 200") || head[..n].starts_with(b"HTTP/1.1 200"))
    };
    match probe() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("switchboard: healthcheck failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> switchboard::Result<()> {
    let addr = SocketAddr::new(config.host, config.port);
    let listener = server::bind(addr)?;
    let node = Node::new(config).await?;
    server::run(listener, node, server::shutdown_signal()).await
}
