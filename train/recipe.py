"""The bundled model's whole recipe in one command: encoder features once, one cross-entropy run per seed
side by side (one core each; "encoders" gives each seed its own CNN), SCST on each where the config has
"scst", every seed scored on dev, then the runs bundled as one file (an ensemble of all seeds, or with
"keep": "best" the best seed alone; float16 weights, or with "storage": "int8" 8-bit ones at half the size)
and that file scored on dev.

    python train/recipe.py train/flickr8k.json             # everything under the config's "out"
    python train/recipe.py train/flickr8k.json --install   # then make it the package's bundled model
    python train/recipe.py train/flickr8k.json --seeds 3 4 --out runs/draw2   # another draw, for the spread

Run it from the repository root (the config's paths are relative to it). Interrupted (Ctrl-C, a crash,
a reboot), the same command continues: finished runs are kept, cross-entropy runs resume mid-epoch, an
unfinished SCST run starts again. Wall time per phase and peak memory (all processes together, sampled
every second) go to OUT/recipe.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from captioner.checkpoint import atomic_write_bytes, atomic_write_text, load_tensors, prepare_out_dir, save_tensors
from captioner.config import RecipeConfig, TrainConfig
from captioner.encoders import ENCODER_DIMS
from captioner.errors import CaptionerError
from captioner.inference import bundle


def _rss_mb(roots: list[int]) -> float:
    """Resident memory of `roots` and all their descendants (DataLoader workers too), in MB."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, todo = 0, list(roots)
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class Recipe:
    def __init__(self, config: Path, cache_dir: str | None, seeds: list[int] | None = None, out: str | None = None):
        try:
            conf = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CaptionerError(f"cannot read recipe {config}: {e}") from None
        if not isinstance(conf, dict):
            raise CaptionerError(f"{config} must hold a JSON object")
        conf = {**conf, **({"seeds": seeds} if seeds else {}), **({"out": out} if out else {})}
        self.config = config
        self.recipe, options = RecipeConfig.split(conf, str(config))
        self.seeds, self.scst, self.keep, self.storage = (self.recipe.seeds, self.recipe.scst, self.recipe.keep,
                                                         self.recipe.storage)
        if cache_dir:
            options["cache_dir"] = cache_dir
        self.cfg = TrainConfig.from_dict(options).validate()
        encoders = self.recipe.encoders or [self.cfg.encoder] * len(self.seeds)
        if len(set(encoders)) > 1 and (self.cfg.fine_tune_blocks or len({ENCODER_DIMS[e] for e in encoders}) > 1):
            raise CaptionerError(f'"encoders" in {config}: members that read different CNNs must not fine-tune them '
                                 f'and need CNNs with features of one size')
        self.encoders = dict(zip(self.seeds, encoders))
        self.out = Path(self.cfg.out)
        self.peak_mb = 0.0
        self.seconds: dict[str, float] = {}

    def _data_flags(self) -> list[str]:
        data = self.cfg.data if isinstance(self.cfg.data, list) else [self.cfg.data]
        return [a for d in data for a in ("--data", str(d))]

    def _common(self) -> list[str]:
        c = self.cfg
        flags = [("--cache-dir", c.cache_dir), ("--images", c.images), ("--device", c.device)]
        return [a for flag, v in flags if v for a in (flag, str(v))] + ["--workers", str(c.workers), "--quiet"]

    def _run(self, jobs: list[tuple[str, list[str]]]) -> None:
        """Run the jobs side by side, each with an equal share of the cores; one-line error if any fails."""
        threads = max(1, (os.cpu_count() or 1) // max(1, len(jobs)))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        procs = []
        for name, args in jobs:
            log = open(self.out / f"{name}.log", "a")
            print(f"  {name}: {' '.join(args)}", flush=True)
            # Own process group: Ctrl-C reaches the recipe only, which then stops each run once, cleanly.
            procs.append((name, subprocess.Popen([sys.executable, "-m", "captioner", *args], stdout=log,
                                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)))
        try:
            while any(p.poll() is None for _, p in procs):
                self.peak_mb = max(self.peak_mb, _rss_mb([os.getpid()] + [p.pid for _, p in procs if p.poll() is None]))
                time.sleep(1)
        except KeyboardInterrupt:
            for _, p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)  # the runs save their exact place
            for _, p in procs:
                p.wait()
            raise CaptionerError("interrupted; the runs saved their place: run the same command to continue") from None
        for name, p in procs:
            if p.returncode != 0:
                lines = (self.out / f"{name}.log").read_text(errors="replace").strip().splitlines()
                raise CaptionerError(f"{name} failed ({lines[-1] if lines else 'no output'}); "
                                     f"see {self.out / (name + '.log')}")

    def _phase(self, name: str, fn) -> None:
        t = time.time()
        print(f"[{name}]", flush=True)
        fn()
        self.seconds[name] = round(time.time() - t, 1)
        print(f"[{name}] {self.seconds[name]:.0f} s", flush=True)

    def features(self) -> None:
        # Once, before the parallel runs would all compute (and race to write) the same cache.
        from captioner.train import cache_features, training_encoder, training_records
        _, tr, dev = training_records(self.cfg)
        for name in dict.fromkeys(self.encoders.values()):
            cfg = replace(self.cfg, encoder=name)
            encoder = training_encoder(cfg)
            fs = cache_features(cfg, encoder, [r.image for r in tr + dev], progress=True)
            self.peak_mb = max(self.peak_mb, _rss_mb([os.getpid()]))
            del fs, encoder

    def cross_entropy(self) -> None:
        jobs = []
        for s in self.seeds:
            run = self.out / f"xe-s{s}"
            if (run / "summary.json").is_file():
                print(f"  xe-s{s}: finished earlier, kept", flush=True)
            elif (run / "state.safetensors").is_file():
                jobs.append((f"xe-s{s}", ["train", "--resume", str(run), "--quiet"]))
            else:
                jobs.append((f"xe-s{s}", ["train", "--config", str(self.config), "--out", str(run), "--seed", str(s),
                                          "--encoder", self.encoders[s], "--overwrite", *self._common()]))
        self._run(jobs)

    def self_critical(self) -> None:
        jobs = []
        for s in self.seeds:
            run = self.out / f"scst-s{s}"
            if (run / "finished").is_file():
                print(f"  scst-s{s}: finished earlier, kept", flush=True)
                continue
            args = ["train", "--scst", "--init", str(self.out / f"xe-s{s}" / "best.safetensors"), *self._data_flags(),
                    "--out", str(run), "--seed", str(s), *self._common()]
            for key, value in self.scst.items():
                args += ["--" + key.replace("_", "-"), str(value)]
            jobs.append((f"scst-s{s}", args))
        self._run(jobs)
        for s in self.seeds:
            atomic_write_text(self.out / f"scst-s{s}" / "finished", "")

    def combine_and_score(self) -> dict:
        """Score every seed's final model on dev (the spread), then bundle: all of them as one ensemble
        ("keep": "ensemble"), or the best one alone ("keep": "best", for decoders too big to ship twice)."""
        from captioner.evaluate import evaluate

        from captioner.data import load_dataset
        sources = self.cfg.data if isinstance(self.cfg.data, list) else [self.cfg.data]
        dev_sources = []  # each source with a dev split is scored on its own
        for d in sources:
            try:
                load_dataset(d, split="dev", images=self.cfg.images)
                dev_sources.append(d)
            except CaptionerError:
                pass

        def score(ckpt: Path, name: str) -> dict:
            res = {}
            for i, d in enumerate(dev_sources):
                r = evaluate(ckpt, d, split="dev", out_dir=self.out / (name + (f"-{i}" if i else "")),
                             images=self.cfg.images, cache_dir=self.cfg.cache_dir, workers=self.cfg.workers,
                             progress=False)
                res = {**r, "metrics": r["metrics"] if not res else res["metrics"],
                       "by_source": {**res.get("by_source", {}), d: r["metrics"]}}
            return res

        stage = "scst" if self.scst else "xe"
        runs = {s: self.out / f"{stage}-s{s}" / "best.safetensors" for s in self.seeds}
        per_seed = {s: score(ckpt, f"eval-dev-s{s}")["by_source"] for s, ckpt in runs.items()}
        if self.keep == "best":
            kept = [max(self.seeds, key=lambda s: per_seed[s][dev_sources[0]]["BLEU-4"])]
        else:
            kept = self.seeds
        what = bundle(self.out / "model.safetensors", [runs[s] for s in kept], storage=self.storage)
        print(f"  bundled {what}: seed(s) {kept}", flush=True)
        res = score(self.out / "model.safetensors", "eval-dev")
        decoding = {k: res["settings"][k] for k in ("beam_size", "rerank", "rerank_fmean", "length_penalty",
                                                    "block_trigrams", "block_repeats", "views", "precision")}
        self.write_card(self.out / "model.safetensors", res["by_source"], decoding)
        return {"metrics": res["by_source"], "per_seed": per_seed, "kept": kept, "storage": self.storage,
                "decoding": decoding}

    def write_card(self, path: Path, scores: dict[str, dict], decoding: dict) -> None:
        """The model's card (captioner/card.py) into its metadata: name, data, recipe, scores as measured."""
        from captioner.card import make_card
        tensors, meta = load_tensors(path)
        name = self.recipe.name or f"captioner-{self.config.stem}"
        trained_on = [_data_name(d) + (" train" if "dev" in _splits(d, self.cfg.images) else "")
                      for d in self.cfg.sources if "train" in _splits(d, self.cfg.images)]
        card = make_card(meta, name, trained_on,
                         str(self.config), {_data_name(d) + " dev": {
                             "metrics": m, "decoding": decoding,
                             "command": f"captioner evaluate --data {d} --split dev"} for d, m in scores.items()})
        save_tensors(path, tensors, {**meta, "card": card})

    def run(self, install: bool) -> None:
        t0 = time.time()
        prepare_out_dir(self.out, "recipe folder")
        self._phase("features", self.features)
        self._phase("cross-entropy", self.cross_entropy)
        if self.scst:
            self._phase("scst", self.self_critical)
        result: dict = {}
        self._phase("bundle+eval", lambda: result.update(self.combine_and_score()))
        self.seconds["total"] = round(time.time() - t0, 1)
        size = (self.out / "model.safetensors").stat().st_size / 1e6
        report = {"config": str(self.config), "seeds": self.seeds, "seconds": self.seconds,
                  "peak_rss_mb_all_processes": round(self.peak_mb), "model_mb": round(size, 1),
                  "dev": result["metrics"], "dev_per_seed": result["per_seed"], "kept_seeds": result["kept"],
                  "storage": result["storage"], "decoding": result["decoding"],
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
        # A continued recipe keeps the earlier invocations' figures: their sum is the recipe's cost.
        history = self.out / "recipe.json"
        old = json.loads(history.read_text()) if history.is_file() else None
        earlier = old.get("invocations", [old]) if old else []
        invocations = earlier + [report]
        atomic_write_text(history, json.dumps({**report, "invocations": invocations, "total_seconds_all_invocations":
                                               round(sum(r["seconds"]["total"] for r in invocations), 1)}, indent=2))
        print(json.dumps(report, indent=2))
        if install:
            from captioner.inference import BUNDLED_MODEL
            atomic_write_bytes(BUNDLED_MODEL, (self.out / "model.safetensors").read_bytes())
            print(f"installed as {BUNDLED_MODEL}")


def _data_name(path: str) -> str:
    """A data source as people name it: its folder (flickr8k, coco-train-2k), not a local path."""
    p = Path(path)
    return p.parent.name if p.suffix else p.name


def _splits(path: str, images: str | None) -> set[str]:
    from captioner.data import load_dataset
    return {r.split for r in load_dataset(path, images=images).records}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="recipe JSON: training options plus 'seeds' and 'scst' (e.g. train/flickr8k.json)")
    p.add_argument("--install", action="store_true", help="copy the result over the package's bundled model")
    p.add_argument("--cache-dir", help="feature cache folder (default: ~/.cache/captioner/features)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="N",
                   help="these seeds instead of the config's: another draw of the same recipe, for its spread")
    p.add_argument("--out", help="recipe folder instead of the config's \"out\"")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # a `kill` stops the runs as cleanly as Ctrl-C
    try:
        Recipe(Path(args.config), args.cache_dir, args.seeds, args.out).run(args.install)
    except CaptionerError as e:
        sys.exit(f"recipe: {e}")
    except KeyboardInterrupt:
        sys.exit("recipe: interrupted; run the same command to continue")


if __name__ == "__main__":
    main()
