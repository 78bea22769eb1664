// The gridforge panel: pages over the coordinator's HTTP/JSON API (POST /v1/METHOD), live parts over its
// server-sent events. No framework and nothing fetched from elsewhere.
"use strict";

const TOKEN_KEY = "gridforge-token";
let settings = {
  amberPercent: 70, redPercent: 90, diskMeterBytesPerSec: 200 * 1048576, networkMeterBytesPerSec: 119 * 1048576,
  needsToken: true,
};
// Streams and timers of the page shown; stopped when another page is shown.
let page = new AbortController();
let shown = "";

// ---- API ----

class ApiError extends Error {
  constructor(body) {
    super(body.message || "request failed");
    this.code = body.code;
    this.status = body.status;
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

async function refusal(resp) {
  let body;
  try { body = await resp.json(); } catch (_) { body = { message: resp.statusText, status: resp.status }; }
  if (resp.status === 401 && settings.needsToken && shown !== "login") {
    sessionStorage.removeItem(TOKEN_KEY);
    location.hash = "#/login";
  }
  return new ApiError(body);
}

async function api(method, request = {}, signal) {
  const resp = await fetch("/v1/" + method, {
    method: "POST", headers: headers(), body: JSON.stringify(request), signal,
  });
  if (!resp.ok) throw await refusal(resp);
  return resp.json();
}

// Calls a streaming method and hands each message to `onMessage` until the stream ends or the page changes.
async function stream(method, request, onMessage, signal = page.signal) {
  const resp = await fetch("/v1/" + method, {
    method: "POST", headers: headers(), body: JSON.stringify(request), signal,
  });
  if (!resp.ok) throw await refusal(resp);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length === 0) continue;
      const message = JSON.parse(data.join("\n"));
      if (event === "error") throw new ApiError(message);
      onMessage(message);
    }
  }
}

// ---- DOM helpers ----

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function table(caption, columns, rows) {
  return el("div", { class: "scroll" },
    el("table", { class: "cards" },
      caption ? el("caption", { class: "hint" }, caption) : null,
      el("thead", {}, el("tr", {}, columns.map((c) => el("th", { scope: "col" }, c)))),
      el("tbody", {}, rows.map((r) => el("tr", {}, r.map((cell, i) => el("td", { "data-label": columns[i] }, cell)))))));
}

function say(text) { document.getElementById("status").textContent = text; }
function alarm(text) { document.getElementById("alert").textContent = text; }
function clearMessages() { say(""); alarm(""); }

function failed(what) {
  return (e) => {
    if (e.name === "AbortError") return;
    alarm(`${what}: ${e.message}${e.code ? " (" + e.code + ")" : ""}`);
  };
}

const num = (v) => Number(v || 0);
const word = (s) => (s || "").replaceAll("_", " ").toLowerCase();
const mib = (m) => (num(m) >= 1024 ? (num(m) / 1024).toFixed(1) + " GiB" : num(m) + " MiB");
function perSecond(bytes) {
  const b = num(bytes);
  if (b >= 1048576) return (b / 1048576).toFixed(1) + " MiB/s";
  if (b >= 1024) return (b / 1024).toFixed(0) + " KiB/s";
  return b.toFixed(0) + " B/s";
}
function stateBadge(s) { return el("span", { class: "state state-" + (s || "STATE_UNSPECIFIED") }, word(s || "unknown")); }
function link(href, text) { return el("a", { href }, text); }

// ---- Meters ----

function level(percent) {
  if (percent >= settings.redPercent) return "red";
  if (percent >= settings.amberPercent) return "amber";
  return "green";
}

const LEVEL_WORDS = { green: "normal", amber: "high", red: "critical" };

// A meter: a labelled bar with role="meter" whose colour (data-level) follows the thresholds. `set` takes
// the percentage and, for a rate, the rate itself (e.g. "1.2 MiB/s"), shown below the bar and spoken first.
function meter(id, label, small) {
  const bar = el("span");
  const value = el("span", { class: "meter-value" });
  const detail = el("div", { class: "meter-detail" });
  const m = el("div", {
    class: "meter" + (small ? " small-meter" : ""), id, role: "meter", "aria-label": label,
    "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": 0, "data-level": "green",
  }, bar);
  const box = small ? el("span", {}, m, value)
    : el("div", { class: "meter-box" }, el("div", { class: "meter-label" }, el("span", {}, label), value), m, detail);
  box.set = (percent, amount) => {
    const p = Math.max(0, Math.min(100, num(percent)));
    const l = level(p);
    const spoken = amount ? amount.replace("/s", " per second") + ", " : "";
    m.dataset.level = l;
    m.setAttribute("aria-valuenow", p.toFixed(0));
    m.setAttribute("aria-valuetext", `${spoken}${p.toFixed(0)} percent, ${LEVEL_WORDS[l]}`);
    bar.style.width = p + "%";
    value.textContent = "";
    value.append(`${p.toFixed(0)}% `, el("span", { class: "level" }, LEVEL_WORDS[l]));
    detail.textContent = amount || "";
  };
  // A rate in bytes per second against the meter's full scale.
  box.setRate = (bytesPerSec, fullScale) => box.set((num(bytesPerSec) / fullScale) * 100, perSecond(bytesPerSec));
  box.set(0);
  return box;
}

// ---- Pages ----

const pages = {
  login: loginPage,
  grid: gridPage,
  tenants: tenantsPage,
  tenant: tenantPage,
  servers: serversPage,
  server: serverPage,
  operations: operationsPage,
  operation: operationPage,
  create: createPage,
};

// Calls `f` now and every `ms` while the page is shown.
function every(ms, f) {
  f();
  const t = setInterval(f, ms);
  page.signal.addEventListener("abort", () => clearInterval(t));
}

// Whether `answer` differs from the last one `key` saw on this page (lists are redrawn only then, so that
// keyboard focus stays where it was while nothing changes).
function changed(key, answer) {
  const text = JSON.stringify(answer);
  const seen = page.seen || (page.seen = {});
  if (seen[key] === text) return false;
  seen[key] = text;
  return true;
}

function show(title, ...content) {
  const main = document.getElementById("main");
  main.replaceChildren(el("h1", {}, title), ...content);
  document.title = title + " · gridforge";
  return main;
}

function loginPage() {
  const input = el("input", { id: "token", type: "password", autocomplete: "current-password", required: true });
  const form = el("form", { class: "stack", onsubmit: async (ev) => {
    ev.preventDefault();
    clearMessages();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      await api("ListNodes");
      location.hash = "#/grid";
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      alarm("Log in failed: " + e.message);
      input.focus();
    }
  } },
  el("label", { for: "token" }, "API token", el("span", { class: "hint" }, "from gridctl token create"), input),
  el("button", { type: "submit", class: "primary", id: "login" }, "Log in"));
  show("Log in", form);
  input.focus();
}

function gridPage() {
  const body = el("div", { id: "grid" });
  show("Grid", body);
  every(3000, () => api("ListNodes", {}, page.signal).then((r) => {
    if (!changed("nodes", r)) return;
    const byDc = new Map();
    for (const n of r.nodes || []) {
      const dc = n.datacenter || "no datacenter";
      if (!byDc.has(dc)) byDc.set(dc, []);
      byDc.get(dc).push(n);
    }
    const sections = [...byDc.keys()].sort().map((dc) => el("section", { class: "dc", "aria-labelledby": "dc-" + dc },
      el("h2", { id: "dc-" + dc }, "Datacenter " + dc),
      table(null, ["Node", "State", "CPU", "Memory", "vCPUs placed", "Servers"], byDc.get(dc).map((n) => {
        const cpu = meter("cpu-" + n.name, "CPU of " + n.name, true);
        cpu.set(num(n.cpuLoad) * 100);
        const capMem = num(n.capacity?.memoryMib) * 1048576;
        const mem = meter("mem-" + n.name, "Memory of " + n.name, true);
        mem.set(capMem ? (num(n.memoryUsedBytes) / capMem) * 100 : 0);
        return [n.name, el("span", {}, stateBadge(n.state), n.cordoned ? " (cordoned)" : ""), cpu, mem,
          `${num(n.allocated?.vcpus)} / ${num(n.capacity?.vcpus)}`, String((n.vms || []).length)];
      }))));
    body.replaceChildren(...(sections.length ? sections : [el("p", {}, "No nodes are enrolled.")]));
  }).catch(failed("Listing nodes")));
}

function tenantsPage() {
  const body = el("div");
  show("Tenants", body);
  api("ListTenants", {}, page.signal).then((r) => {
    body.replaceChildren(table(null, ["Tenant", "Servers", "Tiers", "vCPUs used", "Quota (vCPUs)"],
      (r.tenants || []).map((t) => [link("#/tenant/" + encodeURIComponent(t.name), t.name), String(num(t.vms)),
        String((t.groups || []).length), String(num(t.used?.vcpus)), num(t.quota?.vcpus) ? String(t.quota.vcpus) : "no limit"])));
  }).catch(failed("Listing tenants"));
}

function serverRows(vms) {
  return vms.map((v) => {
    const cpu = meter("cpu-" + v.name, "CPU of " + v.name, true);
    cpu.set(v.usage?.cpuPercent);
    return [link("#/server/" + encodeURIComponent(v.name), v.name), stateBadge(v.state), v.node || "none",
      String(num(v.resources?.vcpus)), mib(v.resources?.memoryMib), cpu];
  });
}

const SERVER_COLUMNS = ["Server", "State", "Node", "vCPUs", "Memory", "CPU"];

function tenantPage(name) {
  const body = el("div");
  show("Tenant " + name, body);
  every(3000, () => Promise.all([api("GetTenant", { name }, page.signal), api("ListVms", { tenant: name }, page.signal)])
    .then(([t, r]) => {
      if (!changed("tenant", [t, r])) return;
      const vms = r.vms || [];
      const tiers = (t.groups || []).map((g) => el("section", { "aria-labelledby": "tier-" + g.name },
        el("h2", { id: "tier-" + g.name }, "Tier " + g.name),
        table(null, SERVER_COLUMNS, serverRows(vms.filter((v) => v.group === g.name)))));
      const loose = vms.filter((v) => !v.group);
      if (loose.length) {
        tiers.push(el("section", {}, el("h2", {}, "Servers in no tier"), table(null, SERVER_COLUMNS, serverRows(loose))));
      }
      body.replaceChildren(...(tiers.length ? tiers : [el("p", {}, "This tenant has no tiers and no servers.")]));
    }).catch(failed("Reading tenant " + name)));
}

function serversPage() {
  const body = el("div");
  show("Servers", body, el("p", {}, link("#/create", "Create a server")));
  every(3000, () => api("ListVms", {}, page.signal).then((r) => {
    if (!changed("vms", r)) return;
    body.replaceChildren(table(null, SERVER_COLUMNS, serverRows(r.vms || [])));
  }).catch(failed("Listing servers")));
}

// Follows operation `id` into `box` (a progress bar and its steps) until it ends; resolves to the operation.
function followOperation(id, box) {
  const bar = el("progress", { id: "op-progress", max: 100, value: 0, "aria-label": "Progress of operation " + id });
  const state = el("p", { id: "op-state" });
  const steps = el("ol", { id: "op-steps" });
  box.replaceChildren(state, bar, steps);
  let last = null;
  const render = (op) => {
    last = op;
    const all = op.steps || [];
    const done = all.filter((s) => s.state === "SUCCEEDED").length;
    const finished = op.state === "SUCCEEDED" || op.state === "FAILED";
    bar.value = finished ? 100 : all.length ? (done / all.length) * 100 : 0;
    state.replaceChildren(stateBadge(op.state), " ", op.summary || "", op.error ? " — " + op.error : "");
    steps.replaceChildren(...all.map((s) => el("li", {}, stateBadge(s.state), " ", s.name, s.message ? ": " + s.message : "")));
  };
  return stream("WatchOperation", { id }, (ev) => {
    if (ev.snapshot) render(ev.snapshot);
    else if (last) {
      const step = (last.steps || []).find((s) => s.name === ev.step);
      if (step && ev.state) step.state = ev.state;
      if (step && (ev.agentStep || ev.message)) step.message = ev.agentStep || ev.message;
      if (ev.bytesTotal && num(ev.bytesTotal) > 0 && step) step.message = `${ev.agentStep || ""} ${Math.round((num(ev.bytesDone) / num(ev.bytesTotal)) * 100)}%`;
      render(last);
    }
  }).then(() => last);
}

function serverPage(name) {
  const facts = el("dl", { class: "facts", id: "facts" });
  const cpu = meter("meter-cpu", "CPU");
  const mem = meter("meter-memory", "Memory");
  const disk = meter("meter-disk", "Disk");
  const net = meter("meter-network", "Network");
  const opBox = el("div", { id: "server-operation", "aria-live": "polite" });
  const nodes = el("select", { id: "migrate-to" }, el("option", { value: "" }, "any node (placement chooses)"));
  let vm = null;
  const act = (what, method, request) => async () => {
    clearMessages();
    try {
      const op = await api(method, request);
      say(`${what}: operation ${op.id} started`);
      await followOperation(op.id, opBox);
    } catch (e) { failed(what)(e); }
  };
  const control = (action) => act(word(action), "ControlVm", { name, action });
  const actions = el("div", { class: "actions", role: "group", "aria-label": "Actions" },
    el("button", { type: "button", id: "action-start", onclick: control("START") }, "Start"),
    el("button", { type: "button", id: "action-stop", onclick: control("STOP") }, "Stop"),
    el("button", { type: "button", id: "action-reboot", onclick: control("REBOOT") }, "Reboot"),
    el("button", { type: "button", id: "action-delete", class: "danger", onclick: async () => {
      if (await confirmed(`Delete server ${name}? Its disk is wiped; this cannot be undone.`)) {
        await act("delete", "DeleteVm", { name })();
      }
    } }, "Delete"));
  const migrate = el("form", { class: "actions", onsubmit: (ev) => {
    ev.preventDefault();
    act("migrate", "MigrateVm", { name, to: nodes.value })();
  } }, el("label", { for: "migrate-to" }, "Migrate to", nodes), el("button", { type: "submit", id: "action-migrate" }, "Migrate"));
  show("Server " + name, el("div", { class: "meters" }, cpu, mem, disk, net), facts, actions, migrate,
    el("h2", {}, "Operation"), opBox);
  api("ListNodes", {}, page.signal).then((r) => {
    for (const n of r.nodes || []) nodes.append(el("option", { value: n.name }, n.name));
  }).catch(() => {});
  const render = (v) => {
    vm = v;
    cpu.set(v.usage?.cpuPercent);
    mem.set(v.usage?.memoryPercent);
    disk.setRate(v.usage?.diskBytesPerSec, settings.diskMeterBytesPerSec);
    net.setRate(v.usage?.networkBytesPerSec, settings.networkMeterBytesPerSec);
    const row = (k, val) => [el("dt", {}, k), el("dd", {}, val)];
    facts.replaceChildren(
      ...row("State", el("span", { id: "server-state" }, stateBadge(v.state))),
      ...row("Node", v.node || "none"),
      ...row("Tenant / tier", `${v.tenant || "none"} / ${v.group || "none"}`),
      ...row("vCPUs", String(num(v.resources?.vcpus))),
      ...row("Memory", mib(v.resources?.memoryMib)),
      ...row("Disk", mib(v.resources?.diskMib)),
      ...row("Image", v.spec?.image ? `${v.spec.image.name}:${v.spec.image.version}` : ""),
      ...(v.error ? row("Error", v.error) : []));
  };
  stream("WatchVm", { name }, render).then(() => {
    if (vm && vm.state === "DELETED") say(`Server ${name} is deleted.`);
  }).catch(failed("Watching server " + name));
}

function confirmed(text) {
  const d = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  return new Promise((resolve) => {
    d.addEventListener("close", () => resolve(d.returnValue === "ok"), { once: true });
    d.returnValue = "cancel";
    d.showModal();
    document.getElementById("confirm-cancel").focus();
  });
}

function operationsPage() {
  const body = el("div");
  show("Operations", body);
  every(2000, () => api("ListOperations", { limit: 50 }, page.signal).then((r) => {
    if (!changed("operations", r)) return;
    const ops = (r.operations || []).slice().reverse();
    body.replaceChildren(table(null, ["Operation", "Kind", "Server", "State", "Progress", "Summary"], ops.map((o) => {
      const all = o.steps || [];
      const done = all.filter((s) => s.state === "SUCCEEDED").length;
      return [link("#/operation/" + encodeURIComponent(o.id), o.id), word(o.kind), o.vm || "", stateBadge(o.state),
        el("progress", { max: Math.max(all.length, 1), value: done, "aria-label": `${done} of ${all.length} steps` }),
        o.summary || ""];
    })));
  }).catch(failed("Listing operations")));
}

function operationPage(id) {
  const box = el("div");
  show("Operation " + id, box);
  followOperation(id, box).catch(failed("Watching operation " + id));
}

function createPage() {
  const field = (id, label, attrs = {}, hint) => {
    const input = el("input", { id, name: id, ...attrs });
    return [el("label", { for: id }, label, hint ? el("span", { class: "hint" }, hint) : null, input), input];
  };
  const [nameL, name] = field("vm-name", "Name", { required: true, pattern: "[a-z0-9][a-z0-9-]*", autocomplete: "off" }, "lower case letters, digits and dashes");
  const [imageL, image] = field("vm-image", "Image", { required: true, list: "images", placeholder: "name:version" });
  const [cpuL, vcpus] = field("vm-vcpus", "vCPUs", { type: "number", min: 1, value: 1, required: true });
  const [memL, memory] = field("vm-memory", "Memory (MiB)", { type: "number", min: 16, value: 512, required: true });
  const [diskL, disk] = field("vm-disk", "Disk (MiB)", { type: "number", min: 16, value: 1024, required: true });
  const tenant = el("select", { id: "vm-tenant" }, el("option", { value: "" }, "none"));
  const [tierL, tier] = field("vm-tier", "Tier", { autocomplete: "off" }, "a group of the tenant, e.g. web");
  const spec = el("textarea", { id: "vm-spec", "aria-describedby": "spec-hint" });
  const images = el("datalist", { id: "images" });
  const progress = el("div", { id: "create-progress", "aria-live": "polite" });
  const submit = el("button", { type: "submit", class: "primary", id: "create" }, "Create");
  const form = el("form", { class: "stack", onsubmit: async (ev) => {
    ev.preventDefault();
    clearMessages();
    let request;
    try {
      if (spec.value.trim()) {
        request = JSON.parse(spec.value);
      } else {
        const [imgName, imgVersion] = image.value.split(":");
        request = {
          spec: {
            name: name.value,
            image: { name: imgName, version: imgVersion || "" },
            disk: { sizeMib: num(disk.value), partitions: [{ label: "root", role: "ROOT", filesystem: "EXT4" }] },
            machine: { vcpus: num(vcpus.value), memoryMib: num(memory.value), start: true },
          },
          tenant: tenant.value,
          group: tier.value,
        };
      }
    } catch (e) {
      alarm("The spec is not JSON: " + e.message);
      return;
    }
    submit.disabled = true;
    try {
      const r = await api("CreateVm", request);
      const vmName = r.operation.vm;
      say(`Creating ${vmName}: operation ${r.operation.id}`);
      const op = await followOperation(r.operation.id, progress);
      if (op && op.state === "SUCCEEDED") {
        say(`${vmName} is created.`);
        progress.append(el("p", {}, link("#/server/" + encodeURIComponent(vmName), "Open server " + vmName)));
      }
    } catch (e) { failed("Create")(e); } finally { submit.disabled = false; }
  } },
  nameL, imageL, images, cpuL, memL, diskL, el("label", { for: "vm-tenant" }, "Tenant", tenant), tierL,
  el("label", { for: "vm-spec" }, "Or a whole request (CreateVmRequest, JSON)",
    el("span", { class: "hint", id: "spec-hint" }, "replaces the fields above when not empty"), spec),
  submit);
  show("Create server", el("div", { class: "two-columns" }, form,
    el("section", { "aria-labelledby": "progress-title" }, el("h2", { id: "progress-title" }, "Progress"), progress)));
  api("ListNodes", {}, page.signal).then((r) => {
    const all = new Set((r.nodes || []).flatMap((n) => n.images || []));
    for (const i of [...all].sort()) images.append(el("option", { value: i }));
    if (!image.value && all.size) image.value = [...all].sort()[0];
  }).catch(() => {});
  api("ListTenants", {}, page.signal).then((r) => {
    for (const t of r.tenants || []) tenant.append(el("option", { value: t.name }, t.name));
  }).catch(() => {});
  name.focus();
}

// ---- Routing ----

function route() {
  page.abort();
  page = new AbortController();
  clearMessages();
  const [, name = "grid", ...rest] = location.hash.split("/");
  const arg = decodeURIComponent(rest.join("/"));
  const loggedIn = !settings.needsToken || sessionStorage.getItem(TOKEN_KEY);
  const target = loggedIn ? (pages[name] && name !== "login" ? name : "grid") : "login";
  document.getElementById("logout").hidden = !settings.needsToken || !loggedIn;
  for (const a of document.querySelectorAll("nav a")) {
    const current = a.getAttribute("href") === "#/" + target
      || (target === "server" && a.getAttribute("href") === "#/servers")
      || (target === "tenant" && a.getAttribute("href") === "#/tenants")
      || (target === "operation" && a.getAttribute("href") === "#/operations");
    if (current) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  shown = target;
  pages[target](arg);
  if (target !== "login" && target !== "create") document.getElementById("main").focus({ preventScroll: true });
}

async function start() {
  try {
    settings = await (await fetch("/panel/settings.json")).json();
  } catch (_) { /* the defaults */ }
  document.getElementById("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.hash = "#/login";
  });
  window.addEventListener("hashchange", route);
  route();
}

start();
