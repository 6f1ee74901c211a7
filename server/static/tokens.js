// Tokens coloured by surprise (the model's loss on them, -log p in nats), and how the server's
// per-token surprise maps onto the text of a message.

export const LOSS_MAX = 10; // nats at which the colour saturates (a uniform guess over 4096 tokens: 8.3)
const SPECIAL = /^<\|(endoftext|system|user|assistant|end)\|>$/;

export const isSpecial = (text) => SPECIAL.test(text);
export const mean = (xs) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null);
const round = (x) => Math.round(x * 1000) / 1000;

// pale yellow for what the model expected, deep red for what is new to it
export function lossColour(loss) {
  const t = Math.min(Math.max(loss / LOSS_MAX, 0), 1);
  return `hsl(${Math.round(50 - 48 * t)} 100% ${Math.round(97 - 45 * t)}%)`;
}

// The prompt of a chat turn is, per new message, <|role|> content <|end|>, then <|assistant|>
// (the reply's opener). Returns the messages with their content tokens, special tokens left out.
export function promptMessages(tokens, losses) {
  const messages = [];
  let current = null;
  tokens.forEach((text, i) => {
    const special = SPECIAL.exec(text);
    if (!special) {
      current?.tokens.push({ text, loss: losses[i] });
      return;
    }
    const opensReply = special[1] === "assistant" && i === tokens.length - 1;
    current = ["system", "user", "assistant"].includes(special[1]) && !opensReply
      ? { role: special[1], tokens: [] } : null;
    if (current) messages.push(current);
  });
  return messages;
}

// Pieces of displayed text, each with the mean loss of the tokens it stands for:
// {t: text, l: mean loss (null: not scored), k: token count}.
const piece = (text, losses) => ({ t: text, l: losses.length ? round(mean(losses)) : null, k: losses.length });

// A message's content tokens (texts decoded one by one) as pieces of `content`. A character split
// over several tokens decodes as U+FFFD in each: such a run gets the slice of `content` it stands
// for, so the message reads as typed. If the tokens do not line up, they are shown as decoded.
export function alignTokens(tokens, content) {
  const pieces = [];
  let pos = 0;
  for (let i = 0; i < tokens.length;) {
    const { text, loss } = tokens[i];
    if (!text.includes("\uFFFD") && content.startsWith(text, pos)) {
      pieces.push(piece(text, [loss]));
      pos += text.length;
      i += 1;
      continue;
    }
    let j = i;
    while (j < tokens.length && tokens[j].text.includes("\uFFFD")) j += 1;
    const end = j < tokens.length ? content.indexOf(tokens[j].text, pos + 1) : content.length;
    if (j === i || end < 0) break;
    pieces.push(piece(content.slice(pos, end), tokens.slice(i, j).map((x) => x.loss)));
    pos = end;
    i = j;
  }
  if (pos === content.length && pieces.length >= 1) return pieces;
  return tokens.map((x) => piece(x.text, [x.loss]));
}

// Builds a reply's pieces from stream chunks. A chunk carries the text that became final and the
// tokens generated since the last chunk; a token whose text is held back (a partial character, a
// possible stop string) is counted with the text that comes out later.
export class ReplyBuilder {
  constructor() {
    this.pieces = [];
    this.losses = []; // per token, special tokens left out
    this.pending = [];
  }

  push(content, surprise) {
    (surprise?.tokens || []).forEach((text, i) => {
      if (isSpecial(text)) return;
      this.pending.push(surprise.loss[i]);
      this.losses.push(round(surprise.loss[i]));
    });
    if (content) {
      this.pieces.push(piece(content, this.pending));
      this.pending = [];
    }
  }
}

const visible = (text) => text.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");

export function describe(p) {
  if (p.l === null) return `${visible(p.t)}\nnot scored`;
  const tokens = p.k > 1 ? `${p.k} tokens, mean ` : "";
  return `${visible(p.t)}\n${tokens}loss ${p.l.toFixed(2)} nats \u00b7 p = ${formatP(Math.exp(-p.l))}`;
}

function formatP(p) {
  return p >= 0.01 ? `${(p * 100).toFixed(1)}%` : p.toExponential(1);
}

// <span>s for pieces, coloured by loss; `data-loss` holds the value the tooltip shows
export function renderPieces(container, pieces) {
  container.replaceChildren(...pieces.map((p) => {
    const span = document.createElement("span");
    span.textContent = p.t;
    if (p.l !== null) {
      span.className = "tok";
      span.dataset.loss = String(p.l);
      span.dataset.tokens = String(p.k);
      span.style.backgroundColor = lossColour(p.l);
      if (p.l > LOSS_MAX * 0.8) span.classList.add("hot");
    }
    return span;
  }));
}
