//! An SSE test client over a real socket (reqwest): `GET /sse` read event
//! by event, `POST /sse/send` for its frames.

use std::time::Duration;

use serde_json::Value;

use super::WAIT;

/// One SSE connection.
pub struct Sse {
    resp: reqwest::Response,
    buf: String,
    http: reqwest::Client,
    /// `http://host:port` of the instance holding the stream.
    pub base: String,
    pub id: String,
    pub session: String,
    /// Keep-alive comments seen so far.
    pub comments: usize,
    /// Event ids seen, in order.
    pub ids: Vec<u64>,
}

impl Sse {
    /// Open `base/sse` (`query` appended) and read the welcome.
    pub async fn open(base: &str) -> Sse {
        Sse::open_query(base, "").await
    }

    pub async fn open_query(base: &str, query: &str) -> Sse {
        let mut sse = Sse::open_raw(base, query).await;
        let welcome = sse.recv().await;
        assert_eq!(welcome["type"], "connected", "{welcome}");
        sse.id = welcome["clientId"].as_str().unwrap().to_string();
        sse.session = welcome["session"].as_str().expect("a session").to_string();
        sse
    }

    /// Open `base/sse` (`query` appended), expecting a 200 stream, without
    /// reading anything.
    pub async fn open_raw(base: &str, query: &str) -> Sse {
        let http = reqwest::Client::new();
        let resp = http
            .get(format!("{base}/sse{query}"))
            .header("accept", "text/event-stream")
            .send()
            .await
            .expect("GET /sse");
        assert_eq!(resp.status(), 200, "GET /sse");
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Sse {
            resp,
            buf: String::new(),
            http,
            base: base.to_string(),
            id: String::new(),
            session: String::new(),
            comments: 0,
            ids: Vec::new(),
        }
    }

    /// The next complete event already read, if any (comments and ids
    /// noted on the way).
    fn take_event(&mut self) -> Option<Value> {
        while let Some(end) = self.buf.find("\n\n") {
            let block: String = self.buf.drain(..end + 2).collect();
            let mut data: Vec<&str> = Vec::new();
            for line in block.lines() {
                if line.starts_with(':') {
                    self.comments += 1;
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push(d);
                } else if let Some(id) = line.strip_prefix("id: ") {
                    self.ids.push(id.parse().expect("a numeric event id"));
                }
            }
            if !data.is_empty() {
                return Some(serde_json::from_str(&data.join("\n")).expect("the data is JSON"));
            }
        }
        None
    }

    /// Read one more chunk before `deadline`: `Some(false)` at the end of
    /// the stream, `None` at the deadline.
    async fn read_until(&mut self, deadline: tokio::time::Instant) -> Option<bool> {
        match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
            Err(_) => None,
            Ok(Ok(Some(bytes))) => {
                self.buf.push_str(std::str::from_utf8(&bytes).unwrap());
                Some(true)
            }
            Ok(_) => Some(false),
        }
    }

    /// The next event's data as JSON, `None` when the stream ended;
    /// panics after `within`.
    pub async fn event_within(&mut self, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(v) = self.take_event() {
                return Some(v);
            }
            match self.read_until(deadline).await {
                Some(true) => {}
                Some(false) => return None,
                None => panic!("no event within {within:?}"),
            }
        }
    }

    /// Read for `d`, asserting that no event comes and the stream stays
    /// open (keep-alive comments are counted).
    pub async fn quiet_for(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            if let Some(v) = self.take_event() {
                panic!("expected no event, got {v}");
            }
            match self.read_until(deadline).await {
                Some(true) => {}
                Some(false) => panic!("the stream ended"),
                None => return,
            }
        }
    }

    /// Read events until the stream ends (at most `within`); returns them.
    pub async fn until_end(&mut self, within: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            while let Some(v) = self.take_event() {
                seen.push(v);
            }
            match self.read_until(deadline).await {
                Some(true) => {}
                Some(false) => return seen,
                None => panic!("the stream did not end within {within:?}"),
            }
        }
    }

    /// The next event; panics after [`WAIT`] or at the end of the stream.
    pub async fn recv(&mut self) -> Value {
        self.event_within(WAIT).await.expect("the stream is open")
    }

    /// The next event of `ty`, skipping others.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// The reply with `ref` = `id`, skipping others.
    pub async fn reply(&mut self, id: u64) -> Value {
        loop {
            let v = self.recv().await;
            if v["ref"] == id {
                return v;
            }
        }
    }

    /// POST `body` to `base/sse/send`: status and JSON answer.
    pub async fn post_to(&self, base: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{base}/sse/send"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("POST /sse/send");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// POST `frames` for this session to its own instance; asserts 202.
    pub async fn send(&self, frames: Vec<Value>) {
        let body = serde_json::json!({"session": self.session, "frames": frames});
        let (status, answer) = self.post_to(&self.base, &body).await;
        assert_eq!(status, 202, "{answer}");
    }
}
