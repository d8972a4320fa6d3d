// P5's load: `total` Socket.IO clients (the official JavaScript client, WebSocket transport) on one server; the
// first of them join the jobs listed in `jobsFile`, one each, and record every event of their room.
// Talks to bench/p5_fanout.py and bench/p5_peer.py in JSON lines: prints {"type":"ready"} once every client is
// connected (and joined), {"type":"progress"} every second, {"type":"done"} when every follower has its final event;
// on a "report" line on stdin prints {"type":"report"} with what each follower received, then disconnects everyone
// and exits.
// Each event is recorded as [seq, event, status, received_ms, sent_ms]: received_ms is performance.timeOrigin +
// performance.now() (epoch ms, sub-millisecond; the clock bench/node/publisher.js stamps `sent_ms` with), sent_ms
// the payload's `sent_ms` (null when it has none). With P5_TOKEN set every client presents `auth: {token}`.
//
//   node p5_clients.js URL TOTAL JOBS_FILE [IN_FLIGHT]
"use strict";

const fs = require("fs");
const readline = require("readline");
const { performance } = require("perf_hooks");
const { io } = require("socket.io-client");

const [url, totalText, jobsFile, inFlightText] = process.argv.slice(2);
const total = Number(totalText);
const jobs = JSON.parse(fs.readFileSync(jobsFile, "utf8"));
const inFlight = Number(inFlightText || 200);
const FINAL = new Set(["analysis_complete", "analysis_error"]);
const auth = process.env.P5_TOKEN ? { token: process.env.P5_TOKEN } : undefined;
const now = () => performance.timeOrigin + performance.now();
const cpuSeconds = () => { const cpu = process.cpuUsage(); return (cpu.user + cpu.system) / 1e6; };

const sockets = [];
const followers = jobs.map((job) => ({ job, joined: -1, events: [], finals: 0, ackError: null }));
let connected = 0;
let failed = 0;
let disconnects = 0;
let finished = 0;
const started = Date.now();
// A write to a pipe may be partly queued; `then` runs once all of it is handed to the OS (exit only after).
const out = (message, then) => process.stdout.write(JSON.stringify(message) + "\n", then);

function open(index) {
  return new Promise((resolve) => {
    const socket = io(url, { transports: ["websocket"], reconnection: false, forceNew: true, timeout: 60000, auth });
    sockets.push(socket);
    const follower = index < followers.length ? followers[index] : null;
    if (follower) {
      for (const name of ["status_update", "analysis_complete", "analysis_error"]) {
        socket.on(name, (payload) => {
          follower.events.push([payload.seq, name, payload.status, now(), payload.sent_ms ?? null]);
          if (FINAL.has(name) && ++follower.finals === 1) finished += 1;
        });
      }
    }
    socket.on("connect_error", (error) => { failed += 1; resolve(String(error && error.message)); });
    socket.on("disconnect", () => { disconnects += 1; });
    socket.once("connect", () => {
      connected += 1;
      if (!follower) return resolve(null);
      socket.timeout(60000).emit("join_project", follower.job, (error, ack) => {
        if (error || !ack || !ack.ok) follower.ackError = String(error || JSON.stringify(ack));
        else follower.joined = ack.seq;
        resolve(null);
      });
    });
  });
}

async function connectAll() {
  let next = 0;
  const lanes = Array.from({ length: Math.min(inFlight, total) }, async () => {
    while (next < total) await open(next++);
  });
  await Promise.all(lanes);
}

connectAll().then(() => {
  out({ type: "ready", connected, failed, connect_s: (Date.now() - started) / 1000,
        join_errors: followers.filter((f) => f.ackError).length, client_cpu_s: cpuSeconds(),
        client_rss_mb: process.memoryUsage().rss / 1048576 });
  const timer = setInterval(() => {
    out({ type: "progress", finished, connected: connected - disconnects });
    if (finished === followers.length) { out({ type: "done" }); clearInterval(timer); }
  }, 1000);
  readline.createInterface({ input: process.stdin }).on("line", (line) => {
    if (line.trim() !== "report") return;
    clearInterval(timer);
    out({ type: "report", still_connected: connected - disconnects, disconnects, failed,
          client_cpu_s: cpuSeconds(), client_rss_mb: process.memoryUsage().rss / 1048576,
          followers: followers.map((f) => ({ job: f.job, joined: f.joined, events: f.events, error: f.ackError })) },
        () => {
          for (const socket of sockets) socket.disconnect();
          setTimeout(() => process.exit(0), 500);
        });
  });
});
