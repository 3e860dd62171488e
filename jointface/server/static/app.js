// The JointFace page: asks for an API key once (kept in this tab's sessionStorage), then talks to /v1/.
// Names and messages are always inserted as text, never as HTML.
"use strict";

const KEY_STORE = "jointface-api-key";
const $ = (id) => document.getElementById(id);
let thumbnailUrls = [];

function apiKey() { return sessionStorage.getItem(KEY_STORE); }

async function api(method, path, body) {
  const response = await fetch(path, {
    method, body, headers: { Authorization: `Bearer ${apiKey()}`,
                             ...(typeof body === "string" ? { "Content-Type": "application/json" } : {}) },
  });
  if (response.status === 401) {
    forgetKey("The key was refused (unknown or revoked): paste another one.");
    throw new Error("unauthorized");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function setStatus(text) { $("status").textContent = text; }

function forgetKey(message) {
  sessionStorage.removeItem(KEY_STORE);
  $("app").hidden = true;
  $("forget-key").hidden = true;
  $("key-section").hidden = false;
  $("key-error").textContent = message || "";
}

async function start() {
  $("key-section").hidden = true;
  $("app").hidden = false;
  $("forget-key").hidden = false;
  await loadPeople();
}

// -- search ---------------------------------------------------------------------------------------

async function search(file) {
  $("search-error").textContent = "";
  const form = new FormData();
  form.append("photos", file, file.name);
  setStatus(`searching ${file.name}...`);
  let answer;
  try {
    answer = await (await api("POST", "/v1/search", form)).json();
  } catch (error) {
    $("search-error").textContent = error.message;
    setStatus("");
    return;
  }
  const img = $("picture-img");
  const url = URL.createObjectURL(file);
  await new Promise((resolve, reject) => { img.onload = resolve; img.onerror = reject; img.src = url; });
  drawFaces(answer.results[0].faces, img.naturalWidth, img.naturalHeight);
  const names = answer.results[0].faces.map((face) => face.identity || "unknown");
  $("result-caption").textContent = names.length
    ? `${names.length} face${names.length > 1 ? "s" : ""}: ${names.join(", ")} (threshold ${answer.threshold.value.toFixed(3)}, ${answer.threshold.source})`
    : "no face found";
  $("result").hidden = false;
  setStatus(`searched ${file.name}`);
}

// a face's caption, as on the CLI's annotated pictures: "name 0.83", "unknown (nearest: name 0.52)"
function faceLabel(face) {
  if (face.identity) return `${face.identity} ${face.similarity.toFixed(2)}`;
  const nearest = face.candidates[0];
  return nearest ? `unknown (nearest: ${nearest.name} ${nearest.similarity.toFixed(2)})` : "unknown";
}

function drawFaces(faces, width, height) {
  const picture = $("picture");
  picture.querySelectorAll(".face-box").forEach((box) => box.remove());
  for (const face of faces) {
    const [x1, y1, x2, y2] = face.box;
    const box = document.createElement("div");
    box.className = "face-box" + (face.identity ? "" : " unknown") + ((x1 + x2) / 2 > width / 2 ? " right" : "");
    // percentages: the boxes follow the picture whatever size it is shown at
    box.style.left = `${(100 * x1) / width}%`;
    box.style.top = `${(100 * y1) / height}%`;
    box.style.width = `${(100 * (x2 - x1)) / width}%`;
    box.style.height = `${(100 * (y2 - y1)) / height}%`;
    const label = document.createElement("span");
    label.className = "face-label";
    label.textContent = faceLabel(face);
    box.appendChild(label);
    picture.appendChild(box);
  }
}

// -- people ---------------------------------------------------------------------------------------

async function loadPeople() {
  let listing;
  try {
    listing = (await (await api("GET", "/v1/people")).json()).people;
  } catch (error) {
    if (error.message !== "unauthorized") setStatus(error.message);
    return;
  }
  thumbnailUrls.forEach((url) => URL.revokeObjectURL(url));
  thumbnailUrls = [];
  const list = $("people");
  list.replaceChildren();
  for (const person of listing) {
    const item = document.createElement("li");
    item.dataset.name = person.name;
    const thumbs = document.createElement("div");
    thumbs.className = "thumbs";
    const name = document.createElement("span");
    name.className = "name";
    const count = Object.values(person.faces).reduce((a, b) => a + b, 0);
    name.textContent = `${person.name} (${count})`;
    const rename = document.createElement("button");
    rename.type = "button";
    rename.className = "rename";
    rename.textContent = "Rename";
    rename.addEventListener("click", () => startRename(item, person.name));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "Remove";
    remove.addEventListener("click", () => removePerson(person.name));
    item.append(thumbs, name, rename, " ", remove);
    list.appendChild(item);
    loadThumbnails(person.name, thumbs);
  }
  setStatus(`${listing.length} people`);
}

async function loadThumbnails(name, container) {
  try {
    const person = await (await api("GET", `/v1/people/${encodeURIComponent(name)}`)).json();
    for (const face of person.faces.filter((f) => f.thumbnail).slice(0, 3)) {
      const blob = await (await api("GET", face.thumbnail)).blob();
      const url = URL.createObjectURL(blob);
      thumbnailUrls.push(url);
      const img = document.createElement("img");
      img.alt = `a face of ${name}`;
      img.src = url;
      container.appendChild(img);
    }
  } catch (_) { /* no thumbnails: the name is enough */ }
}

function startRename(item, oldName) {
  if (item.querySelector("form")) return;
  const form = document.createElement("form");
  form.className = "rename-form";
  const input = document.createElement("input");
  input.value = oldName;
  input.maxLength = 255;
  input.required = true;
  const save = document.createElement("button");
  save.textContent = "Save";
  form.append(input, save);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("POST", `/v1/people/${encodeURIComponent(oldName)}/rename`, JSON.stringify({ new_name: input.value }));
      setStatus(`renamed ${oldName} to ${input.value}`);
      await loadPeople();
    } catch (error) { setStatus(error.message); }
  });
  item.appendChild(form);
  input.focus();
}

function confirmDialog(text) {
  const dialog = $("confirm-dialog");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

async function removePerson(name) {
  if (!(await confirmDialog(`Remove ${name} and all their faces? This cannot be undone.`))) return;
  try {
    const answer = await (await api("DELETE", `/v1/people/${encodeURIComponent(name)}`)).json();
    setStatus(`removed ${name} (${answer.faces_removed} faces)`);
    await loadPeople();
  } catch (error) { setStatus(error.message); }
}

// -- enrol ----------------------------------------------------------------------------------------

async function enrol(event) {
  event.preventDefault();
  const name = $("enrol-name").value;
  const form = new FormData();
  for (const file of $("enrol-files").files) form.append("photos", file, file.name);
  form.append("largest", $("enrol-largest").checked ? "true" : "false");
  $("enrol-message").textContent = "enrolling...";
  try {
    const answer = await (await api("POST", `/v1/people/${encodeURIComponent(name)}/faces`, form)).json();
    const enrolled = answer.faces.filter((f) => f.status === "enrolled").length;
    $("enrol-message").textContent = `${answer.person}: ${enrolled} enrolled, ${answer.faces.length - enrolled} already there`;
    $("enrol-form").reset();
    await loadPeople();
  } catch (error) {
    $("enrol-message").textContent = `not enrolled: ${error.message}`;
  }
}

// -- wiring ---------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("key-input").value.trim());
    $("key-input").value = "";
    await start();
  });
  $("forget-key").addEventListener("click", () => forgetKey(""));
  $("refresh-people").addEventListener("click", loadPeople);
  $("enrol-form").addEventListener("submit", enrol);
  $("search-file").addEventListener("change", (event) => {
    if (event.target.files.length) search(event.target.files[0]);
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) search(event.dataTransfer.files[0]);
  });
  if (apiKey()) start(); else forgetKey("");
});
