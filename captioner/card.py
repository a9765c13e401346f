"""A model's card: what it is, what it saw, how it was made and how it scores, kept inside the model file.

A bundled model carries a "card" in its metadata (`make_card` writes it when a recipe bundles); `describe`
prints it for `captioner info`, and for any other checkpoint what its metadata says it holds.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from .errors import CaptionerError


def read_meta(path: str | Path | None) -> tuple[Path, dict]:
    """A checkpoint's metadata without loading its weights (the bundled model when `path` is None)."""
    from .checkpoint import FORMAT
    from .inference import BUNDLED_MODEL
    p = Path(path) if path else BUNDLED_MODEL
    if p.is_dir():
        p = next((p / n for n in ("best.safetensors", "model.safetensors") if (p / n).is_file()), p)
    if not p.is_file():
        raise CaptionerError(f"checkpoint not found: {p}")
    try:
        from safetensors import safe_open
        with safe_open(str(p), "pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for anything unreadable
        raise CaptionerError(f"{p} is not a readable safetensors checkpoint ({str(e).splitlines()[0]})") from None
    if raw.get("format") != FORMAT or "captioner" not in raw:
        raise CaptionerError(f"{p} is a safetensors file but not a captioner checkpoint")
    try:
        return p, json.loads(raw["captioner"])
    except json.JSONDecodeError as e:
        raise CaptionerError(f"{p}: checkpoint metadata is malformed JSON ({e.msg})") from None


def architecture(meta: dict) -> str:
    """One line on the network, from the metadata every checkpoint has."""
    dec = meta["decoder"]
    n = len(meta.get("ensemble", [])) or 1
    enc = meta["encoder"]
    cnns = [m["name"] for m in enc.get("stack", [])] or [enc["name"]]
    att = f", attending over {dec['regions']} image regions at every word" if dec.get("regions") else ""
    who = f"{n} LSTM decoders voting" if n > 1 else "one LSTM decoder"
    return (f"{who} ({dec['hidden_dim']} units, {dec['vocab_size']} words{att}), reading "
            f"{' and '.join(cnns)} features; weights stored as {meta.get('storage', 'float32')}")


def make_card(meta: dict, name: str, data: list[str], recipe: str, scores: dict[str, dict],
              version: str | None = None) -> dict:
    """The card a recipe stores in the model it bundles. `scores`: check set -> {"metrics", "decoding",
    "command"}; paths are kept relative (no local folders)."""
    return {"name": name, "version": version or datetime.date.today().isoformat(),
            "architecture": architecture(meta), "training_data": data, "recipe": recipe,
            "date": datetime.date.today().isoformat(), "scores": scores}


def _decoding_line(d: dict) -> str:
    from dataclasses import fields
    from .config import Decoding
    known = {f.name for f in fields(Decoding)}
    return Decoding(**{k: v for k, v in d.items() if k in known}).describe() + f", {d.get('precision', 'float32')} weights"


def describe(path: str | Path | None = None) -> str:
    p, meta = read_meta(path)
    card = meta.get("card")
    lines = [f"{p.name}"]
    if card:
        lines += [f"  name:          {card['name']} (version {card['version']})",
                  f"  architecture:  {card['architecture']}",
                  f"  trained on:    {', '.join(card['training_data'])}",
                  f"  recipe:        {card['recipe']} (python train/recipe.py {card['recipe']})",
                  f"  made:          {card['date']}",
                  f"  size:          {p.stat().st_size / 1e6:.1f} MB"]
        for check, s in card.get("scores", {}).items():
            m = s["metrics"]
            lines.append(f"  {check}: " + " / ".join(f"{k} {m[k]:.2f}" for k in m))
            lines.append(f"      decoding: {_decoding_line(s['decoding'])}")
            lines.append(f"      command:  {s['command']}")
        return "\n".join(lines)
    lines += [f"  architecture:  {architecture(meta)}",
              f"  vocabulary:    {len(meta.get('vocab', []))} words",
              f"  size:          {p.stat().st_size / 1e6:.1f} MB"]
    train = meta.get("train") or {}
    if train:
        cfg = train.get("config", {})
        data = cfg.get("data")
        lines.append(f"  trained on:    {', '.join(data) if isinstance(data, list) else data} "
                     f"(epoch {train.get('epoch', '?')})")
        if train.get("dev"):
            lines.append("  dev (greedy): " + ", ".join(f"{k[4:]} {v:.2f}" for k, v in train["dev"].items()))
    if meta.get("scst"):
        lines.append(f"  SCST:          epoch {meta['scst'].get('epoch', '?')}")
    lines.append("  (no model card: `captioner info` shows one for models bundled by train/recipe.py)")
    return "\n".join(lines)
