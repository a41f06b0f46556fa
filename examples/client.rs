//! A minimal Rust client: connect, subscribe to a channel, publish into it,
//! print what arrives, and exit.
//!
//! ```sh
//! cargo run --release &                       # a server on :8080
//! cargo run --example client -- ws://127.0.0.1:8080/ws chat:lobby
//! ```

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8080/ws".into());
    let channel = args.next().unwrap_or_else(|| "chat:lobby".into());
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await?;

    let send = |v: Value| Message::text(v.to_string());
    ws.send(send(json!({"type":"subscribe","channel":channel,"id":1})))
        .await?;
    ws.send(send(
        json!({"type":"publish","channel":channel,"data":{"text":"hello from Rust"},"id":2}),
    ))
    .await?;

    // Print frames until our own publication has come back.
    while let Some(frame) = ws.next().await {
        let Message::Text(text) = frame? else {
            continue;
        };
        println!("{text}");
        let v: Value = serde_json::from_str(&text)?;
        if v["type"] == "message" && v["data"]["text"] == "hello from Rust" {
            break;
        }
    }
    ws.close(None).await?;
    Ok(())
}
