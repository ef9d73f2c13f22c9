// The try-it page: register a photo over REST, then stream poses or webcam frames over
// the WebSocket and draw the frames that come back. Plain browser APIs, no dependencies.
// The binary layouts follow docs/protocol.md (all numbers little-endian).
"use strict";

const PROTOCOL_VERSION = 1;
const POSE_MAGIC = "AVPO";
const CAMERA_MAGIC = "AVCJ";
const FRAME_MAGIC = "AVFR";
const POSE_HEADER_BYTES = 16; // magic, version, flags, reserved, seq, width, height
const CAMERA_HEADER_BYTES = 12; // magic, version, flags, reserved, seq
const FRAME_HEADER_BYTES = 36; // magic, version, format, batch, seq, w, h, 5 timings
const FLAG_NORMALISED = 0x01;
const NUM_VALUES = 136; // 68 landmarks, x and y
const FORMAT_TYPES = { 1: "image/jpeg", 2: "image/webp" };

const TRACK_URL = "/static/web/poses.json";
const SAMPLE_URL = "/static/sample.jpg";
const MAX_IN_FLIGHT = 2; // inputs sent but not answered; more would only queue
const LOST_AFTER_MS = 2000; // an input unanswered this long was dropped by the server
const CAMERA_SEND_WIDTH = 480; // webcam frames are scaled to this width before JPEG
const CAMERA_FPS = 30;

// iBUG-68 face lines for drawing a pose: [first, last, closed]
const FACE_LINES = [
  [0, 16, false], [17, 21, false], [22, 26, false], [27, 30, false], [31, 35, false],
  [36, 41, true], [42, 47, true], [48, 59, true], [60, 67, true],
];

// plain words for WebSocket close codes (RFC 6455 and the server's own 4xxx codes)
const CLOSE_WORDS = {
  1000: "the stream ended normally",
  1001: "the server is going away",
  1003: "the server did not expect what the page sent",
  1006: "the connection was lost without a reason (is the server still running?)",
  1007: "the server could not read what the page sent",
  1008: "the server refused the stream (check the API key)",
  1009: "a message was too big for the server",
  1011: "the server failed while rendering",
  1012: "the server is restarting; try again in a moment",
  1013: "the server is busy, starting or stopping; try again in a moment",
  4400: "the server did not accept the stream settings",
  4404: "the avatar does not exist on the server (was it deleted?)",
  4408: "the stream sent nothing for too long, so the server closed it",
  4409: "the avatar was made with other weights than the server runs now; register " +
    "its photo again",
  4429: "too many streams or messages for this API key; close another stream or slow down",
};

// plain words for the server's warning events (the stream goes on)
const WARNING_WORDS = {
  no_face: "No face found in the webcam picture",
  face_too_small: "The face is too small in the webcam picture; come closer",
  bad_image: "A webcam picture could not be read",
};

const $ = (id) => document.getElementById(id);

const page = {
  avatarId: null,
  track: null, // {fps, frames: [[136 values], ...]}
  socket: null,
  stream: null, // MediaStream of the webcam
  timer: null,
  seq: 0,
  trackIndex: 0,
  sent: new Map(), // seq -> performance.now() when sent
  busy: false, // a webcam frame is being encoded
  received: 0,
  arrivals: [], // performance.now() of recent frames, for fps
  latencies: [], // recent round trips, ms
  serverMs: [], // recent server totals, ms
  dropped: 0,
  stopping: false,
  warned: false, // a warning is on show; the next frame clears it
  mode: "track",
};

// ------------------------------------------------------------------ messages

function say(text) {
  $("status").textContent = text;
}

function fail(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ------------------------------------------------------------------ REST

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorText(response) {
  // the server's error body is {code, message}; fall back to FastAPI's {detail}
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    return `the server answered ${response.status} ${response.statusText}`;
  }
  if (body && body.message) {
    return `${body.message} (${body.code || response.status})`;
  }
  if (body && body.detail) {
    return `${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)} ` +
      `(${response.status})`;
  }
  return `the server answered ${response.status}`;
}

async function checkServer() {
  try {
    const response = await fetch("/readyz", { headers: authHeaders() });
    const body = await response.json();
    if (!body.ready) {
      $("server-state").textContent = "The server is starting; wait a moment and reload.";
      return;
    }
    const weights = body.weights || {};
    const trained = weights.trained ? "trained weights" :
      "demo weights that are not trained (frames will not look like a photo)";
    $("server-state").textContent =
      `Server ready: ${weights.preset || "?"} model, ${weights.image_size || "?"} px, ` +
      `${trained}.`;
    if (body.api_keys === true) {
      $("api-key").required = true;
      $("api-key-help").textContent = "This server needs an API key.";
    }
  } catch (error) {
    $("server-state").textContent = `The server cannot be reached (${error.message}).`;
  }
}

async function loadAvatarList() {
  const select = $("existing");
  try {
    const response = await fetch("/avatars", { headers: authHeaders() });
    if (!response.ok) {
      return;
    }
    const body = await response.json();
    select.replaceChildren(new Option("(choose one)", ""));
    for (const avatar of body.avatars || []) {
      const when = new Date(avatar.created * 1000).toLocaleString();
      select.add(new Option(`${avatar.id} (${when})`, avatar.id));
    }
    select.disabled = (body.avatars || []).length === 0;
  } catch (_) {
    // the list is a convenience; registering still works without it
  }
}

async function register(file, name) {
  clearError();
  say(`Registering ${name}: finding the face and building the avatar…`);
  setBusy(true);
  try {
    const form = new FormData();
    form.append("image", file, name);
    const started = performance.now();
    const response = await fetch("/avatars", {
      method: "POST", body: form, headers: authHeaders(),
    });
    if (!response.ok) {
      fail(`Registration failed: ${await errorText(response)}`);
      say("No avatar registered.");
      return;
    }
    const avatar = await response.json();
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    await showAvatar(avatar, `registered in ${seconds} s`);
    loadAvatarList();
  } catch (error) {
    fail(`Registration failed: ${error.message}`);
  } finally {
    setBusy(false);
  }
}

async function showAvatar(avatar, how) {
  page.avatarId = avatar.id;
  const faces = avatar.num_faces > 1 ?
    `; ${avatar.num_faces} faces in the photo, the largest was used` : "";
  $("avatar-info").textContent = `Avatar ${avatar.id}, ${how}${faces}.`;

  // the preview needs the key too, so it is fetched rather than linked
  const response = await fetch(`/avatars/${avatar.id}/preview`, { headers: authHeaders() });
  if (response.ok) {
    const old = $("preview").src;
    $("preview").src = URL.createObjectURL(await response.blob());
    if (old.startsWith("blob:")) {
      URL.revokeObjectURL(old);
    }
  } else {
    fail(`The preview could not be loaded: ${await errorText(response)}`);
  }
  $("avatar-figure").hidden = false;
  $("start").disabled = page.socket !== null;
  say(`Avatar ${avatar.id} is ready. Choose a driver and press Start.`);
}

async function useExisting(id) {
  if (!id) {
    return;
  }
  clearError();
  const response = await fetch(`/avatars/${id}`, { headers: authHeaders() });
  if (!response.ok) {
    fail(`That avatar cannot be used: ${await errorText(response)}`);
    return;
  }
  await showAvatar(await response.json(), "already on the server");
}

function setBusy(busy) {
  for (const id of ["register", "use-sample"]) {
    $(id).disabled = busy;
  }
}

// ------------------------------------------------------------------ binary messages

function writeMagic(view, magic) {
  for (let i = 0; i < 4; i++) {
    view.setUint8(i, magic.charCodeAt(i));
  }
}

function packPose(seq, values) {
  const buffer = new ArrayBuffer(POSE_HEADER_BYTES + NUM_VALUES * 4);
  const view = new DataView(buffer);
  writeMagic(view, POSE_MAGIC);
  view.setUint8(4, PROTOCOL_VERSION);
  view.setUint8(5, FLAG_NORMALISED);
  view.setUint16(6, 0, true);
  view.setUint32(8, seq, true);
  view.setUint16(12, 0, true); // width and height: not needed for normalised points
  view.setUint16(14, 0, true);
  for (let i = 0; i < NUM_VALUES; i++) {
    view.setFloat32(POSE_HEADER_BYTES + 4 * i, values[i], true);
  }
  return buffer;
}

function packCamera(seq, jpeg) {
  const message = new Uint8Array(CAMERA_HEADER_BYTES + jpeg.byteLength);
  const view = new DataView(message.buffer);
  writeMagic(view, CAMERA_MAGIC);
  view.setUint8(4, PROTOCOL_VERSION);
  view.setUint8(5, 0);
  view.setUint16(6, 0, true);
  view.setUint32(8, seq, true);
  message.set(new Uint8Array(jpeg), CAMERA_HEADER_BYTES);
  return message.buffer;
}

function parseFrame(buffer) {
  const view = new DataView(buffer);
  const magic = String.fromCharCode(...new Uint8Array(buffer, 0, 4));
  if (buffer.byteLength < FRAME_HEADER_BYTES || magic !== FRAME_MAGIC) {
    throw new Error(`expected a frame message (${FRAME_MAGIC}), got ${buffer.byteLength} ` +
      `bytes starting "${magic}"`);
  }
  const timing = (offset) => view.getFloat32(offset, true);
  return {
    format: view.getUint8(5),
    batch: view.getUint16(6, true),
    seq: view.getUint32(8, true),
    width: view.getUint16(12, true),
    height: view.getUint16(14, true),
    totalMs: timing(32),
    payload: new Uint8Array(buffer, FRAME_HEADER_BYTES),
  };
}

// ------------------------------------------------------------------ the stream

function driver() {
  return document.querySelector('input[name="driver"]:checked').value;
}

async function loadTrack() {
  if (page.track === null) {
    const response = await fetch(TRACK_URL);
    if (!response.ok) {
      throw new Error(`the recorded head motion could not be loaded (${response.status})`);
    }
    page.track = await response.json();
  }
  return page.track;
}

async function openCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("this browser gives pages no camera here (a page needs https or " +
      "localhost for that)");
  }
  try {
    page.stream = await navigator.mediaDevices.getUserMedia({
      video: { width: 640, height: 480 }, audio: false,
    });
  } catch (error) {
    throw new Error(`no camera could be opened (${error.name}); use the recorded head ` +
      "motion instead");
  }
  const video = $("camera");
  video.srcObject = page.stream;
  $("camera-figure").hidden = false;
  await video.play();
}

async function start() {
  if (!page.avatarId || page.socket) {
    return;
  }
  clearError();
  resetStats();
  $("start").disabled = true;
  $("stop").disabled = false;
  page.stopping = false;

  const mode = driver();
  try {
    if (mode === "webcam") {
      await openCamera();
    } else {
      await loadTrack();
      $("driver-figure").hidden = false;
    }
  } catch (error) {
    fail(`Cannot start: ${error.message}.`);
    stop();
    return;
  }

  const key = $("api-key").value.trim();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = key ? `?token=${encodeURIComponent(key)}` : "";
  const socket = new WebSocket(
    `${scheme}://${location.host}/avatars/${page.avatarId}/stream${query}`);
  socket.binaryType = "arraybuffer";
  page.socket = socket;
  say("Connecting…");

  socket.onopen = () => {
    socket.send(JSON.stringify({
      type: "hello",
      format: "jpeg",
      quality: 85,
      input: mode === "webcam" ? "frames" : "pose",
      motion: $("motion").value,
    }));
  };
  socket.onmessage = (event) => {
    if (typeof event.data === "string") {
      onEvent(JSON.parse(event.data), mode);
    } else {
      onFrame(event.data);
    }
  };
  socket.onclose = (event) => onClose(event);
  socket.onerror = () => {
    // the close event that follows carries the code and reason
  };
}

function beginSending(mode) {
  if (page.timer !== null) {
    return;
  }
  page.mode = mode;
  $("recentre").disabled = $("motion").value !== "relative";
  if (mode === "webcam") {
    page.timer = setInterval(sendCameraFrame, 1000 / CAMERA_FPS);
  } else {
    page.timer = setInterval(sendTrackPose, 1000 / (page.track.fps || 30));
  }
  say(streamingText());
}

function streamingText() {
  return page.mode === "webcam" ? "Streaming your webcam. Move your head!" :
    "Streaming the recorded head motion.";
}

function recentre() {
  // relative motion: the next driver pose becomes the reference again
  if (page.socket !== null && page.socket.readyState === WebSocket.OPEN) {
    page.socket.send(JSON.stringify({ type: "reset" }));
    say("Re-centred: the avatar follows your movement from here.");
  }
}

function changeMotion() {
  // a running stream switches at once (the server answers with a new ready event)
  const motion = $("motion").value;
  if (page.socket !== null && page.socket.readyState === WebSocket.OPEN) {
    page.socket.send(JSON.stringify({ type: "config", motion }));
    $("recentre").disabled = motion !== "relative";
    say(`Motion is now ${motion}.`);
  }
}

function canSend() {
  // inputs unanswered for long were dropped by the server; forget them
  const now = performance.now();
  for (const [seq, sentAt] of page.sent) {
    if (now - sentAt > LOST_AFTER_MS) {
      page.sent.delete(seq);
    }
  }
  return page.socket !== null && page.socket.readyState === WebSocket.OPEN &&
    page.sent.size < MAX_IN_FLIGHT;
}

function sendTrackPose() {
  const frames = page.track.frames;
  if (!canSend()) {
    return;
  }
  const seq = page.seq++;
  page.sent.set(seq, performance.now());
  page.socket.send(packPose(seq, frames[page.trackIndex]));
  drawPose(frames[page.trackIndex]);
  page.trackIndex = (page.trackIndex + 1) % frames.length;
}

async function sendCameraFrame() {
  const video = $("camera");
  if (page.busy || !canSend() || video.videoWidth === 0) {
    return;
  }
  page.busy = true;
  try {
    // scale the camera image down: the server only needs the face's landmarks
    const scale = Math.min(1, CAMERA_SEND_WIDTH / video.videoWidth);
    const canvas = sendCameraFrame.canvas || (sendCameraFrame.canvas =
      document.createElement("canvas"));
    canvas.width = Math.round(video.videoWidth * scale);
    canvas.height = Math.round(video.videoHeight * scale);
    canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.8));
    if (blob === null || !canSend()) {
      return;
    }
    const seq = page.seq++;
    page.sent.set(seq, performance.now());
    page.socket.send(packCamera(seq, await blob.arrayBuffer()));
  } finally {
    page.busy = false;
  }
}

function onEvent(message, mode) {
  if (message.type === "ready") {
    beginSending(mode);
  } else if (message.type === "stats") {
    if (typeof message.dropped === "number") {
      page.dropped = message.dropped;
    }
  } else if (message.type === "warning") {
    const words = WARNING_WORDS[message.code] || "The server warns";
    say(`${words}: ${message.message || message.code}`);
    page.warned = true;
    if (typeof message.seq === "number") {
      page.sent.delete(message.seq); // no frame will come for it
    }
  } else if (message.type === "error") {
    fail(`The server stopped the stream: ${message.message} (${message.code}).`);
  }
}

async function onFrame(buffer) {
  let frame;
  try {
    frame = parseFrame(buffer);
  } catch (error) {
    fail(`A message from the server could not be read: ${error.message}.`);
    return;
  }

  // round trip of this input; older unanswered inputs were dropped by the server
  const now = performance.now();
  const sentAt = page.sent.get(frame.seq);
  for (const seq of page.sent.keys()) {
    if (seq <= frame.seq) {
      page.sent.delete(seq);
    }
  }
  if (sentAt !== undefined) {
    pushRecent(page.latencies, now - sentAt);
  }
  pushRecent(page.serverMs, frame.totalMs);
  page.arrivals.push(now);
  page.received += 1;
  if (page.warned) {
    page.warned = false;
    say(streamingText());
  }

  await draw(frame);
}

function drawPose(values) {
  // normalised [-1, 1] landmarks -> lines on the small driver canvas
  const canvas = $("driver-view");
  const context = canvas.getContext("2d");
  const half = canvas.width / 2;
  context.fillStyle = "#000";
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.strokeStyle = "#7fd4ff";
  context.lineWidth = 2;
  for (const [first, last, closed] of FACE_LINES) {
    context.beginPath();
    for (let i = first; i <= last; i++) {
      const x = (values[2 * i] + 1) * half;
      const y = (values[2 * i + 1] + 1) * half;
      if (i === first) {
        context.moveTo(x, y);
      } else {
        context.lineTo(x, y);
      }
    }
    if (closed) {
      context.closePath();
    }
    context.stroke();
  }
}

async function draw(frame) {
  const canvas = $("output");
  if (canvas.width !== frame.width || canvas.height !== frame.height) {
    canvas.width = frame.width;
    canvas.height = frame.height;
  }
  const context = canvas.getContext("2d");
  if (frame.format === 0) {
    // raw RGB -> RGBA
    const rgba = new Uint8ClampedArray(frame.width * frame.height * 4);
    for (let src = 0, dst = 0; src < frame.payload.length; src += 3, dst += 4) {
      rgba[dst] = frame.payload[src];
      rgba[dst + 1] = frame.payload[src + 1];
      rgba[dst + 2] = frame.payload[src + 2];
      rgba[dst + 3] = 255;
    }
    context.putImageData(new ImageData(rgba, frame.width, frame.height), 0, 0);
    return;
  }
  const type = FORMAT_TYPES[frame.format] || "image/jpeg";
  const bitmap = await createImageBitmap(new Blob([frame.payload], { type }));
  context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
}

function onClose(event) {
  const wasStopping = page.stopping;
  page.socket = null;
  stop();
  if (wasStopping && (event.code === 1000 || event.code === 1005)) {
    say(`Stream stopped after ${page.received} frames.`);
    return;
  }
  const words = CLOSE_WORDS[event.code] || "the stream closed";
  const reason = event.reason ? `: ${event.reason}` : "";
  fail(`Stream closed: ${words} (code ${event.code}${reason}).`);
  say(`Stream closed after ${page.received} frames.`);
}

function stop() {
  page.stopping = true;
  if (page.timer !== null) {
    clearInterval(page.timer);
    page.timer = null;
  }
  if (page.socket !== null) {
    page.socket.close(1000, "stopped on the page");
    // onClose finishes the job
  }
  $("driver-figure").hidden = true;
  if (page.stream !== null) {
    for (const track of page.stream.getTracks()) {
      track.stop();
    }
    page.stream = null;
    $("camera-figure").hidden = true;
  }
  $("stop").disabled = page.socket === null;
  $("recentre").disabled = true;
  $("start").disabled = page.socket !== null || !page.avatarId;
}

// ------------------------------------------------------------------ statistics

function pushRecent(list, value) {
  list.push(value);
  if (list.length > 30) {
    list.shift();
  }
}

function mean(list) {
  return list.length ? list.reduce((a, b) => a + b, 0) / list.length : NaN;
}

function resetStats() {
  page.seq = 0;
  page.trackIndex = 0;
  page.sent.clear();
  page.received = 0;
  page.arrivals = [];
  page.latencies = [];
  page.serverMs = [];
  page.dropped = 0;
  page.warned = false;
  showStats();
}

function showStats() {
  const now = performance.now();
  page.arrivals = page.arrivals.filter((t) => now - t <= 1000);
  const latency = mean(page.latencies);
  const serverMs = mean(page.serverMs);
  $("fps").textContent = String(page.arrivals.length);
  $("latency").textContent = Number.isNaN(latency) ? "–" : latency.toFixed(0);
  $("server-ms").textContent = Number.isNaN(serverMs) ? "–" : serverMs.toFixed(1);
  $("frames").textContent = String(page.received);
  $("dropped").textContent = String(page.dropped);
}

// ------------------------------------------------------------------ wiring

function init() {
  $("upload-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const file = $("photo").files[0];
    if (!file) {
      fail("Choose a photo first, or use the sample photo.");
      $("photo").focus();
      return;
    }
    register(file, file.name);
  });
  $("use-sample").addEventListener("click", async () => {
    const response = await fetch(SAMPLE_URL);
    if (!response.ok) {
      fail(`The sample photo could not be loaded (${response.status}).`);
      return;
    }
    register(await response.blob(), "sample.jpg");
  });
  $("existing").addEventListener("change", (event) => useExisting(event.target.value));
  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", stop);
  $("recentre").addEventListener("click", recentre);
  $("motion").addEventListener("change", changeMotion);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    checkServer();
    loadAvatarList();
  });
  $("api-key").addEventListener("change", () => {
    checkServer();
    loadAvatarList();
  });

  setInterval(showStats, 250);
  checkServer();
  loadAvatarList();
}

document.addEventListener("DOMContentLoaded", init);
