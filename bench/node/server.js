// The peer baseline for bench/p5_peer.py: a bare Node socket.io 4 server shaped like the service's Socket.IO API
// (the Node/Express/socket.io original it rebuilds), so the same clients measure both in one run.
//
// - auth: `auth: {token}` in the handshake, compared with TOKEN; refused otherwise (connect_error).
// - `join_project` (the job id, or {project_id}) joins room `project_<id>`, replays a `status_update` to that socket
//   and acks {ok, project_id, status, seq}; `leave_project` leaves it. No job store: the status is always
//   "queued" at seq 0 (a bare server: what it costs to hold a socket, not to run jobs).
// - events reach the rooms through the official Redis adapter (@socket.io/redis-adapter, node-redis 4), published
//   by @socket.io/redis-emitter (bench/node/publisher.js), as the original's workers published them.
// - pings every 20 s with a 20 s timeout and no per-message compression, as the API is configured.
//
// Prints {"type":"listening","port":N} once it accepts connections; GET /livez answers 200.
//
//   node server.js PORT REDIS_URL TOKEN
"use strict";

const http = require("http");
const { Server } = require("socket.io");
const { createClient } = require("redis");
const { createAdapter } = require("@socket.io/redis-adapter");

const [portText, redisUrl, token] = process.argv.slice(2);
const JOB_ID = /^[a-f0-9]{32}$/; // the API's job id (potpie_service/core/submission.py)
const QUEUED_MESSAGE = "Repository analysis queued. Connect to Socket.IO and join the project for live updates.";

function projectId(data) {
  const id = data && typeof data === "object" ? data.project_id : data;
  return typeof id === "string" && JOB_ID.test(id) ? id : null;
}

async function main() {
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  const httpServer = http.createServer((req, res) => {
    res.writeHead(req.url === "/livez" ? 200 : 404, { "Content-Type": "text/plain" });
    res.end(req.url === "/livez" ? "ok" : "not found");
  });
  const io = new Server(httpServer, { adapter: createAdapter(pub, sub), pingInterval: 20000, pingTimeout: 20000,
                                      perMessageDeflate: false });
  io.use((socket, next) => {
    const auth = socket.handshake.auth || {};
    if (auth.token !== token) return next(new Error("unauthorized"));
    socket.data.owner = "bench";
    return next();
  });
  io.on("connection", (socket) => {
    socket.on("join_project", (data, ack) => {
      const reply = typeof ack === "function" ? ack : () => {};
      const id = projectId(data);
      if (!id) return reply({ ok: false, error: "invalid project_id: expected the job id returned by POST /analyze" });
      socket.join(`project_${id}`);
      socket.emit("status_update", { project_id: id, job_id: id, status: "queued", message: QUEUED_MESSAGE,
                                     progress: 0, seq: 0, timestamp: new Date().toISOString() });
      return reply({ ok: true, project_id: id, status: "queued", seq: 0 });
    });
    socket.on("leave_project", (data, ack) => {
      const reply = typeof ack === "function" ? ack : () => {};
      const id = projectId(data);
      if (!id) return reply({ ok: false, error: "invalid project_id" });
      socket.leave(`project_${id}`);
      return reply({ ok: true, project_id: id });
    });
  });
  httpServer.listen(Number(portText), "127.0.0.1", () => {
    process.stdout.write(JSON.stringify({ type: "listening", port: httpServer.address().port }) + "\n");
  });
  const stop = () => { io.close(); Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0)); };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((error) => { console.error(error); process.exit(1); });
