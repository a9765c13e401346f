import json



from captioner.data import load_dataset
from captioner.metrics import bleu, coco_bleu


def test_nltk_bleu_agrees_with_coco_toolkit_on_flickr8k_dev(flickr8k):
    refs = [r.captions for r in load_dataset(flickr8k, split="dev").records]
    # Each image's first human caption, scored against the other four: real, varied sentences.
    hyps, others = [r[0] for r in refs], [r[1:] for r in refs]
    ours, theirs = bleu(hyps, others), coco_bleu(hyps, others)
    for n in range(1, 5):
        assert abs(ours[f"BLEU-{n}"] - theirs[f"BLEU-{n}"]) / 100 < 0.002, (n, ours, theirs)
    assert 10 < ours["BLEU-4"] < 40


def test_evaluate_cli_writes_coco_results(coco_mini, tmp_path):
    from captioner.cli import main
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(coco_mini / "captions_val2017.json"), "--split", "val",
                 "--beam-size", "2", "--limit", "40", "--out", str(out), "--quiet",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "METEOR"):
        assert 0 <= metrics[name] <= 100, name
    assert metrics["settings"]["beam_size"] == 2 and metrics["settings"]["images"] == 40
    assert metrics["settings"]["block_trigrams"] is True  # the shipped default
    from pycocotools.coco import COCO
    coco = COCO(str(coco_mini / "captions_val2017.json"))
    res = coco.loadRes(str(out / "predictions.json"))  # the official toolkit accepts our results file
    assert len(res.getImgIds()) == 40
    page = (out / "report.html").read_text()
    assert page.count("<tr>") == 41 and "data:image/jpeg;base64," in page
