// server.js - WebSocket server for App Engine Flex
const express = require("express");
const http = require("http");
const WebSocket = require("ws");

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

function broadcastMessage(senderId, data) {
  const payload = JSON.stringify({
    type: "broadcast",
    senderId: senderId,
    data: data,
    timestamp: Date.now()
  });

  // Send to all connected clients except the sender
  clients.forEach((ws, id) => {
    if (id !== senderId && ws.readyState === WebSocket.OPEN) {
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
server.listen(PORT, "0.0.0.0", () => {
  console.log(`Server listening on port ${PORT}`);
});
