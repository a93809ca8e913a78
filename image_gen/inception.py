"""The FID InceptionV3 (TensorFlow's 2015-12-05 graph ported to PyTorch) and metrics on its features.

Architecture and parameter names follow the FID Inception of pytorch-fid (``fid_inception_v3``:
torchvision's ``Inception3`` with ``num_classes=1008, aux_logits=False`` and the patched
``FIDInceptionA/C/E_1/E_2`` blocks) and torch-fidelity (``FeatureExtractorInceptionV3``, whose weight
converter ``utils/util_convert_inception_weights.py`` writes exactly these keys, as a plain dict without
BatchNorm ``num_batches_tracked`` entries). So ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid) or
``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity) loads with ``strict=True``. Nothing is
downloaded: the weights path is a setting (:data:`WEIGHTS_ENV` or an argument).

Outputs: 2048-d pool features (FID, KID) and the 1008-way ``logits_unbiased`` (the fc layer without its
bias — torch-fidelity's default feature for the Inception Score).

Resizing to 299×299 (``resize=``):

* ``"tf1"`` (default) — torch-fidelity's: TensorFlow 1.x bilinear (``align_corners=False`` in TF's sense:
  source coordinate = output index × in/out, no half-pixel offset) on 0..255 values, then ``(x-128)/128``.
  This is what the original TF FID code computes; torchmetrics with ``antialias=False`` does the same.
* ``"pytorch_fid"`` — pytorch-fid's: ``F.interpolate(bilinear, align_corners=False)`` on [0, 1] values,
  then ``2x - 1``.

The two differ slightly, so FIDs are only comparable under the same mode (and the same reference set).

Also here: :func:`load_image_folder` / :func:`inception_features` for image sets, and the metrics on
features — :func:`frechet_distance` (our exact low-rank form, equal to torchmetrics'),
:func:`kernel_inception_distance` and :func:`inception_score` (torchmetrics, fed precomputed features so
the network runs once per image for all three).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

WEIGHTS_ENV = "MMRL_INCEPTION_WEIGHTS"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
RESIZE_MODES = ("tf1", "pytorch_fid")


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3, TF's) → ReLU; keys ``conv.weight``, ``bn.*``."""

    def __init__(self, cin: int, cout: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    # TF's 3x3 average pool ignores the zero padding; torchvision's counts it (the FID patch).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 → 17 (``Mixed_6a``); identical in torchvision and the FID net."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        row, col = {"kernel_size": (1, 7), "padding": (0, 3)}, {"kernel_size": (7, 1), "padding": (3, 0)}
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 → 8 (``Mixed_7a``); identical in torchvision and the FID net."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _FIDInceptionE(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def pool(self, x: Tensor) -> Tensor:
        """The pool branch's pooling: average in E_1, max in E_2 (the subclasses below)."""
        raise NotImplementedError("use FIDInceptionE_1 or FIDInceptionE_2")

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(self.pool(x))], 1)


class FIDInceptionE_1(_FIDInceptionE):  # noqa: N801  (the reference implementations' name)
    def pool(self, x: Tensor) -> Tensor:
        return _tf_avg_pool(x)


class FIDInceptionE_2(_FIDInceptionE):  # noqa: N801
    def pool(self, x: Tensor) -> Tensor:
        # The TF graph max-pools here (other Inceptions average): part of what makes FID features FID's.
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def resize_tf1(x: Tensor, size: int) -> Tensor:
    """TensorFlow 1.x ``resize_bilinear(align_corners=False)``: sample at ``i * in/out`` (no half-pixel
    centres), clamp the upper neighbour at the border. Matches torch-fidelity's resize."""

    def axis(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), (pos - lo.float()).to(x.dtype)

    ylo, yhi, dy = axis(x.shape[2])
    xlo, xhi, dx = axis(x.shape[3])
    top, bottom = x[:, :, ylo], x[:, :, yhi]
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * dx
    bottom = bottom[..., xlo] + (bottom[..., xhi] - bottom[..., xlo]) * dx
    return top + (bottom - top) * dy.view(1, 1, -1, 1)


def preprocess(images: Tensor, resize: str = "tf1", size: int = INPUT_SIZE) -> Tensor:
    """uint8 [B,3,H,W] (0..255) or float in [0, 1] → the network's input range at ``size``²."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}; valid: {list(RESIZE_MODES)}")
    if images.dtype == torch.uint8:
        x255 = images.float()
    elif images.is_floating_point():
        if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
            raise ValueError("float images must be in [0, 1] (use uint8 for 0..255)")
        x255 = images.float() * 255.0
    else:
        raise TypeError(f"images must be uint8 or float, got {images.dtype}")
    if resize == "tf1":
        x = x255 if x255.shape[-2:] == (size, size) else resize_tf1(x255, size)
        return (x - 128.0) / 128.0
    x = x255 / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0


class FIDInceptionV3(nn.Module):
    """FID InceptionV3. ``forward`` gives the 2048-d pool features (so an instance can be passed to
    torchmetrics' FID / KID as ``feature=``); :meth:`features` gives pool features and logits at once.

    ``input_size`` other than 299 is for fast tests only (the net is fully convolutional down to 75²):
    features are then not comparable with anyone's FID.
    """

    num_features = POOL_DIM  # read by torchmetrics instead of probing with a dummy 299² image

    def __init__(self, resize: str = "tf1", input_size: int = INPUT_SIZE) -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize={resize!r}; valid: {list(RESIZE_MODES)}")
        if input_size < 75:
            raise ValueError(f"input_size must be >= 75 (InceptionV3's smallest input), got {input_size}")
        self.resize, self.input_size = resize, input_size
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FIDInceptionV3:
        return super().train(False)  # BatchNorm must keep TF's statistics: never leave eval mode

    def pool_features(self, images: Tensor) -> Tensor:
        w = self.fc.weight
        x = preprocess(images.to(w.device), self.resize, self.input_size).to(w.dtype)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1).float()

    def logits_unbiased(self, pool: Tensor) -> Tensor:
        """The 1008 logits without the fc bias (torch-fidelity's Inception-Score feature)."""
        return (pool.to(self.fc.weight.dtype) @ self.fc.weight.T).float()

    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(pool [B, 2048], logits_unbiased [B, 1008])`` from one pass."""
        pool = self.pool_features(images)
        return pool, self.logits_unbiased(pool)

    def forward(self, images: Tensor) -> Tensor:
        return self.pool_features(images)


class InceptionLogits(nn.Module):
    """The logits view of a :class:`FIDInceptionV3`, for torchmetrics' ``InceptionScore(feature=...)``."""

    num_features = NUM_LOGITS

    def __init__(self, net: FIDInceptionV3) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> Tensor:
        return self.net.features(images)[1]


def resolve_weights_path(path: str | os.PathLike | None) -> Path:
    """The weights file from the argument, else ``$MMRL_INCEPTION_WEIGHTS``; a clear error otherwise."""
    chosen = path if path not in (None, "") else os.environ.get(WEIGHTS_ENV)
    hint = (f"set --inception-weights PATH (Python: inception_weights=PATH) or ${WEIGHTS_ENV} to the FID "
            f"Inception weights, e.g. {WEIGHTS_FILE} from pytorch-fid's GitHub releases "
            "(nothing is downloaded at run time)")
    if chosen is None:
        raise FileNotFoundError(f"no FID Inception weights given: {hint}")
    resolved = Path(chosen).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"FID Inception weights not found at {str(resolved)!r}: {hint}")
    return resolved


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   resize: str = "tf1", input_size: int = INPUT_SIZE) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` and load the weights file (``.pth`` or ``.safetensors``) strictly."""
    file = resolve_weights_path(path)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    net = FIDInceptionV3(resize=resize, input_size=input_size)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{file} is not an FID InceptionV3 state dict (expected pytorch-fid's / "
                           f"torch-fidelity's key names): {exc}") from None
    return net.to(device)


def reference_state_dict(net: FIDInceptionV3) -> dict[str, Tensor]:
    """``net``'s weights in the released checkpoints' format: a plain dict of the 472 tensors the
    converter writes (no ``num_batches_tracked``). Used to write test fixtures."""
    return {k: v.clone() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


# --- features of image sets ---------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_image_folder(folder: str | os.PathLike) -> list[Tensor]:
    """Every image under ``folder`` (recursively, sorted) as uint8 [3, H, W]."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"reference {str(root)!r} (--reference) is not a directory of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"reference {str(root)!r} (--reference) holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1) for f in files]


@torch.no_grad()
def inception_features(net: FIDInceptionV3, images: list[Tensor], batch_size: int = 32, progress: bool = True,
                       desc: str = "inception") -> tuple[Tensor, Tensor]:
    """``(pool [n, 2048], logits [n, 1008])``; consecutive images of one size are batched together."""
    pools, logits = [], []
    with tqdm(total=len(images), desc=desc, disable=not progress) as bar:
        start = 0
        while start < len(images):
            end = start + 1
            while end < len(images) and end - start < batch_size and images[end].shape == images[start].shape:
                end += 1
            pool, logit = net.features(torch.stack(images[start:end]))
            pools.append(pool.cpu())
            logits.append(logit.cpu())
            bar.update(end - start)
            start = end
    return torch.cat(pools), torch.cat(logits)


# --- metrics on features ------------------------------------------------------------------------------


def _cov_factor(x: Tensor) -> Tensor:
    """``F`` with ``F @ F.T`` = the unbiased covariance of the rows of ``x`` [n, d]: the centred data when
    n <= d (exact and cheap: FID from a few thousand samples never needs a d×d eigendecomposition),
    else the covariance's eigen-factor."""
    n = x.shape[0]
    centred = (x - x.mean(0)) / math.sqrt(n - 1)
    if n <= x.shape[1]:
        return centred.T
    evals, evecs = torch.linalg.eigh(centred.T @ centred)
    return evecs * evals.clamp_min(0).sqrt()


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [n, d] (unbiased covariances).

    ``tr sqrt(S1 S2)`` is the nuclear norm of ``F1ᵀ F2`` for any factors ``Si = Fi Fiᵀ`` (the eigenvalues of
    S1 S2 are the squared singular values of F1ᵀ F2), so no non-symmetric ``sqrtm`` / ``eigvals`` is needed:
    symmetric, stable, and O(n²d) when there are fewer samples than dimensions. Equals torchmetrics'
    ``FrechetInceptionDistance`` on the same features (tested).
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected feature matrices [n, d] of equal d, got {tuple(real.shape)}, {tuple(fake.shape)}")
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError("FID needs at least 2 samples in each set")
    real, fake = real.double(), fake.double()
    f1, f2 = _cov_factor(real), _cov_factor(fake)
    mean_term = (real.mean(0) - fake.mean(0)).square().sum()
    cross = torch.linalg.svdvals(f1.T @ f2).sum()
    return float(mean_term + f1.square().sum() + f2.square().sum() - 2 * cross)


class Precomputed(nn.Module):
    """Identity "feature extractor": lets torchmetrics' metrics consume features computed once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def _quietly(cls: type, **kwargs):
    with warnings.catch_warnings():  # "will save all extracted features in buffer": they are the features
        warnings.simplefilter("ignore", UserWarning)
        return cls(**kwargs)


def kernel_inception_distance(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over random subsets) via torchmetrics; ``subset_size`` is capped at the set sizes."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    metric = _quietly(KernelInceptionDistance, feature=Precomputed(real.shape[1]), subsets=subsets,
                      subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the global RNG: seed it, locally
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) via torchmetrics from ``logits_unbiased`` [n, 1008]."""
    from torchmetrics.image.inception import InceptionScore

    metric = _quietly(InceptionScore, feature=Precomputed(logits.shape[1]),
                      splits=max(1, min(splits, logits.shape[0])))
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # std of a single split: NaN, reported as 0 below
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(0.0 if torch.isnan(std) else std)
