// The demo page: two apps registered through /edition.js, their endpoints with a ready curl
// line, and the events as they arrive. `window.edition` is the client, to try from the console.
import { Edition, uuid4 } from "/edition.js";

/** The demo's two APPIDs, kept so a reload shows the same endpoints. */
const APPS_KEY = "editiond-demo-apps";

const $ = (selector, root = document) => root.querySelector(selector);
const cards = { A: $("#app-a"), B: $("#app-b") };
const nextVersion = { A: 1, B: 1 };
const apps = loadApps();

const ed = new Edition();
window.edition = ed;
$("#module-url").textContent = new URL("/edition.js", location.href).href;

ed.addEventListener("state", (e) => {
  $("#state").textContent = e.detail;
  $("#state").dataset.state = e.detail;
  $("#role").textContent = ed.leader ? "this tab holds the connection" : "sharing another tab's connection";
  if (ed.uaid) $("#uaid").textContent = ed.uaid;
});

ed.addEventListener("update", (e) => {
  const { appid, version } = e.detail;
  const name = Object.keys(apps).find((k) => apps[k] === appid) ?? "?";
  const row = document.createElement("tr");
  row.dataset.app = name;
  row.dataset.appid = appid;
  row.dataset.version = String(version);
  for (const text of [new Date().toLocaleTimeString(), name, String(version)]) {
    const cell = document.createElement("td");
    cell.textContent = text;
    row.append(cell);
  }
  $("#events tbody").prepend(row);
  $("#events").hidden = false;
  $("#empty").hidden = true;
  if (name in nextVersion && version < Number.MAX_SAFE_INTEGER) {
    nextVersion[name] = Math.max(nextVersion[name], version + 1);
    showCurl(name);
  }
});

ed.addEventListener("error", (e) => {
  // The stored UAID was refused and a new one made: register the apps again for new endpoints.
  notice(`${e.detail.message}. Registering the apps again.`);
  registerAll();
});

registerAll();

function loadApps() {
  try {
    const stored = JSON.parse(localStorage.getItem(APPS_KEY) ?? "null");
    if (stored?.A && stored?.B) return stored;
  } catch {
    // unreadable: make new ones
  }
  const made = { A: uuid4(), B: uuid4() };
  try {
    localStorage.setItem(APPS_KEY, JSON.stringify(made));
  } catch {
    // not kept: a reload registers two new apps
  }
  return made;
}

function registerAll() {
  for (const name of Object.keys(cards)) {
    ed.register(apps[name]).then(
      ({ endpoint }) => {
        const code = $(".endpoint", cards[name]);
        code.textContent = endpoint;
        code.dataset.endpoint = endpoint;
        showCurl(name);
        for (const button of cards[name].querySelectorAll("button")) button.disabled = false;
        if (ed.uaid) $("#uaid").textContent = ed.uaid;
      },
      (error) => notice(`App ${name} could not register: ${error.message}`),
    );
  }
}

function showCurl(name) {
  const endpoint = $(".endpoint", cards[name]).dataset.endpoint;
  if (endpoint) $(".curl", cards[name]).textContent = `curl -X PUT -d version=${nextVersion[name]} ${endpoint}`;
}

function notice(text) {
  $("#notice").textContent = text;
  $("#notice").hidden = false;
}

document.addEventListener("click", async (e) => {
  const button = e.target.closest("button.copy");
  if (!button) return;
  const text = $(`.${button.dataset.copy}`, button.closest(".app")).textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    // No clipboard access (an insecure origin, a denied permission): select it for ctrl-c.
    getSelection().selectAllChildren(button.previousElementSibling);
    button.textContent = "Selected";
  }
  setTimeout(() => (button.textContent = "Copy"), 1500);
});
