//! Run Switchboard inside your own program, on a port of your choosing, and
//! publish into a channel from the host application.
//!
//! ```sh
//! cargo run --example embedded            # then open http://127.0.0.1:8090/demo/chat
//! ```
//!
//! Every second the host publishes the time into `chat:lobby`; Ctrl-C drains
//! the connections and stops.

use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use switchboard::config::{Config, Settings};
use switchboard::{Node, server};

#[tokio::main]
async fn main() -> switchboard::Result<()> {
    let config = Config::from_settings(Settings {
        host: Some([127, 0, 0, 1].into()),
        port: Some(8090),
        ..Default::default()
    })?;
    let listener = tokio::net::TcpListener::bind((config.host, config.port)).await?;
    println!("serving on http://{}", listener.local_addr()?);
    let node = Node::new(config).await?;

    let publisher = node.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let text = format!(
                "{{\"text\":\"host says: {}\"}}",
                switchboard::protocol::now_ms()
            );
            let data: Arc<RawValue> = Arc::from(RawValue::from_string(text).expect("valid JSON"));
            let published = match publisher.channel("chat:lobby") {
                Ok(lobby) => {
                    publisher
                        .publish(None, lobby, data, Default::default())
                        .await
                }
                Err(e) => Err(e.into()),
            };
            if let Err(e) = published {
                eprintln!("publish failed: {e}");
            }
        }
    });

    server::run(listener, node, server::shutdown_signal()).await
}
