// server-redis.js - the tutorial's server.js with its "Handling Multiple
// Instances" design, Redis as the bus instead of Pub/Sub (the tutorial: "use
// Pub/Sub or Redis as a message bus to broadcast messages across instances").
//
// Everything below is server.js verbatim except:
//   * the bridge (the tutorial's pubsub-bridge.js: publishMessage adds
//     sourceInstance, the receiver skips its own messages and delivers the
//     rest to local clients) is inlined, so that deliverToLocalClients sees
//     `clients` and `WebSocket` (the tutorial's separate module does not
//     have them in scope), with the `redis` npm package for the bus:
//     one PUBLISH connection and one SUBSCRIBE connection (duplicate());
//   * broadcastMessage is the tutorial's "Updated broadcast that works
//     across multiple instances" (deliver locally, then publish);
//   * the server listens once the bus is connected, and a missing
//     REDIS_URL or GAE_INSTANCE stops it with an error.
//
// Environment: PORT, REDIS_URL (redis://127.0.0.1:6379), GAE_INSTANCE (this
// instance's name; App Engine sets it. The tutorial publishes
// `GAE_INSTANCE || "local"` but compares against GAE_INSTANCE alone, so
// without it every instance would deliver its own broadcasts twice.)
const express = require("express");
const http = require("http");
const WebSocket = require("ws");
const { createClient } = require("redis");

if (!process.env.REDIS_URL || !process.env.GAE_INSTANCE) {
  console.error("server-redis.js needs REDIS_URL and GAE_INSTANCE");
  process.exit(1);
}

const app = express();
const server = http.createServer(app);

// Create WebSocket server attached to the HTTP server
const wss = new WebSocket.Server({ server });

// Track connected clients
const clients = new Map();

wss.on("connection", (ws, req) => {
  // Generate a unique client ID
  const clientId = `client-${Date.now()}-${Math.random().toString(36).substr(2, 9)}`;
  clients.set(clientId, ws);

  console.log(`Client connected: ${clientId}. Total clients: ${clients.size}`);

  // Send welcome message
  ws.send(JSON.stringify({
    type: "connected",
    clientId: clientId,
    message: "Welcome to the real-time server"
  }));

  // Handle incoming messages
  ws.on("message", (data) => {
    try {
      const message = JSON.parse(data.toString());
      handleMessage(clientId, message);
    } catch (err) {
      console.error("Invalid message format:", err.message);
    }
  });

  // Handle disconnection
  ws.on("close", () => {
    clients.delete(clientId);
    console.log(`Client disconnected: ${clientId}. Total clients: ${clients.size}`);
  });

  // Handle errors
  ws.on("error", (err) => {
    console.error(`WebSocket error for ${clientId}:`, err.message);
    clients.delete(clientId);
  });

  // Keep the connection alive with periodic pings
  const pingInterval = setInterval(() => {
    if (ws.readyState === WebSocket.OPEN) {
      ws.ping();
    } else {
      clearInterval(pingInterval);
    }
  }, 30000); // Ping every 30 seconds
});

function handleMessage(clientId, message) {
  switch (message.type) {
    case "broadcast":
      // Send message to all connected clients
      broadcastMessage(clientId, message.data);
      break;
    case "direct":
      // Send message to a specific client
      sendToClient(message.targetId, message.data);
      break;
    default:
      console.log(`Unknown message type: ${message.type}`);
  }
}

// Updated broadcast that works across multiple instances
async function broadcastMessage(senderId, data) {
  // Deliver to local clients immediately
  const payload = JSON.stringify({
    type: "broadcast",
    senderId: senderId,
    data: data,
    timestamp: Date.now()
  });

  clients.forEach((ws, id) => {
    if (id !== senderId && ws.readyState === WebSocket.OPEN) {
      ws.send(payload);
    }
  });

  // Publish to the bus for other instances
  await publishMessage({
    type: "broadcast",
    senderId: senderId,
    data: data
  });
}

// Bridge WebSocket messages across instances (the tutorial's
// pubsub-bridge.js, on Redis)
const CHANNEL_NAME = "websocket-messages";
const publisher = createClient({ url: process.env.REDIS_URL });
const subscriber = publisher.duplicate();
publisher.on("error", (err) => console.error("Redis publisher error:", err.message));
subscriber.on("error", (err) => console.error("Redis subscriber error:", err.message));

async function initBus() {
  await publisher.connect();
  await subscriber.connect();

  // Listen for messages from other instances
  await subscriber.subscribe(CHANNEL_NAME, (message) => {
    const data = JSON.parse(message);

    // Skip messages we published ourselves
    if (data.sourceInstance === process.env.GAE_INSTANCE) {
      return;
    }

    // Deliver to local clients
    deliverToLocalClients(data);
  });
}

async function publishMessage(messageData) {
  // Add source instance identifier
  const data = {
    ...messageData,
    sourceInstance: process.env.GAE_INSTANCE || "local"
  };

  await publisher.publish(CHANNEL_NAME, JSON.stringify(data));
}

function deliverToLocalClients(data) {
  // Send to all local clients that should receive this message
  const payload = JSON.stringify({
    type: data.type,
    senderId: data.senderId,
    data: data.data
  });

  clients.forEach((ws, id) => {
    if (ws.readyState === WebSocket.OPEN) {
      ws.send(payload);
    }
  });
}

function sendToClient(targetId, data) {
  const targetWs = clients.get(targetId);
  if (targetWs && targetWs.readyState === WebSocket.OPEN) {
    targetWs.send(JSON.stringify({ type: "direct", data: data }));
  }
}

// Regular HTTP endpoints still work alongside WebSockets
app.get("/", (req, res) => {
  res.json({
    status: "running",
    connectedClients: clients.size
  });
});

app.get("/_ah/health", (req, res) => {
  res.status(200).send("OK");
});

const PORT = process.env.PORT || 8080;
initBus().then(() => {
  server.listen(PORT, "0.0.0.0", () => {
    console.log(`Server listening on port ${PORT} (instance ${process.env.GAE_INSTANCE})`);
  });
}, (err) => {
  console.error("cannot connect to Redis:", err.message);
  process.exit(1);
});
