"""A Gradio web demo: upload a photo, get its caption.

Gradio is imported only when an app is built, so `captioner caption` and the CLI's parser stay fast and
the library works without it (`pip install 'captioner[demo]'` adds it). The model is loaded once per app
and shared by every request; a queue bounds how many requests run at once.

Uploads reach our code as file paths (`preprocess=False`), never decoded by Gradio: every odd file is
opened by `captioner.images.load_image`, so users see its one-line message rather than a PIL traceback.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .decoding import _mask, _step
from .config import Decoding
from .encoders import VIEWS
from .attention import overlay, thumbnail
from .errors import CaptionerError
from .images import ImageError, load_image
from .memory import trim_if_due

if TYPE_CHECKING:
    import gradio as gr

    from .inference import Caption, Captioner

EXAMPLES_DIR = Path(__file__).parent / "assets" / "examples"
METHODS = ("Beam search", "Greedy", "Sampling")
SHIPPED = Decoding()  # the library's decoding settings, which the demo starts from
# The demo's own limits, below defaults.MAX_BEAM and MAX_LEN (the library's): anyone can reach a public demo
MAX_BEAM, MAX_ALTERNATIVES, MAX_WORDS, MAX_BATCH = 10, 10, 50, 200
TRIM_REQUESTS = 16  # give freed heap back every this many requests (Gradio's worker threads each grow a malloc arena)
LOOKED_KEPT = 64  # captions whose attention waits for the page to ask for it (one a visitor, normally)
ALT_HEADERS = ["caption", "log-prob", "share of listed"]
BATCH_HEADERS = ["file", "caption", "log-prob", "error"]


# --- decoding -------------------------------------------------------------------------------------------

@torch.inference_mode()
def sample(cap: "Captioner", features: torch.Tensor, n: int = 1, max_len: int = 20, temperature: float = 1.0,
           seed: int | None = None) -> list[list[tuple[str, float]]]:
    """`n` captions per image drawn word by word from the model's distribution sharpened or flattened by
    `temperature`; distinct ones only, most likely first. Log-probs are the model's own (temperature 1),
    so they compare with beam search's."""
    vocab = cap.vocab
    gen = torch.Generator(device=features.device)
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    B = features.shape[0]
    state = cap.decoder.init_state(features.repeat_interleave(n, dim=0))
    tokens = torch.full((B * n,), vocab.start_id, dtype=torch.long, device=features.device)
    logprob = torch.zeros(B * n, dtype=torch.float64)
    done = torch.zeros(B * n, dtype=torch.bool)
    words: list[list[int]] = [[] for _ in range(B * n)]
    for t in range(max_len):
        logp, state = _step(cap.decoder, tokens, state)
        logp = _mask(logp.double(), t, vocab, suppress_unk=True)  # as greedy and beam search: no empty or <unk> captions
        tokens = torch.multinomial((logp / temperature).softmax(-1), 1, generator=gen).squeeze(1)
        picked = logp.gather(1, tokens[:, None]).squeeze(1).cpu()
        logprob += torch.where(done, torch.zeros_like(picked), picked)
        for i, tok in enumerate(tokens.tolist()):
            if not done[i] and tok != vocab.end_id:
                words[i].append(tok)
        done |= tokens.cpu() == vocab.end_id
        if bool(done.all()):
            break
    out = []
    for b in range(B):
        best: dict[str, float] = {}
        for i in range(b * n, (b + 1) * n):
            text = vocab.decode(words[i])
            best[text] = max(best.get(text, -math.inf), float(logprob[i]))
        out.append(sorted(best.items(), key=lambda kv: -kv[1]))
    return out


def captions(cap: "Captioner", images: list, method: str = "Beam search", beam_size: int = SHIPPED.beam_size,
             max_len: int = 20, n_best: int = 3, temperature: float = 1.0, views: int = 1,
             rerank: int = SHIPPED.rerank, attention: bool = False) -> list["Caption"]:
    """Captions with their (caption, log-prob) alternatives, best first, for any of the UI's decoding methods;
    `attention` adds each caption's attention per word where the method has one beam path to follow (beam
    search, greedy) and the model attends over regions."""
    from .inference import Caption
    features = cap.encode(images, views=views)
    if method == "Sampling":
        return [Caption(alts[0][0], alts[0][1], alts) for alts in sample(cap, features, n_best, max_len, temperature)]
    if method == "Greedy":
        beam_size = n_best = 1
    return cap.decode(features, n_best=n_best, beam_size=beam_size, max_len=max_len, rerank=rerank, views=views,
                      attention=attention and bool(cap.decoder.cfg.regions))


def _settings(method: Any, beam_size: Any, max_len: Any, n_best: Any, temperature: Any, views: Any = 1,
              rerank: Any = SHIPPED.rerank) -> tuple:
    """API callers can send anything: check it here so a bad value is a message, not a traceback."""
    if method not in METHODS:
        raise CaptionerError(f"unknown decoding method {method!r}; choose one of {', '.join(METHODS)}")
    try:
        beam_size, max_len, n_best, temperature = int(beam_size), int(max_len), int(n_best), float(temperature)
        views, rerank = int(views), int(rerank)
    except (TypeError, ValueError):
        raise CaptionerError("beam size, max length, alternatives, temperature, views and rerank must be numbers") from None
    if views not in VIEWS:
        raise CaptionerError(f"views must be one of {', '.join(map(str, VIEWS))}, got {views}")
    for name, v, hi in (("beam size", beam_size, MAX_BEAM), ("max length", max_len, MAX_WORDS),
                        ("alternatives", n_best, MAX_ALTERNATIVES)):
        if not 1 <= v <= hi:
            raise CaptionerError(f"{name} must be between 1 and {hi}, got {v}")
    if not 0.05 <= temperature <= 5:
        raise CaptionerError(f"temperature must be between 0.05 and 5, got {temperature}")
    if not 0 <= rerank <= MAX_BEAM:
        raise CaptionerError(f"rerank must be between 0 and {MAX_BEAM}, got {rerank}")
    return method, beam_size, max_len, n_best, temperature, views, rerank


def _open_upload(path: str, name: str, max_bytes: float, draft_size: int | None = None):
    """Load an uploaded file, naming it as the user knows it (not by its temporary path on the server).
    `draft_size` lets big JPEGs decode at reduced size, as the encoder's own preprocessing does."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ImageError(f"file too large ({size / 2**20:.1f} MB, limit {max_bytes / 2**20:g} MB): {name}")
    try:
        return load_image(path, draft_size=draft_size)
    except ImageError as e:
        raise ImageError(str(e).replace(path, name)) from None


def _alternatives_table(alts: list[tuple[str, float]]) -> list[list]:
    """Rows of caption, log-prob and share: each caption's probability relative to the others listed."""
    top = max(lp for _, lp in alts)
    weights = [math.exp(lp - top) for _, lp in alts]
    return [[text, round(lp, 3), f"{w / sum(weights):.1%}"] for (text, lp), w in zip(alts, weights)]


def _describe(method: str, beam_size: int, max_len: int, n_best: int, temperature: float, views: int,
              rerank: int = SHIPPED.rerank) -> str:
    if method == "Beam search":
        top = min(rerank, beam_size)
        text = f"beam search (beam {beam_size}" + (f", top {top} reranked by agreement)" if top > 1 else ")")
    else:
        text = f"sampling (temperature {temperature:g})" if method == "Sampling" else "greedy"
    return text + (f" · {views} views" if views > 1 else "")


# --- the app --------------------------------------------------------------------------------------------

def what_it_knows(meta: dict) -> str:
    """One line, in plain words, on which photos the model learned from (its card's training data)."""
    data = " ".join((meta.get("card") or {}).get("training_data", [])).lower()
    if "coco" in data:
        return ("It learned from about 8,000 everyday photos (Flickr8k and COCO): people, animals, vehicles, food, "
                "rooms and streets are what it knows best.")
    if "flickr" in data:
        return "It learned from Flickr8k's photos, mostly of people and dogs outdoors: those are what it knows best."
    return ""


def build_app(captioner: "Captioner | None" = None, model_path: str | os.PathLike | None = None,
              max_upload_mb: float = 20, concurrency: int = 2) -> "gr.Blocks":
    """The demo's page and API, ready to `.launch()`; loads the model unless one is given."""
    try:
        import gradio as gr
    except ImportError:
        raise CaptionerError("the demo needs gradio: pip install 'captioner[demo]'") from None
    from .encoders import parts_of
    from .inference import Captioner

    cap = captioner or Captioner.load(model_path)
    max_bytes = max_upload_mb * 2**20
    draft = max(getattr(e.preprocess, "size", 0) for e in parts_of(cap.encoder)) or None  # the largest input
    out_dir = Path(tempfile.mkdtemp(prefix="captioner-demo-"))  # batch CSV/JSON files
    served = itertools.count(1)

    def done() -> None:
        trim_if_due(next(served), TRIM_REQUESTS)

    # The last captions' attention, by upload and settings: the word picker's event reads what the caption's
    # own decoding recorded, so the `/caption` API keeps its outputs and nothing is decoded twice.
    looked: OrderedDict[tuple, tuple] = OrderedDict()
    looked_lock = threading.Lock()

    def remember(key: tuple, photo, words) -> None:
        with looked_lock:
            looked[key] = (photo, words)
            looked.move_to_end(key)
            while len(looked) > LOOKED_KEPT:
                looked.popitem(last=False)

    def caption_one(image: dict | None, method, beam_size, max_len, n_best, temperature, views=1, rerank=SHIPPED.rerank):
        """Caption for the single-image tab (and the `/caption` API): text, alternatives, details."""
        if not image:
            return "", [], ""
        t0 = time.perf_counter()
        try:
            settings = _settings(method, beam_size, max_len, n_best, temperature, views, rerank)
            img = _open_upload(image["path"], image.get("orig_name") or "uploaded image", max_bytes, draft)
            c = captions(cap, [img], *settings, attention=True)[0]
            alts = c.alternatives
            if c.attention:
                remember((image["path"], settings), thumbnail(img), c.attention)
        except CaptionerError as e:
            raise gr.Error(str(e), duration=None, print_exception=False)  # stays on the page until closed
        finally:
            done()
        details = f"{time.perf_counter() - t0:.2f} s · {_describe(*settings)}"
        return alts[0][0], _alternatives_table(alts), details

    def looked_for(image: dict | None, settings: tuple) -> tuple | None:
        """The attention `caption_one` kept for this upload and these settings, if any."""
        try:
            key = (image["path"], _settings(*settings)) if image else None
        except CaptionerError:
            key = None
        with looked_lock:
            return looked.get(key)

    def show_words(image: dict | None, *settings):
        """After a caption: its words to pick from, and the first word's attention."""
        entry = looked_for(image, settings)
        if entry is None:  # no photo, a failed upload, sampling, or a model without regions
            return gr.Radio(choices=[], value=None), None
        photo, words = entry
        return gr.Radio(choices=[(w.word, i) for i, w in enumerate(words)], value=0), _overlay(entry, 0)

    def show_word(index: int | None, image: dict | None, *settings):
        """The photo under the picked word's attention (no gr.State: it would hold a heartbeat stream open)."""
        entry = looked_for(image, settings)
        return None if entry is None or index is None else _overlay(entry, int(index))

    def _overlay(entry: tuple, index: int):
        """The photo under one word's attention, on the caption's common scale (attention.plot's)."""
        photo, words = entry
        return overlay(photo, words[index].weights, max(float(w.weights.max()) for w in words))

    def caption_batch(paths: list[str] | None, method, beam_size, max_len, n_best, temperature, views=1,
                      rerank=SHIPPED.rerank):
        """One row per file (bad files get their message in the error column), plus CSV and JSON files."""
        if not paths:
            raise gr.Error("Choose some image files first.", print_exception=False)
        if len(paths) > MAX_BATCH:
            raise gr.Error(f"At most {MAX_BATCH} files at once (got {len(paths)}).", print_exception=False)
        try:
            settings = _settings(method, beam_size, max_len, 1, temperature, views, rerank)
        except CaptionerError as e:
            raise gr.Error(str(e), print_exception=False)
        t0 = time.perf_counter()
        rows: list[list] = [[os.path.basename(p), "", None, ""] for p in paths]
        for start in range(0, len(paths), 16):  # bounded memory: 16 decoded images at a time
            loaded = []
            for row, p in enumerate(paths[start:start + 16], start):
                try:
                    loaded.append((row, _open_upload(p, rows[row][0], max_bytes, draft)))
                except ImageError as e:
                    rows[row][3] = str(e)
            if loaded:
                for (row, _), c in zip(loaded, captions(cap, [im for _, im in loaded], *settings)):
                    rows[row][1:3] = [c.text, round(c.logprob, 3)]
        for old in out_dir.iterdir():  # keep the folder small on a long-running server
            if time.time() - old.stat().st_mtime > 3600:
                old.unlink(missing_ok=True)
        stem = out_dir / f"captions-{uuid.uuid4().hex[:8]}"
        with open(f"{stem}.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([BATCH_HEADERS, *rows])
        with open(f"{stem}.json", "w", encoding="utf-8") as f:
            json.dump([dict(zip(["file", "caption", "logprob", "error"], r)) for r in rows], f, indent=2)
        n_bad = sum(1 for r in rows if r[3])
        done()
        summary = (f"{len(rows) - n_bad} captioned, {n_bad} failed · {time.perf_counter() - t0:.2f} s · "
                   f"{_describe(*settings)}")
        return rows, [f"{stem}.csv", f"{stem}.json"], summary

    with gr.Blocks(title="Image captioner", delete_cache=(3600, 3600), analytics_enabled=False) as app:
        gr.Markdown(f"# Image captioner\nDescribes a photo in one sentence: drop, paste or pick one, and its caption "
                    f"appears on the right. {what_it_knows(cap.meta)}")
        with gr.Tab("Single image"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard", "webcam"],
                                     label="Photo", height=360, elem_id="photo")
                    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpg"))
                    if examples:
                        gr.Examples(examples, inputs=[image], label="Examples (click one)")
                with gr.Column():
                    caption = gr.Textbox(label="Caption", elem_id="caption", buttons=["copy"], lines=2)
                    details = gr.Markdown(label="Details", elem_id="details")
                    alternatives = gr.Dataframe(headers=ALT_HEADERS, label="Alternatives", interactive=False,
                                                wrap=True, column_widths=["70%", "15%", "15%"])
                    word = gr.Radio([], label="Where it looked", elem_id="words",
                                    info="pick a word of the caption: the photo shows which regions it read "
                                         "(beam search and greedy)")
                    looked_at = gr.Image(type="pil", label="Attention", interactive=False, height=300,
                                         elem_id="attention")
        with gr.Tab("Batch"):
            files = gr.File(file_count="multiple", file_types=["image"], label="Images: drop several files here",
                            elem_id="batch-files")
            run_batch = gr.Button("Caption all", variant="primary")
            batch_summary = gr.Markdown(label="Summary")
            table = gr.Dataframe(headers=BATCH_HEADERS, label="Captions", interactive=False, wrap=True, elem_id="batch-table",
                                 column_widths=["22%", "45%", "10%", "23%"])
            downloads = gr.File(label="Downloads (CSV, JSON)", file_count="multiple", interactive=False,
                                elem_id="batch-downloads")
        with gr.Accordion("Decoding settings", open=False):
            with gr.Row():
                method = gr.Radio(list(METHODS), value="Beam search", label="Method")
                beam = gr.Slider(1, MAX_BEAM, value=SHIPPED.beam_size, step=1, label="Beam size", info="beam search only")
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature",
                                        info="sampling only: lower = safer, higher = more varied")
            with gr.Row():
                max_len = gr.Slider(1, MAX_WORDS, value=20, step=1, label="Max length (words)")
                n_best = gr.Slider(1, MAX_ALTERNATIVES, value=3, step=1, label="Alternatives",
                                   info="captions listed (beam search and sampling)")
                rerank = gr.Slider(0, MAX_BEAM, value=SHIPPED.rerank, step=1, label="Rerank",
                                   info="beam search only: its N best compete, and the one that agrees most with all "
                                        "its captions is shown; 0 or 1 = the most probable")
            views = gr.Radio(list(VIEWS), value=1, label="Views",
                             info="views of the image whose features are averaged: 6 (the image, its mirror image and "
                                  "four corner crops) scores best on Flickr8k dev but runs the encoder 6 times")
        settings = [method, beam, max_len, n_best, temperature, views, rerank]
        limit = dict(concurrency_limit=concurrency, concurrency_id="model")  # one limit shared by both events
        gr.on([image.change, method.change, beam.release, max_len.release, n_best.release, temperature.release,
               views.change, rerank.release],
              caption_one, inputs=[image, *settings], outputs=[caption, alternatives, details],
              api_name="caption", preprocess=False, trigger_mode="always_last", **limit,
              show_progress="hidden",  # a failure is the toast alone, not red badges on every output
              ).then(show_words, inputs=[image, *settings], outputs=[word, looked_at], preprocess=False,
                     api_visibility="private")
        word.input(show_word, inputs=[word, image, *settings], outputs=looked_at, preprocess=False,
                   api_visibility="private")
        # progress (and an error's badge) in the summary line only; the error itself is the toast
        run_batch.click(caption_batch, inputs=[files, *settings], outputs=[table, downloads, batch_summary],
                        api_name="caption_batch", show_progress_on=[batch_summary], **limit)
    app.queue(max_size=64)
    return app


def launch(model: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 7860,
           max_upload_mb: float = 20, *, captioner: "Captioner | None" = None, block: bool = True,
           share: bool = False) -> "gr.Blocks":
    """Serve the demo. Gradio refuses larger uploads before they are stored (`max_file_size`);
    `block=False` returns the running app (tests use it), to be stopped with `.close()`."""
    app = build_app(captioner, model, max_upload_mb=max_upload_mb)
    app.launch(server_name=host, server_port=port, max_file_size=int(max_upload_mb * 2**20),
               allowed_paths=[str(EXAMPLES_DIR)], prevent_thread_lock=True, show_error=True,
               footer_links=["api"], quiet=True, share=share)  # quiet: gradio's hints are for launch() callers
    if block:
        print(f"captioner demo on {app.local_url}" + (f" and {app.share_url}" if app.share_url else
                                                     " (captioner demo --share adds a public link)"), flush=True)
        app.block_thread()
    return app


def run_demo(args: argparse.Namespace) -> int:
    """Entry point for the CLI: serve until interrupted."""
    if not 0 < args.port < 65536:
        raise CaptionerError(f"--port must be between 1 and 65535, got {args.port}")
    if not args.max_upload_mb > 0:
        raise CaptionerError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    try:
        launch(args.model, args.host, args.port, args.max_upload_mb, share=getattr(args, "share", False))
    except OSError as e:
        if "empty port" not in str(e):
            raise
        raise CaptionerError(f"port {args.port} on {args.host} is in use; choose another with --port") from None
    return 0
