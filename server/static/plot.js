// The surprise plot: one bar per token over the session's recent tokens (coloured like the text),
// a moving average on top, your messages shaded, a tick where each message starts.
import { LOSS_MAX, lossColour } from "./tokens.js";

const RECENT = 400; // tokens shown
const SMOOTH = 16; // tokens in the moving average

export function drawSurprise(canvas, messages) {
  const points = [];
  const starts = [];
  for (const m of messages) {
    if (!m.losses?.length) continue;
    starts.push(points.length);
    for (const loss of m.losses) points.push({ loss, user: m.role === "user" });
  }
  const first = Math.max(points.length - RECENT, 0);
  const shown = points.slice(first);

  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 280;
  const height = canvas.clientHeight || 140;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  canvas.dataset.tokens = String(shown.length);

  const top = Math.max(LOSS_MAX, ...shown.map((p) => p.loss));
  const left = 22;
  const plotW = width - left - 4;
  const plotH = height - 24;
  const y = (loss) => 4 + plotH * (1 - loss / top);
  g.font = "10px system-ui, sans-serif";
  g.fillStyle = "#888";
  g.strokeStyle = "#e4e4e4";
  g.lineWidth = 1;
  for (let v = 0; v <= top; v += 5) {
    g.beginPath();
    g.moveTo(left, y(v) + 0.5);
    g.lineTo(width - 4, y(v) + 0.5);
    g.stroke();
    g.fillText(String(v), 2, y(v) + 3);
  }
  if (!shown.length) {
    g.fillText("no tokens yet", left + 8, height / 2);
    return;
  }
  const step = plotW / Math.max(shown.length, 40);
  shown.forEach((p, i) => {
    const x = left + i * step;
    if (p.user) {
      g.fillStyle = "rgba(60, 110, 220, 0.08)";
      g.fillRect(x, 4, Math.max(step, 1), plotH);
    }
    g.fillStyle = lossColour(p.loss);
    g.fillRect(x, y(p.loss), Math.max(step - 0.5, 1), y(0) - y(p.loss));
  });
  g.fillStyle = "#999";
  for (const s of starts) {
    if (s >= first) g.fillRect(left + (s - first) * step, y(0), 1, 4);
  }
  g.strokeStyle = "#333";
  g.lineWidth = 1.5;
  g.beginPath();
  let sum = 0;
  shown.forEach((p, i) => {
    sum += p.loss - (i >= SMOOTH ? shown[i - SMOOTH].loss : 0);
    const avg = sum / Math.min(i + 1, SMOOTH);
    const x = left + (i + 0.5) * step;
    if (i === 0) g.moveTo(x, y(avg));
    else g.lineTo(x, y(avg));
  });
  g.stroke();
  g.fillStyle = "#888";
  g.textAlign = "right";
  g.fillText(`last ${shown.length} tokens`, width - 4, height - 1);
}
