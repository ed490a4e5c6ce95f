// layerwatch live page: the mounts' change lists as trees, and the event feed, live over SSE.
// Names are attacker-controlled bytes: they only ever reach the page through textContent.
"use strict";

const FEED_MAX = 300;
const lists = new Map();      // mount -> Map(path -> kind)
const known = new Map();      // mount -> the seq its list is consistent at
const inSnapshot = new Set(); // mounts between snapshot.begin and snapshot.end
let headSeq = 0;
let renderQueued = false;

function pathOf(data) {
  if (data.path !== undefined) return data.path;
  if (data.path_b64 === undefined) return null;
  const bytes = Uint8Array.from(atob(data.path_b64), (c) => c.charCodeAt(0));
  return new TextDecoder("utf-8").decode(bytes);  // invalid bytes show as U+FFFD
}

async function getJSON(url) {
  const resp = await fetch(url, { credentials: "same-origin" });
  if (!resp.ok) throw new Error(`${url}: ${resp.status}`);
  return resp.json();
}

function setText(id, text, cls) {
  const el = document.getElementById(id);
  el.textContent = text;
  if (cls !== undefined) el.className = cls;
}

function apply(event) {
  const data = event.data || {};
  const seq = parseInt(event.sequence, 10);
  const mount = data.mount;
  const type = event.type.replace("io.layerwatch.", "");
  if (seq > headSeq) headSeq = seq;
  if (type === "snapshot.begin") {
    inSnapshot.add(mount);
    lists.set(mount, new Map());
  } else if (type === "snapshot.end") {
    inSnapshot.delete(mount);
    known.set(mount, seq);
  } else if (type === "change") {
    const list = lists.get(mount) || new Map();
    lists.set(mount, list);
    if (inSnapshot.has(mount) || seq > (known.get(mount) ?? -1)) {
      const path = pathOf(data);
      if (data.kind === null) list.delete(path); else list.set(path, data.kind);
    }
  }
  if (!(type === "change" && data.op === "snapshot")) addToFeed(type, seq, data);
  queueRender();
}

function addToFeed(type, seq, data) {
  const feed = document.getElementById("feed");
  const li = document.createElement("li");
  li.value = seq;
  li.dataset.seq = String(seq);
  if (type === "change") {
    const kind = document.createElement("span");
    kind.className = `k-${data.kind || data.prev_kind}`;
    kind.textContent = `${data.kind || "-"}`;
    li.append(`${data.mount} `, kind, ` ${data.op} ${pathOf(data)}`);
  } else {
    li.className = "control";
    li.textContent = `${data.mount || "*"} ${type}${data.reason ? " (" + data.reason + ")" : ""}`;
  }
  feed.prepend(li);
  while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
}

function queueRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; render(); });
}

function buildTree(list) {
  const root = { children: new Map() };
  for (const path of [...list.keys()].sort()) {
    let node = root;
    let sofar = "";
    for (const part of path.split("/").slice(1)) {
      sofar += "/" + part;
      if (!node.children.has(part)) node.children.set(part, { path: sofar, children: new Map() });
      node = node.children.get(part);
    }
    node.kind = list.get(path);
  }
  return root;
}

function renderNode(node, mount, ul) {
  for (const [name, child] of node.children) {
    const li = document.createElement("li");
    li.dataset.mount = mount;
    li.dataset.path = child.path;
    li.className = child.kind ? `kind-${child.kind}` : "kind-none";
    const row = document.createElement("span");
    row.className = "row";
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = child.kind || " ";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = name;
    row.append(badge, label);
    li.append(row);
    if (child.children.size) {
      const sub = document.createElement("ul");
      renderNode(child, mount, sub);
      li.append(sub);
    }
    ul.append(li);
  }
}

function render() {
  const box = document.getElementById("mounts");
  const template = document.getElementById("mount-template");
  box.replaceChildren();
  for (const [mount, list] of [...lists.entries()].sort()) {
    const article = template.content.firstElementChild.cloneNode(true);
    article.dataset.mount = mount;
    article.querySelector(".name").textContent = mount;
    const counts = { A: 0, C: 0, D: 0 };
    for (const kind of list.values()) counts[kind] += 1;
    article.querySelector(".summary").textContent =
      `${list.size} entries: ${counts.A} A, ${counts.C} C, ${counts.D} D`;
    renderNode(buildTree(list), mount, article.querySelector(".tree"));
    article.querySelector(".empty").hidden = list.size > 0;
    box.append(article);
  }
  setText("head", `seq: ${headSeq}`);
}

async function pollHealth() {
  try {
    const resp = await fetch("/healthz", { credentials: "same-origin" });
    const body = await resp.json();
    setText("health", `health: ${body.status}`, `health health-${body.status}`);
  } catch (err) {
    setText("health", "health: unreachable", "health health-degraded");
  }
}

async function start() {
  const { mounts, head_seq: head } = await getJSON("/v1/mounts");
  let since = head;
  for (const m of mounts) {
    const body = await getJSON(`/v1/mounts/${encodeURIComponent(m.name)}/changes`);
    lists.set(m.name, new Map(body.changes.map((row) => [pathOf(row), row.kind])));
    known.set(m.name, body.seq);
    since = Math.min(since, body.seq);
  }
  headSeq = Math.max(headSeq, head);
  render();
  const source = new EventSource(`/v1/events?since=${since}`);
  source.onopen = () => setText("conn", "live", "conn conn-open");
  source.onerror = () => setText("conn", "reconnecting", "conn conn-connecting");
  source.onmessage = (msg) => apply(JSON.parse(msg.data));
  pollHealth();
  setInterval(pollHealth, 5000);
}

start().catch((err) => setText("conn", `error: ${err.message}`, "conn conn-closed"));
