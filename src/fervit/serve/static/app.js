// The page talks to the same JSON API as any other client: POST /predict, GET /health.
"use strict";

// one colour per emotion; fervit predict --annotate draws with the same palette
const COLOURS = {
  angry: "#e6194b", disgusted: "#3cb44b", fearful: "#911eb4", happy: "#ffc119",
  neutral: "#a9a9a9", sad: "#4363d8", surprised: "#f58231",
};
const WEBCAM_WIDTH = 640; // frames are sent at this width: enough for faces, small enough to be quick

const view = document.getElementById("view");
const ctx = view.getContext("2d");
const video = document.getElementById("video");
const statusEl = document.getElementById("status");
const results = document.getElementById("results");
const webcamButton = document.getElementById("webcam-button");
let stream = null;

function setStatus(text, isError = false) {
  statusEl.textContent = text;
  statusEl.classList.toggle("error", isError);
}

async function predict(blob, name) {
  const form = new FormData();
  form.append("file", blob, name);
  const response = await fetch("/predict", { method: "POST", body: form });
  const body = await response.json().catch(() => ({ detail: `server answered ${response.status}` }));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    throw new Error(detail);
  }
  return body;
}

// Draw the source (image or video frame) scaled to fit, then each face's box and label.
function drawResult(source, width, height, result) {
  const scale = Math.min(1, 960 / width);
  view.width = Math.round(width * scale);
  view.height = Math.round(height * scale);
  ctx.drawImage(source, 0, 0, view.width, view.height);
  const k = view.width / result.width;
  const line = Math.max(2, Math.round(view.width / 250));
  ctx.font = `600 ${Math.max(13, Math.round(view.width / 40))}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  result.faces.forEach((face, i) => {
    const [x, y, w, h] = face.box.map((v) => v * k);
    const colour = COLOURS[face.emotion] || "#fff";
    ctx.lineWidth = line;
    ctx.strokeStyle = colour;
    ctx.strokeRect(x, y, w, h);
    const label = `${i + 1}. ${face.emotion} ${Math.round(100 * face.probabilities[face.emotion])}%`;
    const metrics = ctx.measureText(label);
    const th = parseInt(ctx.font.split(" ")[1], 10) + 2 * line;
    const ty = y - th >= 0 ? y - th : y + h;
    ctx.fillStyle = colour;
    ctx.fillRect(x - line / 2, ty, metrics.width + 2 * line, th);
    ctx.fillStyle = "#000";
    ctx.fillText(label, x + line / 2, ty + line);
  });
}

// One card per face: its emotion and a bar chart of all class probabilities.
function renderCards(result) {
  results.replaceChildren(...result.faces.map((face, i) => {
    const card = document.createElement("section");
    card.className = "face-card";
    const title = document.createElement("h2");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = COLOURS[face.emotion] || "#fff";
    const emotion = document.createElement("span");
    emotion.className = "emotion";
    emotion.textContent = face.emotion;
    title.append(swatch, `Face ${i + 1}: `, emotion);
    card.append(title);
    for (const [name, p] of Object.entries(face.probabilities)) {
      const row = document.createElement("div");
      row.className = "bar-row";
      row.dataset.emotion = name;
      const label = document.createElement("span");
      label.textContent = name;
      const track = document.createElement("div");
      track.className = "bar-track";
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${(100 * p).toFixed(1)}%`;
      bar.style.background = COLOURS[name] || "#888";
      track.append(bar);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = `${(100 * p).toFixed(0)}%`;
      row.append(label, track, value);
      card.append(row);
    }
    return card;
  }));
}

function summary(result) {
  if (!result.faces.length) return "no face found";
  const n = result.faces.length;
  return `${n} face${n > 1 ? "s" : ""}${result.whole ? " (the whole image is taken as a face crop)" : ""}`;
}

document.getElementById("file-input").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  stopWebcam();
  setStatus(`Analysing ${file.name}…`);
  const url = URL.createObjectURL(file);
  try {
    const result = await predict(file, file.name);
    const img = new Image();
    img.src = url;
    await img.decode();
    drawResult(img, img.naturalWidth, img.naturalHeight, result);
    renderCards(result);
    setStatus(`${file.name}: ${summary(result)}.`);
  } catch (err) {
    results.replaceChildren();
    setStatus(`${file.name}: ${err.message}`, true);
  } finally {
    URL.revokeObjectURL(url);
    event.target.value = "";
  }
});

// Webcam: grab a frame, send it, draw the answer, then grab the next; one request in flight at a time.
async function webcamLoop() {
  const grab = document.createElement("canvas");
  let frames = 0;
  const started = performance.now();
  while (stream) {
    if (video.readyState < 2) {
      await new Promise((resolve) => setTimeout(resolve, 50));
      continue;
    }
    const scale = Math.min(1, WEBCAM_WIDTH / video.videoWidth);
    grab.width = Math.round(video.videoWidth * scale);
    grab.height = Math.round(video.videoHeight * scale);
    grab.getContext("2d").drawImage(video, 0, 0, grab.width, grab.height);
    const blob = await new Promise((resolve) => grab.toBlob(resolve, "image/jpeg", 0.85));
    try {
      const result = await predict(blob, "webcam.jpg");
      if (!stream) break;
      drawResult(grab, grab.width, grab.height, result);
      renderCards(result);
      frames += 1;
      view.dataset.frames = String(frames); // lets a test (or a curious reader) see that frames keep coming
      const fps = (1000 * frames) / (performance.now() - started);
      setStatus(`Webcam: ${summary(result)} · ${fps.toFixed(1)} frames/s`);
    } catch (err) {
      setStatus(`Webcam: ${err.message}`, true);
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
}

async function startWebcam() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    setStatus("This browser cannot open a webcam here (it needs https or localhost).", true);
    return;
  }
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 1280 } }, audio: false });
  } catch (err) {
    setStatus(`Could not open the webcam: ${err.message}`, true);
    return;
  }
  video.srcObject = stream;
  await video.play();
  webcamButton.textContent = "Stop webcam";
  webcamButton.classList.add("on");
  setStatus("Webcam on…");
  webcamLoop();
}

function stopWebcam() {
  if (!stream) return;
  stream.getTracks().forEach((track) => track.stop());
  stream = null;
  video.srcObject = null;
  webcamButton.textContent = "Start webcam";
  webcamButton.classList.remove("on");
  setStatus("Webcam off.");
}

webcamButton.addEventListener("click", () => (stream ? stopWebcam() : startWebcam()));

fetch("/health")
  .then((r) => r.json())
  .then((h) => { document.getElementById("model").textContent = `model: ${h.model} (${h.backend})`; })
  .catch(() => { document.getElementById("model").textContent = "model: unavailable"; });
