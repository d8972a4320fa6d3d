// bench/p5_peer.py's publisher: the same process publishes the same events to both servers, each in its own wire
// format, paced, and stamps each one with the time it is handed to Redis.
//
// - "emitter": @socket.io/redis-emitter (what the Node original's workers used): items are [room, event, payload];
//   the payload gets `sent_ms`.
// - "raw": a prepared Redis message PUBLISHed as it is (python-socketio's message, as the service's store scripts
//   publish it): items are [channel, message], and the JSON string "@sent" in the message becomes the number.
//
// `sent_ms` is performance.timeOrigin + performance.now() (epoch ms, sub-millisecond), the clock
// bench/node/p5_clients.js reads on receipt.
//
// Reads JSON lines on stdin: {"mode": "emitter"|"raw", "file": PATH (a JSON array of items), "rate": N (events/s)}
// and answers each with {"type":"published","count","seconds","cpu_s"} once every item is handed to Redis.
//
//   node publisher.js REDIS_URL
"use strict";

const fs = require("fs");
const readline = require("readline");
const { performance } = require("perf_hooks");
const { createClient } = require("redis");
const { Emitter } = require("@socket.io/redis-emitter");

const now = () => performance.timeOrigin + performance.now();
const out = (message) => process.stdout.write(JSON.stringify(message) + "\n");

function sender(mode, client, emitter) {
  if (mode === "emitter") {
    return ([room, event, payload]) => {
      payload.sent_ms = now();
      emitter.to(room).emit(event, payload);
    };
  }
  return ([channel, message]) => client.publish(channel, message.replace('"@sent"', String(now())));
}

// Item i is due at start + i / rate; each timer tick sends every item that is due (about one a tick at 500/s).
function publish(items, send, rate) {
  return new Promise((resolve) => {
    const started = now();
    let next = 0;
    const tick = () => {
      const due = Math.min(items.length, Math.floor(((now() - started) / 1000) * rate) + 1);
      while (next < due) send(items[next++]);
      if (next < items.length) setTimeout(tick, 1);
      else resolve((now() - started) / 1000);
    };
    tick();
  });
}

async function main() {
  const client = createClient({ url: process.argv[2] });
  await client.connect();
  const emitter = new Emitter(client);
  let queue = Promise.resolve();
  readline.createInterface({ input: process.stdin }).on("line", (line) => {
    const { mode, file, rate } = JSON.parse(line);
    queue = queue.then(async () => {
      const items = JSON.parse(fs.readFileSync(file, "utf8"));
      const cpu = process.cpuUsage();
      const seconds = await publish(items, sender(mode, client, emitter), rate);
      await client.ping(); // every PUBLISH before it has been answered
      const used = process.cpuUsage(cpu);
      out({ type: "published", count: items.length, seconds, cpu_s: (used.user + used.system) / 1e6 });
    });
  }).on("close", () => queue.then(() => client.quit()).then(() => process.exit(0)));
  out({ type: "ready" });
}

main().catch((error) => { console.error(error); process.exit(1); });
