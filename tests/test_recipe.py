"""train/recipe.py end to end on a tiny dataset: seeds side by side, SCST on each, one ensemble, and a
second invocation that keeps what is finished."""
import json
import subprocess
import sys
from pathlib import Path

from conftest import make_images, make_tiny_dataset

from captioner.config import Decoding
from captioner.inference import Captioner
from captioner.model import Ensemble

BEAM_SIZE, RERANK = Decoding().beam_size, Decoding().rerank
RECIPE = Path(__file__).parent.parent / "train" / "recipe.py"


def _recipe(cfg: Path):
    return subprocess.run([sys.executable, RECIPE, cfg], capture_output=True, text=True, timeout=600)


def test_recipe_runs_seeds_scst_and_ensemble(tmp_path):
    """Two sources (the second has training images only), two seeds each on its own CNN ("encoders": Lite0,
    Lite1), SCST, one ensemble holding both CNNs, with its card."""
    from captioner.encoders import EncoderStack
    data = make_tiny_dataset(tmp_path / "data")
    more = tmp_path / "more"
    make_images(more, 6)
    (more / "caps.csv").write_text("image,caption\n" + "".join(f"img{i}.jpg,a bright square photo\n" for i in range(6)))
    cfg = {"data": [str(data / "caps.csv"), str(more / "caps.csv")], "source_weights": [1, 1], "name": "tiny",
           "out": str(tmp_path / "out"), "cache_dir": str(data / "cache"),
           "embed_dim": 16, "hidden_dim": 16, "min_count": 1, "batch_size": 4, "epochs": 2, "workers": 0,
           "warmup_steps": 2, "seeds": [0, 1], "encoders": ["efficientnet_lite0", "efficientnet_lite1"],
           "scst": {"epochs": 1, "batch_size": 4, "samples": 2}}
    (tmp_path / "r.json").write_text(json.dumps(cfg))
    r = _recipe(tmp_path / "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "out"
    report = json.loads((out / "recipe.json").read_text())
    assert set(report["seconds"]) == {"features", "cross-entropy", "scst", "bundle+eval", "total"}
    assert report["peak_rss_mb_all_processes"] > 100 and report["seeds"] == [0, 1]
    assert list(report["dev"]) == [str(data / "caps.csv")]  # the source with a dev split, scored on its own
    assert set(report["dev"][str(data / "caps.csv")]) >= {"BLEU-4", "METEOR", "CIDEr"} and report["kept_seeds"] == [0, 1]
    assert set(report["dev_per_seed"]) == {"0", "1"} and (report["decoding"]["beam_size"], report["decoding"]["rerank"]) == (BEAM_SIZE, RERANK)
    assert report["decoding"]["precision"] in ("float32", "bfloat16", "int8")
    cap = Captioner.load(out / "model.safetensors")
    assert isinstance(cap.decoder, Ensemble) and len(cap.decoder.members) == 2
    assert [json.loads((out / f"xe-s{s}" / "config.json").read_text())["encoder"] for s in (0, 1)] == cfg["encoders"]
    assert isinstance(cap.encoder, EncoderStack) and [m.name for m in cap.encoder.members] == cfg["encoders"]
    card = cap.meta["card"]  # the model's card: its name, data, recipe and scores, and no local paths
    assert card["name"] == "tiny" and card["training_data"] == ["data train", "more"]
    assert card["scores"]["data dev"]["metrics"] == report["dev"][str(data / "caps.csv")]
    assert "ensemble_of" not in cap.meta and "runs/" not in json.dumps(cap.meta)
    assert json.loads((out / "xe-s0" / "config.json").read_text())["data"] == cfg["data"]
    for s in (0, 1):
        assert json.loads((out / f"scst-s{s}" / "config.json").read_text())["init"].endswith(f"xe-s{s}/best.safetensors")
    # the seeds really differ, so the ensemble has two different voices
    a, b = (Captioner.load(out / f"xe-s{s}").decoder.state_dict()["out.weight"] for s in (0, 1))
    assert not a.equal(b)
    # again, keeping the best seed alone in int8: everything finished is kept, nothing retrained
    (tmp_path / "r.json").write_text(json.dumps({**cfg, "keep": "best", "storage": "int8"}))
    r = _recipe(tmp_path / "r.json")
    assert r.returncode == 0 and r.stdout.count("finished earlier, kept") == 4, r.stdout + r.stderr
    again = json.loads((out / "recipe.json").read_text())
    assert len(again["invocations"]) == 2 and again["invocations"][0] == report["invocations"][0]
    best = max(again["dev_per_seed"], key=lambda s: again["dev_per_seed"][s][str(data / "caps.csv")]["BLEU-4"])
    assert again["kept_seeds"] == [int(best)] and (report["storage"], again["storage"]) == ("float16", "int8")
    cap = Captioner.load(out / "model.safetensors")
    assert not isinstance(cap.decoder, Ensemble) and cap.meta["storage"] == "int8"


def test_recipe_failure_is_one_line(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"data": str(tmp_path / "nope"), "out": str(tmp_path / "o")}))
    r = _recipe(tmp_path / "r.json")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "data path not found" in r.stderr, r.stderr
    (tmp_path / "file").write_text("x")
    (tmp_path / "r2.json").write_text(json.dumps({"data": str(tmp_path / "nope"), "out": str(tmp_path / "file")}))
    r = _recipe(tmp_path / "r2.json")
    assert r.returncode != 0 and "exists and is not a folder" in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "bad.json").write_text('{"data": "x", "scst": {"epoch": 3}}')
    r = _recipe(tmp_path / "bad.json")
    assert r.returncode != 0 and "unknown scst option(s)" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "keep.json").write_text('{"data": "x", "keep": "all"}')
    r = _recipe(tmp_path / "keep.json")
    assert r.returncode != 0 and '"keep"' in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "storage.json").write_text('{"data": "x", "storage": "int4"}')
    r = _recipe(tmp_path / "storage.json")
    assert r.returncode != 0 and '"storage"' in r.stderr and "Traceback" not in r.stderr
    data = make_tiny_dataset(tmp_path / "data")
    cfg = {"data": str(data / "caps.csv"), "out": str(tmp_path / "out"), "seeds": [0, 1]}
    for bad, says in (({"encoders": ["efficientnet_lite0"]}, "one of"),
                      ({"encoders": ["efficientnet_lite0", "resnet50"]}, "features of one size"),
                      ({"encoders": ["efficientnet_lite0", "efficientnet_lite1"], "fine_tune_blocks": 1},
                       "must not fine-tune")):
        (tmp_path / "bad.json").write_text(json.dumps({**cfg, **bad}))
        r = _recipe(tmp_path / "bad.json")
        assert r.returncode != 0 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_shipped_recipes_are_valid(monkeypatch):
    """train/*.json hold only known options (a typo would otherwise surface hours into a GPU job)."""
    import importlib.util

    import captioner.train
    monkeypatch.setattr(captioner.train, "check_device", lambda device: None)  # coco.json names cuda
    spec = importlib.util.spec_from_file_location("recipe", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    configs = sorted(RECIPE.parent.glob("*.json"))
    assert {c.name for c in configs} >= {"flickr8k.json", "coco.json"}
    for c in configs:
        r = mod.Recipe(c, None)
        assert r.seeds and r.cfg.data
    # another draw of the bundled recipe: new seeds on the same CNNs, in its own folder
    r = mod.Recipe(RECIPE.parent / "flickr8k-coco.json", None, seeds=[3, 4], out="runs/draw2")
    assert r.seeds == [3, 4] and r.out == Path("runs/draw2") and list(r.encoders.values()) == r.recipe.encoders


def test_info_prints_the_bundled_models_card(capsys, tmp_path):
    """`captioner info`: the bundled model's card (name, data, recipe, scores with their decoding and command),
    with no local paths; a file that is not a checkpoint gets one line."""
    from captioner.cli import main
    from captioner.inference import BUNDLED_MODEL
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    card = Captioner.load().meta["card"]
    assert BUNDLED_MODEL.name.startswith(card["name"]) and card["name"] in out and card["recipe"] in out
    assert all(f"{m['BLEU-4']:.2f}" in out and m_cmd["command"] in out
               for m_cmd in card["scores"].values() for m in [m_cmd["metrics"]])
    assert "runs/" not in out and "/root" not in out and "/work" not in out
    (tmp_path / "x.safetensors").write_bytes(b"nonsense")
    assert main(["info", str(tmp_path / "x.safetensors")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
