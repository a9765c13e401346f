"""Load test of the web demo: many concurrent gradio_client users, good photos mixed with bad uploads.

    python eval/load_test.py                       # 16 clients x 20 requests, prints a Markdown report
    python eval/load_test.py --write eval/LOAD.md  # ... and writes it there, with the command and machine

The demo server runs in a child process (so its memory is measured alone), started as `captioner demo`
starts it (`captioner.webapp.launch(..., block=False)`) on 127.0.0.1 only. Every client thread has its own
`gradio_client.Client` and sends its requests one after another through the `/caption` endpoint with the
page's default settings (beam search with the shipped beam and reranking, captioner.Decoding, 3 alternatives).
Every `--bad-every`-th request uploads a bad file instead (alternately a text file named .jpg and a JPEG cut to
a third of its bytes), which must come back as a clear error message, not a crash. Good requests must all
succeed. The run is bounded in requests (clients x requests) and in time (`--timeout` overall,
`--request-timeout` per request).

Exit status: 0 when every good request got a caption, every bad one a clear message, the server still
answers afterwards and its RSS grew by less than `--max-rss-growth-mb`; 1 otherwise.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from captioner.config import PRECISIONS, Decoding  # noqa: E402  (no torch: the client side stays light)
PHOTOS = ROOT.parent / "shared" / "data" / "photos"
BAD_MESSAGES = {"not_image": "not an image file", "truncated": "corrupt or truncated image"}


def default_model() -> str | None:
    """CAPTIONER_TEST_MODEL, else the bundled model, else a local Flickr8k run."""
    if os.environ.get("CAPTIONER_TEST_MODEL"):
        return os.environ["CAPTIONER_TEST_MODEL"]
    sys.path.insert(0, str(ROOT))
    from captioner.inference import BUNDLED_MODEL
    if BUNDLED_MODEL.is_file():
        return None
    run = ROOT / "runs" / "f8k" / "best.safetensors"
    if run.is_file():
        return str(run)
    raise SystemExit("load_test: no model: set CAPTIONER_TEST_MODEL, add the bundled model, or pass --model")


# --- the server (child process) ----------------------------------------------------------------------------

def serve(model: str | None, port: int, precision: str) -> None:
    sys.path.insert(0, str(ROOT))
    from captioner import webapp
    from captioner.inference import Captioner
    cap = Captioner.load(model, precision=precision)
    app = webapp.launch(captioner=cap, host="127.0.0.1", port=port, block=False)
    print("READY", cap.precision, flush=True)  # the precision "auto" resolved to, for the report
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        app.close()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the clients --------------------------------------------------------------------------------------------

@dataclass
class Result:
    kind: str  # "good", "not_image" or "truncated"
    ok: bool
    seconds: float
    detail: str


def make_bad_files(folder: Path, photo: Path) -> dict[str, Path]:
    not_image = folder / "notes.jpg"
    not_image.write_text("this is not a picture\n")
    truncated = folder / "cut.jpg"
    truncated.write_bytes(photo.read_bytes()[: photo.stat().st_size // 3])
    return {"not_image": not_image, "truncated": truncated}


def client_thread(url: str, n: int, index: int, photos: list[Path], bad: dict[str, Path], bad_every: int,
                  request_timeout: float, deadline: float, results: list[Result], lock: threading.Lock,
                  on_result=lambda n: None) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    client = Client(url, verbose=False, analytics_enabled=False)
    for i in range(n):
        if time.monotonic() > deadline:
            break
        k = index * n + i
        if bad_every and k % bad_every == bad_every - 1:
            kind = "not_image" if (k // bad_every) % 2 == 0 else "truncated"
            path = bad[kind]
        else:
            kind, path = "good", photos[k % len(photos)]
        t0 = time.perf_counter()
        try:
            text, _, _ = client.submit(handle_file(str(path)), api_name="/caption").result(timeout=request_timeout)
            ok, detail = kind == "good" and bool(text.strip()), text
        except AppError as e:
            ok, detail = kind != "good" and BAD_MESSAGES[kind] in str(e), str(e)
        except Exception as e:  # timeouts, connection errors, anything: a failure, recorded
            ok, detail = False, f"{type(e).__name__}: {e}"
        with lock:
            results.append(Result(kind, ok, time.perf_counter() - t0, detail[:200]))
            on_result(len(results))


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint (default: CAPTIONER_TEST_MODEL, bundled model, runs/f8k)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="decoder weights (as captioner caption)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=20, help="requests per client")
    p.add_argument("--bad-every", type=int, default=4, help="every N-th request uploads a bad file (0 = none)")
    p.add_argument("--photos", default=str(PHOTOS))
    p.add_argument("--timeout", type=float, default=900, help="overall limit in seconds")
    p.add_argument("--request-timeout", type=float, default=180)
    p.add_argument("--max-rss-growth-mb", type=float, default=400)
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the server process (e.g. MALLOC_ARENA_MAX=2); repeatable")
    p.add_argument("--write", help="also write the report (Markdown) to this file")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the server on this port
    args = p.parse_args()
    if args.serve:
        serve(args.model or None, args.serve, args.precision)
        return 0
    if not 1 <= args.clients <= 64 or not 1 <= args.requests <= 1000:
        p.error("--clients must be 1..64 and --requests 1..1000")
    model = args.model or default_model()
    photos = sorted(Path(args.photos).glob("*.jpg"))
    if not photos:
        p.error(f"no .jpg photos in {args.photos}")

    host, port = "127.0.0.1", free_port()
    assert ipaddress.ip_address(host).is_loopback
    url = f"http://{host}:{port}/"
    cmd = [sys.executable, __file__, "--serve", str(port), "--precision", args.precision] + (["--model", model] if model else [])
    env = dict(os.environ)
    for item in args.server_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--server-env expects NAME=VALUE, got {item!r}")
        env[name] = value
    server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    t_start = time.monotonic()
    try:
        line = ""
        while "READY" not in line:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                raise SystemExit("load_test: the server did not start")
        served_precision = line.split()[-1]
        rss_start = rss_mb(server.pid)
        from gradio_client import Client, handle_file
        warm = Client(url, verbose=False, analytics_enabled=False)
        warm.predict(handle_file(str(photos[0])), api_name="/caption")  # load lazily built parts once
        rss_before = rss_mb(server.pid)

        samples: list[float] = []
        stop = threading.Event()

        def sample_rss():
            while not stop.wait(0.25):
                try:
                    samples.append(rss_mb(server.pid))
                except OSError:
                    return
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        results: list[Result] = []
        lock = threading.Lock()
        planned = args.clients * args.requests
        quarters = {max(1, planned * q // 4): q * 25 for q in (1, 2, 3, 4)}
        rss_marks: dict[int, float] = {}

        def on_result(n: int) -> None:  # RSS after each quarter of the requests: does it level off?
            if n in quarters:
                rss_marks[quarters[n]] = rss_mb(server.pid)
        deadline = time.monotonic() + args.timeout
        with tempfile.TemporaryDirectory(prefix="captioner-load-") as tmp:
            bad = make_bad_files(Path(tmp), photos[0])
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client_thread, daemon=True, args=(
                url, args.requests, i, photos, bad, args.bad_every, args.request_timeout, deadline, results, lock,
                on_result))
                for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(1.0, deadline - time.monotonic() + args.request_timeout))
            wall = time.perf_counter() - t0
        stop.set()
        rss_after = rss_mb(server.pid)
        text, _, _ = warm.predict(handle_file(str(photos[-1])), api_name="/caption")
        still_serving = bool(text.strip())
    finally:
        if server.poll() is None:
            server.stdin.close()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    good = [r for r in results if r.kind == "good"]
    bad_r = [r for r in results if r.kind != "good"]
    good_failed = [r for r in good if not r.ok]
    bad_failed = [r for r in bad_r if not r.ok]
    lat_good = [r.seconds for r in good if r.ok]
    lat_bad = [r.seconds for r in bad_r if r.ok]
    growth = rss_after - rss_before
    passed = (len(results) == planned and not good_failed and not bad_failed and still_serving
              and growth < args.max_rss_growth_mb)
    import torch
    rows = [
        ("clients x requests", f"{args.clients} x {args.requests} = {planned} ({len(results)} done)"),
        ("good photo requests: ok / failed", f"{len(good) - len(good_failed)} / {len(good_failed)}"),
        ("bad uploads: clear message / other", f"{len(bad_r) - len(bad_failed)} / {len(bad_failed)}"),
        ("latency, good (p50 / p95 / max)", f"{percentile(lat_good, 50):.2f} s / {percentile(lat_good, 95):.2f} s / "
                                            f"{max(lat_good, default=float('nan')):.2f} s"),
        ("latency, bad (p50 / p95)", f"{percentile(lat_bad, 50):.2f} s / {percentile(lat_bad, 95):.2f} s"),
        ("throughput", f"{len(results) / wall:.2f} requests/s over {wall:.1f} s"),
        ("server RSS: started / warmed up / peak / after", f"{rss_start:.0f} / {rss_before:.0f} / "
                                                           f"{max(samples, default=rss_after):.0f} / {rss_after:.0f} MB"),
        ("server RSS after 25 / 50 / 75 / 100 % of requests",
         " / ".join(f"{rss_marks[q]:.0f}" if q in rss_marks else "-" for q in (25, 50, 75, 100)) + " MB"),
        ("server RSS growth under load", f"{growth:+.0f} MB (limit {args.max_rss_growth_mb:.0f} MB)"),
        ("server still answers afterwards", "yes" if still_serving else "NO"),
        ("result", "PASS" if passed else "FAIL"),
    ]
    shipped = Decoding()
    command = "python eval/load_test.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = [
        "# Demo load test", "",
        f"Command: `{command.strip()}`", "",
        f"Model: `{model or 'bundled'}`; server: `captioner.webapp.launch` on {url} (loopback only), "
        f"default settings (beam search, beam {shipped.beam_size}, its {shipped.rerank} best reranked, 3 alternatives, "
        f"decoder weights {served_precision}), queue concurrency 2; every "
        f"{args.bad_every}th request uploads a bad file (text named .jpg, or a JPEG cut to a third)"
        + (f"; server environment: {', '.join(args.server_env)}." if args.server_env else "."),
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible (shared with other jobs), "
        f"torch {torch.__version__}, Python {platform.python_version()}; CPU only.", "",
        "| measure | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], "",
    ]
    failures = good_failed[:5] + bad_failed[:5]
    if failures:
        report += ["Failures (first few):", ""] + [f"- {r.kind}: {r.detail}" for r in failures] + [""]
    text = "\n".join(report)
    print(text)
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
    print(f"(total {time.monotonic() - t_start:.0f} s)", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
