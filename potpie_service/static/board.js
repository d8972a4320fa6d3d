// The live job board: lists the caller's jobs, follows each one over Socket.IO, submits and cancels.
(function () {
  "use strict";
  const TERMINAL = new Set(["finished", "failed", "cancelled"]);
  const rows = new Map();      // job id -> {tr, seq}
  let socket = null;
  let key = sessionStorage.getItem("potpie-key") || "";
  document.getElementById("api-key").value = key;

  function headers(json) {
    const h = {};
    if (key) h["Authorization"] = "Bearer " + key;
    if (json) h["Content-Type"] = "application/json";
    return h;
  }

  function cell(tr, name) { return tr.querySelector("[data-field=" + name + "]"); }

  function render(job) {
    let entry = rows.get(job.job_id);
    if (!entry) {
      const tr = document.createElement("tr");
      tr.dataset.jobId = job.job_id;
      for (const name of ["repo", "status", "progress", "queue", "eta", "message", "actions"]) {
        const td = document.createElement("td");
        td.dataset.field = name;
        tr.appendChild(td);
      }
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.appendChild(document.createElement("div"));
      cell(tr, "progress").appendChild(bar);
      cell(tr, "repo").textContent = job.repo + (job.branch ? "@" + job.branch : "");
      document.querySelector("#jobs tbody").prepend(tr);
      entry = {tr: tr, seq: -1};
      rows.set(job.job_id, entry);
    }
    if (typeof job.seq === "number") {
      if (job.seq <= entry.seq) return;  // older than what we have
      entry.seq = job.seq;
    }
    const tr = entry.tr;
    tr.className = "status-" + job.status;
    cell(tr, "status").textContent = job.status;
    if (typeof job.progress === "number") tr.querySelector(".bar > div").style.width = job.progress + "%";
    cell(tr, "queue").textContent = job.status === "queued" && job.queue_position != null ? "#" + job.queue_position : "";
    cell(tr, "eta").textContent = job.eta_seconds != null && !TERMINAL.has(job.status) ? Math.round(job.eta_seconds) + " s" : "";
    if (job.message || job.failed_reason) cell(tr, "message").textContent = job.failed_reason || job.message;
    const actions = cell(tr, "actions");
    actions.replaceChildren();
    if (!TERMINAL.has(job.status)) actions.appendChild(button("Cancel", "cancel", () => cancel(job.job_id)));
    if (job.status === "failed" || job.status === "cancelled") actions.appendChild(button("Retry", "retry", () => retry(job.job_id)));
  }

  function button(text, cls, onClick) {
    const b = document.createElement("button");
    b.textContent = text;
    b.className = cls;
    b.addEventListener("click", onClick);
    return b;
  }

  function follow(jobId) {
    if (socket && socket.connected) socket.emit("join_project", jobId, () => {});
  }

  function onEvent(payload) {
    render(Object.assign({}, payload, {job_id: payload.job_id || payload.project_id,
                                      message: payload.status === "failed" ? payload.message : payload.message}));
  }

  async function load() {
    const res = await fetch("/jobs?per_page=50", {headers: headers(false)});
    if (!res.ok) { showError((await res.json()).error || res.statusText); return; }
    const body = await res.json();
    for (const job of body.jobs.reverse()) render(job);
    for (const [jobId] of rows) follow(jobId);
  }

  function connect() {
    if (socket) socket.disconnect();
    rows.clear();
    document.querySelector("#jobs tbody").replaceChildren();
    socket = io({auth: {token: key}, transports: ["websocket", "polling"]});
    const pill = document.getElementById("connection");
    socket.on("connect", () => { pill.textContent = "live"; pill.className = "pill on"; load(); });
    socket.on("disconnect", () => { pill.textContent = "disconnected"; pill.className = "pill"; });
    socket.on("connect_error", () => { pill.textContent = "refused (API key?)"; pill.className = "pill"; });
    socket.on("status_update", onEvent);
    socket.on("analysis_complete", onEvent);
    socket.on("analysis_error", onEvent);
  }

  function showError(text) { document.getElementById("form-error").textContent = text || ""; }

  async function submit(event) {
    event.preventDefault();
    showError("");
    const body = {repo: document.getElementById("repo").value.trim()};
    const branch = document.getElementById("branch").value.trim();
    const question = document.getElementById("question").value.trim();
    if (branch) body.branch = branch;
    if (question) body.question = question;
    const res = await fetch("/analyze", {method: "POST", headers: headers(true), body: JSON.stringify(body)});
    const reply = await res.json();
    if (!res.ok) { showError(reply.error); return; }
    render({job_id: reply.job_id, repo: body.repo, branch: body.branch || "main", status: reply.status,
            progress: 0, queue_position: reply.queue_position, eta_seconds: reply.eta_seconds, message: reply.message});
    follow(reply.job_id);
  }

  async function cancel(jobId) {
    const res = await fetch("/jobs/" + jobId, {method: "DELETE", headers: headers(false)});
    if (!res.ok) showError((await res.json()).error);
  }

  async function retry(jobId) {
    const res = await fetch("/jobs/" + jobId + "/retry", {method: "POST", headers: headers(false)});
    const reply = await res.json();
    if (!res.ok) { showError(reply.error); return; }
    const old = rows.get(jobId);
    render({job_id: reply.job_id, repo: old ? cell(old.tr, "repo").textContent : "", status: reply.status,
            progress: 0, queue_position: reply.queue_position, eta_seconds: reply.eta_seconds, message: reply.message});
    follow(reply.job_id);
  }

  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    key = document.getElementById("api-key").value.trim();
    sessionStorage.setItem("potpie-key", key);
    connect();
  });
  document.getElementById("submit-form").addEventListener("submit", submit);
  connect();
})();
