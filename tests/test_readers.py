import json


import pytest

from captioner.data import detect_kind, load_dataset
from captioner.errors import CaptionerError
from conftest import make_images


def test_flickr_layout_with_only_test_split(tmp_path):
    make_images(tmp_path / "images", 3)
    (tmp_path / "Flickr8k.token.txt").write_text(
        "img0.jpg#0\tA dog runs .\nimg0.jpg#1\tA brown dog .\nimg1.jpg#0\tA cat sits .\nimg2.jpg#0\tNot listed .\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("img0.jpg\nimg1.jpg\n")
    ds = load_dataset(tmp_path)
    assert detect_kind(tmp_path) == "flickr"
    assert [r.split for r in ds.records] == ["test", "test"]
    assert ds.records[0].captions == ["A dog runs .", "A brown dog ."]
    assert len(load_dataset(tmp_path, split="test")) == 2
    with pytest.raises(CaptionerError, match="no images in split 'train'"):
        load_dataset(tmp_path, split="train")


def test_coco_annotations_skip_missing_images(tmp_path):
    make_images(tmp_path / "val2017", 2)
    ann = {"images": [{"id": i, "file_name": f"img{i}.jpg"} for i in range(4)],
           "annotations": [{"id": 10 + i, "image_id": i % 4, "caption": f"caption {i}"} for i in range(8)]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(ann))
    ds = load_dataset(tmp_path / "captions_val2017.json")
    assert ds.kind == "coco" and len(ds) == 2 and len(ds.missing_images) == 2
    assert ds.records[0].captions == ["caption 0", "caption 4"] and ds.records[0].split == "dev"


def test_karpathy_split_file(tmp_path):
    make_images(tmp_path / "images", 3)
    entries = [{"filename": f"img{i}.jpg", "imgid": i, "split": s,
                "sentences": [{"raw": f"a photo number {i}", "tokens": ["a", "photo"]}]}
               for i, s in enumerate(["train", "restval", "val"])]
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": entries, "dataset": "flickr8k"}))
    ds = load_dataset(tmp_path / "dataset_flickr8k.json")
    assert ds.kind == "karpathy"
    assert [r.split for r in ds.records] == ["train", "train", "dev"]  # restval joins train
    assert len(load_dataset(tmp_path, split="val")) == 1


def test_csv_and_jsonl(tmp_path):
    make_images(tmp_path, 2)
    (tmp_path / "caps.csv").write_text("image,caption,split\nimg0.jpg,a red square,train\n"
                                       "img0.jpg,a red box,train\nimg1.jpg,a blue thing,test\n")
    ds = load_dataset(tmp_path / "caps.csv")
    assert ds.kind == "csv" and len(ds) == 2 and ds.records[0].captions == ["a red square", "a red box"]
    (tmp_path / "caps.jsonl").write_text('{"image": "img1.jpg", "caption": "x"}\n{"image": "gone.jpg", "caption": "y"}\n')
    ds = load_dataset(tmp_path / "caps.jsonl")
    assert len(ds) == 1 and ds.missing_images[0].endswith("gone.jpg")


@pytest.mark.parametrize("content,name,msg", [
    ("hello", "notes.txt", "cannot tell what dataset"),
    ("{not json", "x.json", "not valid JSON"),
    ("a,b\n1,2\n", "bad.csv", "'image' and 'caption'"),
])
def test_bad_data_paths_give_clear_errors(tmp_path, content, name, msg):
    (tmp_path / name).write_text(content)
    with pytest.raises(CaptionerError, match=msg):
        load_dataset(tmp_path / name)


def test_missing_path(tmp_path):
    with pytest.raises(CaptionerError, match="not found"):
        load_dataset(tmp_path / "nope")


def test_real_flickr8k(flickr8k):
    ds = load_dataset(flickr8k)
    assert len(ds.split("train")) == 6000 and len(ds.split("dev")) == 1000
    assert sum(len(r.captions) for r in ds.records) == 35000
    assert all(r.image.is_file() for r in ds.records[:50])


def test_real_coco_val2017_via_pycocotools(coco_mini):
    ds = load_dataset(coco_mini / "captions_val2017.json")
    assert len(ds) == 159 and len(ds.missing_images) == 5000 - 159
    assert all(len(r.captions) >= 5 for r in ds.records)
    assert isinstance(ds.records[0].image_id, int)


def test_several_sources_read_as_one_and_mix_by_weight(tmp_path):
    """--data A --data B: one dataset whose records know their source; an epoch draws each source's captions
    in proportion to its size, or as --source-weights says (a small source repeated, a large one cut)."""
    import torch
    from captioner.data import load_sources
    from captioner.train import epoch_order
    from conftest import make_images
    for name, n, split in (("a", 6, "train"), ("b", 2, "dev")):
        make_images(tmp_path / name, n)
        (tmp_path / name / "c.csv").write_text("image,caption,split\n" + "".join(
            f"img{i}.jpg,a photo,{split}\n" for i in range(n)))
    ds = load_sources([str(tmp_path / "a" / "c.csv"), str(tmp_path / "b" / "c.csv")])
    assert [(r.source, r.split) for r in ds.records] == [(0, "train")] * 6 + [(1, "dev")] * 2
    sources = [0] * 30 + [1] * 10
    g = torch.Generator().manual_seed(0)
    plain = epoch_order(sources, None, g)
    assert sorted(plain) == list(range(40))
    balanced = epoch_order(sources, [1, 1], g)
    assert len(balanced) == 40 and sum(sources[i] for i in balanced) == 20
    assert len({i for i in balanced if sources[i] == 1}) == 10  # every caption of the small source, twice
    only_a = epoch_order(sources, [1, 0], g)
    assert len(only_a) == 40 and all(sources[i] == 0 for i in only_a)
