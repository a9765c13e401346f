"""The web demo, served for real on localhost and driven as users drive it: through gradio_client and a browser.

Every odd upload must give a caption or a clear message, and the server must go on serving after it.
The model is CAPTIONER_TEST_MODEL when set, else the bundled one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, require_shared

if not os.environ.get("CI"):  # the demo is an extra: without gradio, skip locally but fail under CI
    pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from captioner import webapp  # noqa: E402
from captioner.images import ImageError  # noqa: E402
from captioner.inference import BUNDLED_MODEL, Captioner  # noqa: E402
from captioner.config import Decoding  # noqa: E402

BEAM_SIZE, RERANK = Decoding().beam_size, Decoding().rerank

MAX_UPLOAD_MB = 2
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _model_path() -> str | None:
    path = os.environ.get("CAPTIONER_TEST_MODEL")
    if not path and not BUNDLED_MODEL.is_file():
        msg = f"no model: set CAPTIONER_TEST_MODEL or add {BUNDLED_MODEL}"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cap() -> Captioner:
    return Captioner.load(_model_path())


@pytest.fixture(scope="module")
def server(cap):
    """A real server in this process's background threads, as `captioner demo` would start it."""
    port = _free_port()
    app = webapp.launch(captioner=cap, port=port, max_upload_mb=MAX_UPLOAD_MB, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server, verbose=False)


@pytest.fixture(scope="module")
def photo() -> Path:
    return sorted(require_shared("photos").glob("*.jpg"))[0]


def caption(client: Client, path, *settings):
    """(caption, alternatives table, details) from the `/caption` endpoint; settings as in the page."""
    return client.predict(handle_file(str(path)), *settings, api_name="/caption")


def assert_still_serving(client: Client, photo: Path) -> None:
    text, _, _ = caption(client, photo)
    assert text.strip()


# --- odd files, made the way users' files come -----------------------------------------------------------

def _noise(size=(160, 120), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    w, h = size
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def make_bad(kind: str, folder: Path, photo: Path) -> Path:
    p = folder / {"not_image": "notes.jpg", "truncated": "cut.jpg", "empty": "empty.png",
                  "bomb": "huge.png"}[kind]
    if kind == "not_image":
        p.write_text("this is not a picture\n")
    elif kind == "truncated":
        p.write_bytes(photo.read_bytes()[: photo.stat().st_size // 3])
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "bomb":  # 400 MP: small on disk (1-bit, compresses well), far past the 64 MP guard
        Image.new("1", (20000, 20000)).save(p)
    return p


def make_odd(kind: str, folder: Path) -> Path:
    p = folder / f"{kind}.{'gif' if kind == 'animated_gif' else 'jpg' if kind in ('cmyk', 'exif_rotated') else 'png'}"
    if kind == "animated_gif":
        frames = [_noise().rotate(30 * i) for i in range(3)]
        frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    elif kind == "cmyk":
        _noise(mode="CMYK").save(p, quality=90)
    elif kind == "png16":
        Image.fromarray((np.linspace(0, 65535, 160 * 120).reshape(120, 160)).astype(np.uint16)).save(p)
    elif kind == "rgba":
        _noise(mode="RGBA").save(p)
    elif kind == "grayscale":
        _noise(mode="L").save(p)
    elif kind == "exif_rotated":  # stored 160x120, orientation 6 = shown rotated: 120x160
        exif = Image.Exif()
        exif[0x0112] = 6
        _noise().save(p, exif=exif, quality=90)
    return p


# --- API --------------------------------------------------------------------------------------------------

def test_photo_gets_caption_alternatives_and_timing(client, photo):
    text, alts, details = caption(client, photo)
    assert text.strip() and text == alts["data"][0][0]
    assert len(alts["data"]) == 3 and alts["headers"] == webapp.ALT_HEADERS
    assert details.endswith(f" s · beam search (beam {BEAM_SIZE}, top {RERANK} reranked by agreement)")


@pytest.mark.parametrize("method", ["Greedy", "Sampling", "Beam search"])
def test_decoding_methods(client, photo, method):
    text, alts, details = caption(client, photo, method, 4, 12, 5, 0.7)
    assert text.strip() and len(text.split()) <= 12
    n = len(alts["data"])
    assert n == 1 if method == "Greedy" else n == 5 if method == "Beam search" else 1 <= n <= 5  # samples may repeat
    assert method.lower().split()[0] in details


@pytest.mark.parametrize("kind, message", [
    ("not_image", "not an image file"),
    ("truncated", "corrupt or truncated"),
    ("empty", "empty file"),
    ("bomb", "image too large"),
])
def test_bad_upload_gives_clear_message_and_server_goes_on(client, photo, tmp_path, kind, message):
    bad = make_bad(kind, tmp_path, photo)
    with pytest.raises(AppError) as e:
        caption(client, bad)
    assert message in str(e.value) and bad.name in str(e.value)
    assert str(tmp_path) not in str(e.value) and "/tmp/gradio" not in str(e.value)  # no server paths
    assert_still_serving(client, photo)


@pytest.mark.parametrize("kind", ["animated_gif", "cmyk", "png16", "rgba", "grayscale", "exif_rotated"])
def test_odd_but_valid_images_are_captioned(client, photo, tmp_path, kind):
    text, _, _ = caption(client, make_odd(kind, tmp_path))
    assert text.strip()
    assert_still_serving(client, photo)


def test_exif_rotation_is_applied(client, photo, tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 is captioned as the upright photo is."""
    img = Image.open(photo).convert("RGB").resize((200, 150))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    img.save(tmp_path / "sideways.png", exif=exif)
    img.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    img.save(tmp_path / "ignored.png")
    table = {name: caption(client, tmp_path / f"{name}.png")[1]["data"] for name in ("sideways", "upright", "ignored")}
    assert table["sideways"] == table["upright"] != table["ignored"]


def test_upload_over_size_limit_is_refused(client, server, photo, tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(photo.read_bytes() + os.urandom(MAX_UPLOAD_MB * 2**20))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client checks first...
        caption(client, big)
    import httpx  # ...and the server refuses it too, for clients that do not
    with open(big, "rb") as f:
        r = httpx.post(f"{server}gradio_api/upload", files={"files": ("big.jpg", f, "image/jpeg")}, timeout=60)
    assert r.status_code == 413 and "maximum allowed size" in r.text
    assert_still_serving(client, photo)


def test_size_limit_also_checked_by_our_code(tmp_path):
    p = tmp_path / "x.png"
    _noise().save(p)
    with pytest.raises(ImageError, match=r"file too large .* limit 0.001 MB\): shown.png"):
        webapp._open_upload(str(p), "shown.png", 0.001 * 2**20)


def test_bad_settings_give_a_message(client, photo):
    with pytest.raises(AppError, match="beam size must be between 1 and 10"):
        caption(client, photo, "Beam search", 0, 20, 3, 1.0)
    with pytest.raises(AppError, match="unknown decoding method"):
        caption(client, photo, "Telepathy", 3, 20, 3, 1.0)


def test_views_setting_averages_views_and_is_checked(client, cap, photo):
    """The page's Views setting is `captioner caption --views N`; other values are refused with a message."""
    text, alts, details = caption(client, photo, "Beam search", 3, 20, 3, 1.0, 6)
    assert details.endswith(f"beam search (beam 3, top {RERANK} reranked by agreement) · 6 views")
    want = cap.caption_full([photo], beam_size=3, n_best=3, views=6)[0].alternatives
    assert [row[0] for row in alts["data"]] == [t for t, _ in want]
    with pytest.raises(AppError, match="views must be one of 1, 2, 6, got 4"):
        caption(client, photo, "Beam search", 3, 20, 3, 1.0, 4)


def test_rerank_setting_is_the_clis_and_is_checked(client, cap, photo):
    """The page's Rerank setting is `captioner caption --rerank N`: 0 shows the beam's most probable captions
    in order; values outside 0..10 are refused with a message."""
    for r in (0, 5):
        text, alts, details = caption(client, photo, "Beam search", 10, 20, 10, 1.0, 1, r)
        want = cap.caption_full([photo], beam_size=10, n_best=10, rerank=r)[0].alternatives
        assert [row[0] for row in alts["data"]] == [t for t, _ in want] and text == want[0][0]
        assert details.endswith("beam search (beam 10)" if r == 0 else "beam search (beam 10, top 5 reranked by agreement)")
    with pytest.raises(AppError, match="rerank must be between 0 and 10, got 11"):
        caption(client, photo, "Beam search", 10, 20, 3, 1.0, 1, 11)


def test_batch_table_csv_and_json(client, photo, tmp_path):
    bad = make_bad("not_image", tmp_path, photo)
    table, files, summary = client.predict([handle_file(str(photo)), handle_file(str(bad))],
                                           api_name="/caption_batch")
    rows = table["data"]
    assert rows[0][0] == photo.name and rows[0][1].strip() and not rows[0][3]
    assert rows[1][0] == bad.name and "not an image file" in rows[1][3]
    assert "1 captioned, 1 failed" in summary
    # gradio_client stores each download in its own hashed folder: pick the files by suffix, not by order
    csv_file, json_file = (next(f for f in files if str(f).endswith(ext)) for ext in (".csv", ".json"))
    assert Path(csv_file).read_text().splitlines()[0] == ",".join(webapp.BATCH_HEADERS)
    import json
    assert json.loads(Path(json_file).read_text())[0]["caption"] == rows[0][1]


def test_sampling_is_reproducible_with_a_seed(cap, photo):
    feats = cap.encode([photo])
    a = webapp.sample(cap, feats, n=4, max_len=10, temperature=0.8, seed=1)
    assert a == webapp.sample(cap, feats, n=4, max_len=10, temperature=0.8, seed=1)
    assert all(t.strip() and len(t.split()) <= 10 for t, _ in a[0])
    assert [lp for _, lp in a[0]] == sorted((lp for _, lp in a[0]), reverse=True)


def test_example_images_are_shipped_and_captioned(cap):
    examples = sorted(webapp.EXAMPLES_DIR.glob("*.jpg"))
    assert 3 <= len(examples) <= 6 and (webapp.EXAMPLES_DIR / "SOURCES.md").is_file()
    assert sum(p.stat().st_size for p in examples) < 2 * 2**20
    texts = cap.caption(examples)
    assert all(t.strip() for t in texts)
    if _model_path() is None:  # each photo is named for its subject; the bundled model must name it too
        for path, text in zip(examples, texts):
            assert any(w.startswith(path.stem.rstrip("s")) for w in text.split()), (path.name, text)


# --- a real browser -------------------------------------------------------------------------------------------

def _playwright():
    """playwright's sync_playwright, or a skip (a failure under CI) where it or chromium is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not shutil.which(CHROMIUM):
        msg = "browser test needs `apt-get install chromium` and `pip install playwright`"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    return sync_playwright


CAPTION_SHOWN = "document.querySelector('#caption textarea')?.value.trim().length > 0"


@contextlib.contextmanager
def _demo_page(server: str, height: int):
    """A chromium page on the demo, loaded and idle."""
    sync_playwright = _playwright()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": height})
            page.goto(server, wait_until="networkidle")
            yield page
        finally:
            browser.close()


def _upload(page, photo: Path) -> str:
    """Upload a photo on the single-image tab and wait for its caption."""
    page.locator("#photo input[type=file]").set_input_files(str(photo))
    page.wait_for_function(CAPTION_SHOWN, timeout=60_000)
    return page.locator("#caption textarea").input_value()


def test_browser_upload_shows_caption_and_errors(server, photo, tmp_path):
    shot = ROOT / "test-artifacts" / "demo.png"
    shot.parent.mkdir(exist_ok=True)
    with _demo_page(server, 1000) as page:
        text = _upload(page, photo)
        page.wait_for_timeout(500)  # let the alternatives table render for the screenshot
        page.screenshot(path=str(shot), full_page=True)
        # A bad file: the page says why, and the next photo is captioned as before.
        page.locator("#photo button[aria-label='Remove Image']").first.click()
        page.locator("#photo input[type=file]").set_input_files(str(make_bad("truncated", tmp_path, photo)))
        page.get_by_text("corrupt or truncated image").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)  # the message slides in
        page.screenshot(path=str(shot.with_name("demo-error.png")), full_page=True)
        shown_badge = "[data-testid=status-tracker]:not(.hide) .error"  # gradio's red "Error" on an output
        calm = page.locator(f"#caption {shown_badge}").count() == 0  # the toast says it all
        # An example is one click away, and captioned like any upload.
        page.get_by_role("button", name="Close").first.click()
        page.locator("#photo button[aria-label='Remove Image']").first.click()
        page.wait_for_function("document.querySelector('#caption textarea')?.value === ''", timeout=60_000)
        page.locator(".gallery-item").first.click()
        page.wait_for_function(CAPTION_SHOWN, timeout=60_000)
        example_text = page.locator("#caption textarea").input_value()
        # "Caption all" with no files: the toast, and no red badges on the table or the downloads
        page.get_by_role("tab", name="Batch").click()
        page.get_by_role("button", name="Caption all").click()
        page.get_by_text("Choose some image files first").first.wait_for(timeout=60_000)
        batch_calm = all(page.locator(f"#batch-{part} {shown_badge}").count() == 0 for part in ("table", "downloads"))
    assert text.strip() and example_text.strip()
    assert calm, "red badges beside the error toast (single image)"
    assert batch_calm, "red badges beside the error toast (batch)"


def test_browser_word_shows_where_it_looked(server, cap, photo):
    """After a caption, its words are offered one by one; picking one shows the photo under that word's
    attention, the weights the caption's own decoding ran with (the bundled model attends over regions)."""
    if not cap.decoder.cfg.regions:
        pytest.skip("the model does not attend over regions")
    shot = ROOT / "test-artifacts" / "demo-attention.png"
    shot.parent.mkdir(exist_ok=True)
    want = cap.caption_full([photo], attention=True)[0]
    with _demo_page(server, 1200) as page:
        text = _upload(page, photo)
        n = len(text.split())
        page.wait_for_function(f"document.querySelectorAll('#words input[type=radio]').length === {n}",
                               timeout=60_000)
        page.wait_for_function("document.querySelector('#attention img')?.src", timeout=60_000)
        words = page.locator("#words label").all_inner_texts()
        first = page.locator("#attention img").get_attribute("src")
        page.locator("#words label").nth(2).click()
        page.wait_for_function(f"document.querySelector('#attention img')?.src !== {first!r}", timeout=60_000)
        page.wait_for_timeout(500)  # the new image paints
        checked = page.locator("#words input[type=radio]").nth(2).is_checked()
        page.screenshot(path=str(shot), full_page=True)
    assert [w.strip() for w in words] == text.split() == want.text.split() and checked
