"""`hope eval`: what learning while serving buys, measured on text that training never saw.

* held-out loss with learning on versus off: each held-out window is read by a fresh session,
  and every token is scored before it is absorbed (so learning can only use the past);
* the re-read gain (HOPE.md invariant 6): a passage is read once with learning on, pushed out of
  the attention window by a distractor, then scored again with learning off; the gain is the
  loss reduction relative to scoring the passage in a fresh session;
* ablations of the session levels (slow only, fast only, no Titans) on both measures, and another
  checkpoint with the same tokenizer given with --compare (one more row, `plain_titans` when it
  is a plain Titans one, `compare: <its directory>` otherwise);
* single-session decode tokens/s, learning on and off.

`hope eval --json` prints one JSON object; `--markdown FILE` writes the results table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from hope_core import data
from hope_core.checkpoint import check_device, load_checkpoint
from hope_core.engine import Engine
from hope_core.model import HopeConfig, Learning
from hope_core.sampling import SamplingParams

ABLATIONS = {
    "full": Learning(),
    "slow_only": Learning.off(),
    "fast_only": Learning(titans=True, fast=True, mid=False),  # the name's "fast": no mid level; Titans writes
    "no_titans": Learning(titans=False, fast=True, mid=True),
}


@dataclass
class EvalConfig:
    window_tokens: int = 1024  # tokens per held-out window, one fresh session each
    windows_per_source: int = 3
    passage_tokens: int = 128
    distractor_tokens: int = 384  # more than the attention window (256)
    passages: int = 8
    decode_tokens: int = 200
    sources: tuple[str, ...] = ("python_docs", "shakespeare", "fortunes")


def heldout_streams(engine: Engine, ec: EvalConfig, cache_dir: Path,
                    token_dir: Path | None = None) -> dict[str, data.TokenStream]:
    if token_dir is not None:  # packed by `hope train --export-tokens`: the same held-out documents
        return {s: data.TokenStream.load(token_dir / f"{s}-heldout.npy") for s in ec.sources}
    docs = {s: data.load_corpus("heldout", (s,), cache_dir) for s in ec.sources}
    return {s: data.TokenStream.cached(engine.tokenizer, d, cache_dir, name=f"eval-{s}")
            for s, d in docs.items() if d}


def reread_episodes(streams: dict[str, data.TokenStream], ec: EvalConfig) -> list[tuple[list[int], list[int]]]:
    """(passage, distractor) pairs: the distractor is other text of the same held-out source,
    from half the stream away, so what it changes is memory of the passage, not the domain."""
    episodes = []
    names = list(streams)
    for i in range(ec.passages):
        src = streams[names[i % len(names)]]
        span = len(src) - ec.passage_tokens - ec.distractor_tokens
        p0 = (i * 7919 * ec.passage_tokens) % max(1, span)
        d0 = (p0 + len(src) // 2) % max(1, span)
        episodes.append((src.tokens[p0:p0 + ec.passage_tokens].tolist(),
                         src.tokens[d0:d0 + ec.distractor_tokens].tolist()))
    return episodes


def heldout_loss(engine: Engine, windows: list[list[int]], learning: Learning) -> float:
    total, n = 0.0, 0
    for w in windows:
        session = engine.new_session()
        lps = engine.absorb(session, w, learning).logprobs
        total -= sum(lps)
        n += len(lps)
    return total / n


def reread_gain(engine: Engine, episodes: list[tuple[list[int], list[int]]], learning: Learning
                ) -> tuple[float, float, float]:
    """Returns (gain, loss of the re-read, loss in a fresh session), each averaged per token."""
    reread, fresh = 0.0, 0.0
    n = 0
    for passage, distractor in episodes:
        session = engine.new_session()
        engine.absorb(session, passage, learning)
        engine.absorb(session, distractor, learning)
        reread -= sum(engine.absorb(session, passage, Learning.off()).logprobs)
        fresh -= sum(engine.absorb(engine.new_session(), passage, Learning.off()).logprobs)
        n += len(passage)
    return 1 - reread / fresh, reread / n, fresh / n


def decode_speed(engine: Engine, learning: Learning, n_tokens: int) -> float:
    session = engine.new_session()
    engine.absorb(session, engine.tokenizer.encode("The memory of a model"), learning)
    params = SamplingParams(max_tokens=n_tokens, temperature=1.0, seed=0)
    # warm up, then time; learning on pays its chunk commits inside the timed loop
    for _ in engine.generate(session.copy(), [], SamplingParams(max_tokens=16, seed=1), learning):
        pass
    t = time.perf_counter()
    gen = engine.generate(session, [], params, learning)
    n = sum(1 for _ in gen)
    return n / (time.perf_counter() - t)


def compare_label(compare: Engine) -> str:
    """The --compare row's name: what that checkpoint is, as far as its config says."""
    if not compare.cfg.self_modifying:
        return "plain_titans"
    return f"compare: {compare.checkpoint.path.name or compare.checkpoint.path}"


def check_comparable(engine: Engine, compare: Engine) -> None:
    """Both checkpoints are fed the main one's tokens: the same ids must mean the same text."""
    if compare.tokenizer.to_str() != engine.tokenizer.to_str():
        raise ValueError(f"--compare {compare.checkpoint.path}: its tokenizer differs from that of "
                         f"{engine.checkpoint.path}; both are fed the same tokens, so they must share one")


def evaluate(engine: Engine, ec: EvalConfig, cache_dir: Path, compare: Engine | None = None,
             log=print, token_dir: Path | None = None,
             ablations_to_run: dict[str, Learning] | None = None, overrides: dict | None = None) -> dict:
    """`overrides` (`--set`) are only recorded here: the engine's config already carries them."""
    if compare is not None:
        check_comparable(engine, compare)
    streams = heldout_streams(engine, ec, cache_dir, token_dir)
    windows: list[list[int]] = []
    for stream in streams.values():
        for batch in stream.iter_windows(1, ec.window_tokens - 1, ec.windows_per_source):
            windows.append(batch[0].tolist())
    if not windows:
        longest = max((len(st.tokens) for st in streams.values()), default=0)
        raise ValueError(f"the held-out streams hold no window of {ec.window_tokens} tokens (the longest has "
                         f"{longest})")
    episodes = reread_episodes(streams, ec)

    state = engine.new_session()
    out: dict = {
        "checkpoint": str(engine.checkpoint.path),
        "fingerprint": engine.fingerprint,
        "params": sum(p.numel() for p in engine.model.parameters()),
        "state_bytes": len(state.to_bytes("float32")),
        "state_bytes_bf16": len(state.to_bytes("bfloat16")),
        "heldout_tokens": sum(len(w) for w in windows),
        "reread_passages": len(episodes),
        "overrides": dict(overrides or {}),
    }
    ablations: dict[str, dict] = {}
    for name, learning in (ablations_to_run or ABLATIONS).items():
        t = time.perf_counter()
        loss = heldout_loss(engine, windows, learning)
        gain, reread, fresh = reread_gain(engine, episodes, learning)
        ablations[name] = {"heldout_loss": loss, "reread_gain": gain, "reread_loss": reread,
                           "fresh_loss": fresh}
        log(f"{name:<10} heldout loss {loss:.4f}  re-read gain {gain:+.1%} "
            f"({reread:.3f} vs fresh {fresh:.3f})  [{time.perf_counter() - t:.0f}s]")
    if compare is not None:
        learning = Learning()
        loss = heldout_loss(compare, windows, learning)
        gain, reread, fresh = reread_gain(compare, episodes, learning)
        label = compare_label(compare)
        ablations[label] = {"heldout_loss": loss, "reread_gain": gain, "reread_loss": reread,
                            "fresh_loss": fresh, "checkpoint": str(compare.checkpoint.path),
                            "fingerprint": compare.fingerprint}
        log(f"{label:<10} heldout loss {loss:.4f}  re-read gain {gain:+.1%} ({reread:.3f} vs fresh {fresh:.3f})")
    out |= {
        "heldout_loss_learn": ablations["full"]["heldout_loss"],
        "heldout_loss_frozen": ablations["slow_only"]["heldout_loss"],
        "reread_gain": ablations["full"]["reread_gain"],
        "ablations": ablations,
    }
    out["decode_tokens_per_s_learn"] = decode_speed(engine, Learning(), ec.decode_tokens)
    out["decode_tokens_per_s_frozen"] = decode_speed(engine, Learning.off(), ec.decode_tokens)
    log(f"decode tokens/s: learning on {out['decode_tokens_per_s_learn']:.1f}, "
        f"off {out['decode_tokens_per_s_frozen']:.1f}")
    return out


def markdown(r: dict) -> str:
    lines = [
        f"Checkpoint `{r['checkpoint']}` (fingerprint `{r['fingerprint'][:16]}`), "
        f"{r['params']:,} parameters; session state {r['state_bytes']:,} bytes "
        f"(fp32), {r['state_bytes_bf16']:,} bytes (bf16).",
        "",
        f"Held-out: {r['heldout_tokens']:,} tokens; re-read: {r['reread_passages']} passages.",
        "",
    ]
    if r.get("overrides"):
        sets = ", ".join(f"`{k}={v}`" for k, v in r["overrides"].items())
        lines += [f"Config overrides (`--set`, this checkpoint only): {sets}.", ""]
    lines += [
        "| session learning | held-out loss | re-read gain | re-read loss | fresh loss |",
        "|---|---|---|---|---|",
    ]
    for name, a in r["ablations"].items():
        if "checkpoint" in a:  # the --compare row: another checkpoint, learning on
            name = f"{name} (`{a['checkpoint']}`, `{a['fingerprint'][:16]}`)"
        lines.append(f"| {name} | {a['heldout_loss']:.4f} | {a['reread_gain']:+.1%} | "
                     f"{a['reread_loss']:.3f} | {a['fresh_loss']:.3f} |")
    lines += ["", f"Decode, one session: {r['decode_tokens_per_s_learn']:.1f} tokens/s learning on, "
              f"{r['decode_tokens_per_s_frozen']:.1f} tokens/s learning off "
              f"({torch.get_num_threads()} CPU threads)."]
    return "\n".join(lines) + "\n"


def parse_override(kv: str) -> tuple[str, object]:
    """`lr_fast=0.05` -> ("lr_fast", 0.05), typed by the HopeConfig field."""
    key, _, raw = kv.partition("=")
    kinds = {f.name: f.type for f in fields(HopeConfig)}
    if key not in kinds:
        raise ValueError(f"--set {kv}: HopeConfig has no field {key!r}")
    if kinds[key] == "bool":
        words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
        if raw.lower() not in words:
            raise ValueError(f"--set {key} takes true or false, not {raw!r}")
        return key, words[raw.lower()]
    try:
        return key, {"int": int, "float": float}.get(kinds[key], str)(raw)
    except ValueError:
        raise ValueError(f"--set {key} takes a {kinds[key]}, not {raw!r}") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="hope eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="checkpoint directory (default: the bundled one)")
    p.add_argument("--compare", help="another checkpoint with the same tokenizer, one more row (learning on); "
                   "a plain-Titans one gives the plain vs self-modifying row")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... or auto")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--markdown", help="write the results table to this file")
    p.add_argument("--quick", action="store_true", help="fewer windows and passages")
    p.add_argument("--cache-dir", default=str(data.DEFAULT_CACHE_DIR))
    p.add_argument("--token-dir", help="held-out tokens packed by `hope train --export-tokens`")
    p.add_argument("--no-ablations", action="store_true", help="only learning on and off")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a serving-time config field (e.g. lr_fast=0.05)")
    a = p.parse_args(argv)
    device = check_device(a.device)
    overrides = dict(parse_override(kv) for kv in a.set)
    if a.markdown:  # found out before the evaluation, not after
        Path(a.markdown).parent.mkdir(parents=True, exist_ok=True)
    ec = EvalConfig()
    if a.quick:
        ec.windows_per_source, ec.passages, ec.decode_tokens = 1, 3, 64
    engine = Engine(load_checkpoint(a.checkpoint, device, overrides), device)
    compare = Engine(load_checkpoint(a.compare, device), device) if a.compare else None
    log = (lambda *x: print(*x, file=sys.stderr)) if a.json else print
    runs = {k: ABLATIONS[k] for k in ("full", "slow_only")} if a.no_ablations else None
    r = evaluate(engine, ec, Path(a.cache_dir), compare, log, Path(a.token_dir) if a.token_dir else None, runs,
                 overrides)
    if a.markdown:
        Path(a.markdown).write_text(markdown(r))
    if a.json:
        print(json.dumps(r))
    else:
        print(markdown(r))


if __name__ == "__main__":
    main()
