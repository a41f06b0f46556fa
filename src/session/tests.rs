//! The protocol logic driven through in-memory channels instead of a
//! socket (axum's testing-websockets pattern).

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_channel::mpsc;
use serde_json::{Value, json};

use futures_util::{Sink, Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::{Mode, serve};
use crate::config::Config;
use crate::error::close;
use crate::node::Node;
use crate::ws::{Message, SendShared};

/// A fake socket: frames in through one channel, out through another.
struct ChannelSocket {
    incoming: mpsc::UnboundedReceiver<Result<Message, std::io::Error>>,
    outgoing: mpsc::UnboundedSender<Message>,
}

impl Stream for ChannelSocket {
    type Item = Result<Message, std::io::Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.incoming).poll_next(cx)
    }
}

impl Sink<Message> for ChannelSocket {
    type Error = mpsc::SendError;
    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.outgoing).poll_ready(cx)
    }
    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        Pin::new(&mut self.outgoing).start_send(item)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.outgoing).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.outgoing).poll_close(cx)
    }
}

impl SendShared for ChannelSocket {}

async fn next_json(rx: &mut mpsc::UnboundedReceiver<Message>) -> Value {
    match rx.next().await {
        Some(Message::Text(t)) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

#[tokio::test]
async fn protocol_over_channels() {
    let node = Node::new(Config::default()).await.unwrap();
    let (to_server, incoming) = mpsc::unbounded();
    let (outgoing, mut from_server) = mpsc::unbounded();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(
        node.clone(),
        ChannelSocket { incoming, outgoing },
        Mode::Protocol,
        shutdown.clone(),
        Default::default(),
    ));
    let welcome = next_json(&mut from_server).await;
    assert_eq!(welcome["type"], "connected");
    assert_eq!(node.hub().len(), 1);

    let send = |v: Value| {
        to_server
            .unbounded_send(Ok(Message::Text(v.to_string().into())))
            .unwrap()
    };
    send(json!({"type":"subscribe","channel":"c","id":1}));
    let r = next_json(&mut from_server).await;
    assert_eq!(r["type"], "subscribed");
    send(json!({"type":"publish","channel":"c","data":[1],"id":2}));
    // The ack is written directly, the message comes through the queue.
    let mut got: Vec<Value> = vec![
        next_json(&mut from_server).await,
        next_json(&mut from_server).await,
    ];
    got.sort_by_key(|v| v["type"].as_str().unwrap().to_string());
    assert_eq!(got[0]["type"], "ack");
    assert_eq!(got[1]["type"], "message");
    assert_eq!(got[1]["data"], json!([1]));
    send(json!({"type":"nope","id":3}));
    let e = next_json(&mut from_server).await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_u64()),
        (Some("unknown_type"), Some(3))
    );

    // Shutdown: a close request through the queue, as the server's drainer
    // makes one (its spreading is tested over sockets in tests/drain.rs),
    // gives a 1012 close frame, then the session cleans up.
    shutdown.cancel();
    for client in node.hub().clients() {
        client.queue.close(crate::queue::CloseReason::new(
            close::SERVICE_RESTART,
            "server draining; retry=100",
        ));
    }
    match from_server.next().await {
        Some(Message::Close(Some(f))) => assert_eq!(f.code, close::SERVICE_RESTART),
        other => panic!("expected a close frame, got {other:?}"),
    }
    drop(to_server);
    task.await.unwrap();
    assert_eq!(node.hub().len(), 0);
    assert_eq!(node.hub().subscriber_count("c"), 0);
}
