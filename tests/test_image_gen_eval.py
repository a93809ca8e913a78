"""Image-generation evaluation: the FID Inception (weights format, loading, preprocessing), FID / KID / IS
against torchmetrics, the GenEval-like rule checks on drawn images, and the suite end to end on the tiny model.

The Inception runs at 75² here (``input_size=75``): same weights and code path, ~16x cheaper than 299²."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from image_gen import evaluate as ev
from image_gen.evaluate import (
    EvalSettings,
    check_image,
    cli_main,
    detect_objects,
    evaluate,
    generate,
    geneval_lite_prompts,
    load_generator,
    score_geneval_lite,
)
from image_gen.inception import (
    WEIGHTS_ENV,
    FIDInceptionV3,
    InceptionLogits,
    Precomputed,
    frechet_distance,
    inception_features,
    inception_score,
    kernel_inception_distance,
    load_inception,
    preprocess,
    reference_state_dict,
    resize_tf1,
)
from image_gen.prompts import CATEGORIES, render_spec


def _spec(*objs: tuple[str, str, int], relation: str | None = None) -> dict:
    return {"objects": [{"colour": c, "shape": s, "count": k} for c, s, k in objs], "relation": relation}


def _uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A random FID Inception saved exactly as the released files are: a plain dict, 472 tensors."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):  # He init: PyTorch's default shrinks activations to ~0 by the pool
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics, so a wrong load would show
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(reference_state_dict(net), path)
    return str(path)


@pytest.fixture(scope="module")
def small_net(weights) -> FIDInceptionV3:
    return load_inception(weights, input_size=75)


# --- the Inception network ----------------------------------------------------------------------------------


def test_state_dict_has_the_released_checkpoint_keys():
    sd = reference_state_dict(FIDInceptionV3())
    # 94 conv+BN units (conv.weight, bn.weight/bias/running_mean/running_var) + fc.weight/bias, as written by
    # torch-fidelity's util_convert_inception_weights.py; torchvision's AuxLogits is absent (aux_logits=False).
    assert len(sd) == 94 * 5 + 2
    assert not any(k.startswith("AuxLogits") or k.endswith("num_batches_tracked") for k in sd)
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
        "Mixed_7c.branch3x3dbl_3b.bn.weight": (384,),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_weights_load_by_path_strictly(weights, tmp_path):
    net = load_inception(weights)
    saved = torch.load(weights, weights_only=True)
    assert type(saved) is dict and "Mixed_7c.branch_pool.bn.running_var" in saved
    for key, value in reference_state_dict(net).items():
        assert torch.equal(value, saved[key]), key
    from safetensors.torch import save_file

    save_file(saved, str(tmp_path / "inception.safetensors"))
    again = load_inception(tmp_path / "inception.safetensors")
    assert torch.equal(again.fc.weight, net.fc.weight)
    broken = dict(saved)
    broken["Mixed_6f.branch1x1.conv.weight"] = broken.pop("Mixed_6e.branch1x1.conv.weight")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="Mixed_6e.branch1x1.conv.weight"):
        load_inception(tmp_path / "broken.pth")


def test_missing_weights_name_the_setting(monkeypatch, tmp_path, weights):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="--inception-weights") as info:
        load_inception(None)
    assert WEIGHTS_ENV in str(info.value)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_inception(tmp_path / "nope.pth")
    monkeypatch.setenv(WEIGHTS_ENV, weights)
    assert isinstance(load_inception(None, input_size=75), FIDInceptionV3)


def test_resize_modes_match_their_references():
    x = torch.tensor([[0.0, 10.0]]).view(1, 1, 1, 2).expand(1, 3, 2, 2)
    # TF1 samples at i * in/out = 0, 0.5, 1, 1.5 and clamps the right neighbour: 0, 5, 10, 10
    assert resize_tf1(x, 4)[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 10.0]
    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    tf1 = preprocess(img, "tf1", 80)
    assert torch.allclose(tf1, (resize_tf1(img.float(), 80) - 128) / 128)
    pt = preprocess(img, "pytorch_fid", 80)
    expected = 2 * F.interpolate(img.float() / 255, size=(80, 80), mode="bilinear", align_corners=False) - 1
    assert torch.allclose(pt, expected, atol=1e-6)
    assert torch.allclose(preprocess(img.float() / 255, "tf1", 80), tf1, atol=1e-5)  # float [0,1] == uint8
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess(img.float(), "tf1", 80)


def test_features_shapes_and_logits(small_net):
    img = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    pool, logits = small_net.features(img)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    assert torch.allclose(logits, pool @ small_net.fc.weight.T, atol=1e-4)  # unbiased: no fc bias
    assert torch.allclose(small_net(img), pool)
    assert torch.allclose(small_net.features(img.float() / 255)[0], pool, atol=1e-4)
    assert small_net.train().training is False  # BN keeps its statistics


# --- FID / KID / IS ----------------------------------------------------------------------------------------


def test_frechet_distance_hand_computed():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with unbiased variances 2 and 8: 1 + (sqrt2 - sqrt8)^2 = 3
    assert frechet_distance(torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0], [4.0]])) == pytest.approx(3.0)
    torch.manual_seed(0)
    a = torch.randn(64, 8, dtype=torch.float64)  # float64, so a + 1 is exact enough for rel 1e-9
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=1e-9)  # shift: only the mean term, |1|^2 * 8
    assert frechet_distance(a[:5], a[:5]) == pytest.approx(0.0, abs=1e-9)  # fewer samples than dims


@pytest.mark.parametrize("n_real,n_fake,dim", [(80, 60, 12), (6, 9, 12), (40, 3, 64)])
def test_frechet_distance_equals_torchmetrics(n_real, n_fake, dim):
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(n_real)
    real, fake = torch.randn(n_real, dim), 1.5 * torch.randn(n_fake, dim) + 0.3
    metric = FrechetInceptionDistance(feature=Precomputed(dim))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    assert frechet_distance(real, fake) == pytest.approx(float(metric.compute()), rel=1e-6)


def _image_set(seed: int, n: int = 5) -> list[torch.Tensor]:
    specs = [_spec(("red", "circle", 1)), _spec(("blue", "square", 2)), _spec(("green", "triangle", 1))]
    return [_uint8(render_spec(specs[i % 3], size=32, seed=seed + i)) for i in range(n)]


class _Float64(torch.nn.Module):
    """torchmetrics keeps the extractor's dtype; in float32 KID (~1e-2) and IS std (~1e-4) lose digits."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).double()


@pytest.mark.filterwarnings("ignore:Metric .* will save all extracted features")
def test_pipeline_fid_kid_is_equal_torchmetrics_with_our_module(small_net):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    real = _image_set(0)
    fake = [255 - im for im in _image_set(10)]  # a clearly different set: inverted colours
    real_pool, _ = inception_features(small_net, real, progress=False)
    fake_pool, fake_logits = inception_features(small_net, fake, progress=False)
    same_pool, _ = inception_features(small_net, real, batch_size=2, progress=False)
    assert torch.allclose(same_pool, real_pool, atol=1e-4)  # batching does not change features
    assert frechet_distance(real_pool, same_pool) == pytest.approx(0.0, abs=1e-4)
    fid = frechet_distance(real_pool, fake_pool)
    assert fid > 1e-3

    fid_tm = FrechetInceptionDistance(feature=small_net)  # our module as torchmetrics' custom extractor
    fid_tm.update(torch.stack(real), real=True)
    fid_tm.update(torch.stack(fake), real=False)
    assert fid == pytest.approx(float(fid_tm.compute()), rel=1e-3)

    kid_tm = KernelInceptionDistance(feature=_Float64(small_net), subsets=10, subset_size=4)
    kid_tm.update(torch.stack(real), real=True)
    kid_tm.update(torch.stack(fake), real=False)
    torch.manual_seed(3)
    expected_kid = [float(v) for v in kid_tm.compute()]
    assert kernel_inception_distance(real_pool, fake_pool, subsets=10, subset_size=4, seed=3) == pytest.approx(
        expected_kid, rel=1e-4)

    is_tm = InceptionScore(feature=_Float64(InceptionLogits(small_net)), splits=2)
    is_tm.update(torch.stack(fake))
    torch.manual_seed(5)
    expected_is = [float(v) for v in is_tm.compute()]
    assert inception_score(fake_logits, splits=2, seed=5) == pytest.approx(expected_is, rel=1e-4)


def test_kid_and_is_sanity():
    torch.manual_seed(0)
    a, b = torch.randn(200, 16), torch.randn(200, 16)  # KID is unbiased: ~0 for two draws of one distribution
    same_mean, same_std = kernel_inception_distance(a, b, subsets=10, subset_size=100)
    shifted_mean, _ = kernel_inception_distance(a, b + 1.0, subsets=10, subset_size=100)
    assert abs(same_mean) < 0.02 and 0.0 < same_std < 0.05 and shifted_mean > 5.0
    assert inception_score(torch.zeros(8, 1008), splits=1) == pytest.approx((1.0, 0.0))  # uniform: 1
    confident = 60.0 * torch.eye(1008)[torch.arange(8) % 4]  # 4 classes used equally, each sure of itself
    assert inception_score(confident, splits=1)[0] == pytest.approx(4.0, rel=1e-4)


# --- rule checks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_rule_checks_on_drawn_images(seed):
    red_circle = render_spec(_spec(("red", "circle", 1)), seed=seed)
    assert check_image(red_circle, _spec(("red", "circle", 1)), "single_object")
    assert check_image(red_circle, _spec(("blue", "circle", 1)), "single_object")  # colour is not its test
    assert not check_image(red_circle, _spec(("red", "square", 1)), "single_object")
    assert check_image(red_circle, _spec(("red", "circle", 1)), "colours")
    assert not check_image(red_circle, _spec(("blue", "circle", 1)), "colours")

    three = render_spec(_spec(("green", "triangle", 3)), seed=seed)
    assert [d.shape for d in detect_objects(three)] == ["triangle"] * 3
    assert check_image(three, _spec(("green", "triangle", 3)), "counting")
    assert not check_image(three, _spec(("green", "triangle", 2)), "counting")
    assert not check_image(three, _spec(("green", "triangle", 4)), "counting")

    pair = render_spec(_spec(("red", "circle", 1), ("blue", "square", 1)), seed=seed)
    assert check_image(pair, _spec(("red", "circle", 1), ("blue", "square", 1)), "two_objects")
    assert not check_image(pair, _spec(("red", "circle", 1), ("blue", "triangle", 1)), "two_objects")
    assert check_image(pair, _spec(("red", "circle", 1), ("blue", "square", 1)), "colour_attribution")
    swapped = _spec(("blue", "circle", 1), ("red", "square", 1))  # same shapes, colours bound the other way
    assert check_image(pair, swapped, "two_objects") and not check_image(pair, swapped, "colour_attribution")

    left = _spec(("red", "circle", 1), ("blue", "square", 1), relation="left of")
    scene = render_spec(left, seed=seed)
    assert check_image(scene, left, "position")
    assert check_image(scene, _spec(("blue", "square", 1), ("red", "circle", 1), relation="right of"), "position")
    assert not check_image(scene, dict(left, relation="right of"), "position")
    assert not check_image(scene, _spec(("red", "circle", 1), ("green", "square", 1), relation="left of"), "position")


@pytest.mark.parametrize("size", [32, 64])
def test_every_category_passes_on_its_own_rendering_and_fails_on_blank(size):
    rows, uncovered = geneval_lite_prompts(60, seed=size, split="test")
    assert not uncovered and {r["category"] for r in rows} == set(CATEGORIES)
    images = [render_spec(r["spec"], size=size, seed=i) for i, r in enumerate(rows)]
    summary, passed = score_geneval_lite(images, rows)
    assert all(passed) and summary["overall"] == 1.0 and summary["rule_score"] == pytest.approx(1.0)
    assert all(c["images"] == 10 and c["correct"] == 10 for c in summary["categories"].values())
    blank = [Image.new("RGB", (size, size), "white")] * len(rows)
    summary, passed = score_geneval_lite(blank, rows)
    assert not any(passed) and summary["overall"] == 0.0


def test_geneval_lite_prompts_balanced_deterministic_and_class_restricted():
    from image_gen.task import tiny_classes

    rows, _ = geneval_lite_prompts(24, seed=1)
    assert rows == geneval_lite_prompts(24, seed=1)[0] and rows != geneval_lite_prompts(24, seed=2)[0]
    counts = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
    assert set(counts.values()) == {4}
    for c in CATEGORIES:  # no repeats within a category while its pool lasts
        prompts = [r["prompt"] for r in rows if r["category"] == c]
        assert len(set(prompts)) == len(prompts)
    tiny = tiny_classes()
    rows, uncovered = geneval_lite_prompts(40, seed=0, class_map=tiny, split="all")
    assert uncovered == ["two_objects", "counting", "position", "colour_attribution"]
    assert {r["category"] for r in rows} == {"single_object", "colours"}
    for r in rows:
        assert tiny[r["class_id"]]["spec"] == r["spec"]
    assert len({r["class_id"] for r in rows if r["category"] == "colours"}) == 18  # 20 prompts, 18 classes


# --- end to end -----------------------------------------------------------------------------------------------


def test_tiny_model_suite_end_to_end(tmp_path):
    summary = evaluate(EvalSettings(model="tiny", num_images=16, samples_per_prompt=4, output=str(tmp_path),
                                    progress=False))
    gl = summary["geneval_lite"]
    assert gl["images"] == 16 and gl["prompts"] == 4 and gl["split"] == "all"
    assert set(gl["categories"]) == {"single_object", "colours"}
    assert gl["uncovered"] == ["two_objects", "counting", "position", "colour_attribution"]
    for c in gl["categories"].values():
        assert c["images"] == 8 and c["accuracy"] == c["correct"] / 8
    assert gl["overall"] == pytest.approx(np.mean([c["accuracy"] for c in gl["categories"].values()]))
    assert json.loads((tmp_path / "summary.json").read_text())["geneval_lite"]["overall"] == gl["overall"]
    lines = (tmp_path / "geneval_lite.jsonl").read_text().splitlines()
    assert len(lines) == 16 and sum(json.loads(x)["passed"] for x in lines) == sum(
        c["correct"] for c in gl["categories"].values())
    assert Image.open(tmp_path / "samples.png").size == (160 + 4 * 64, 4 * 64)


def test_generation_is_reproducible_by_seed():
    policy = load_generator("tiny", device="cpu")
    records = [{"prompt": "a red circle", "class_id": 0}, {"prompt": "a blue square", "class_id": 10}]
    a = generate(policy, records, 2, seed=7, batch_size=4, progress=False)
    b = generate(policy, records, 2, seed=7, batch_size=4, progress=False)
    c = generate(policy, records, 2, seed=8, batch_size=4, progress=False)
    assert len(a) == 4 and a[0].shape == (3, 32, 32) and 0.0 <= float(a[0].min()) <= float(a[0].max()) <= 1.0
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_checkpoint_directory_model(tmp_path):
    policy = load_generator("tiny", device="cpu")
    policy.save_pretrained(policy.model, str(tmp_path / "model"))  # what a training checkpoint holds
    summary = evaluate(EvalSettings(model=str(tmp_path / "model"), num_images=4, samples_per_prompt=2,
                                    progress=False))
    assert set(summary["geneval_lite"]["categories"]) == {"single_object", "colours"}  # the tiny classes
    assert summary["geneval_lite"]["images"] == 4 and summary["model_type"] == "c2i"




def test_cli_all_suites(tmp_path, weights, tiny_clip, monkeypatch, capsys):
    reference = tmp_path / "real"
    reference.mkdir()
    for i, im in enumerate(_image_set(0, n=6)):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(reference / f"{i}.png")
    monkeypatch.setattr(ev, "load_inception", functools.partial(load_inception, input_size=75))
    out = tmp_path / "out"
    code = cli_main(["--model", "tiny", "--suite", "geneval_lite,fid,clip", "--reference", str(reference),
                     "--inception-weights", weights, "--clip", tiny_clip, "--num-images", "8",
                     "--samples-per-prompt", "4", "--output", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    fid = summary["fid"]
    assert fid["num_real"] == 6 and fid["num_fake"] == 8 and fid["resize"] == "tf1"
    assert math.isfinite(fid["fid"]) and fid["fid"] > 0 and fid["is_mean"] >= 1.0 - 1e-6
    assert math.isfinite(fid["kid_mean"])
    clip = summary["clip"]
    assert clip["images"] == 8 and 0.0 <= clip["clip_score"] <= 100.0
    assert (out / "reference_features.pt").exists() and (out / "samples.png").exists()
    assert '"overall"' in capsys.readouterr().out
    # the cached reference features give the same FID
    again = evaluate(EvalSettings(model="tiny", suites=["fid"], reference=str(out / "reference_features.pt"),
                                  inception_weights=weights, num_images=8, samples_per_prompt=4, progress=False))
    assert again["fid"]["fid"] == pytest.approx(fid["fid"], rel=1e-5)


def test_cli_bad_input_names_the_setting(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert cli_main(["--suite", "fid", "--reference", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "--inception-weights" in capsys.readouterr().out
    assert cli_main(["--suite", "fid", "--output", str(tmp_path / "o")]) == 2
    assert "--reference" in capsys.readouterr().out
    assert cli_main(["--suite", "clip", "--output", str(tmp_path / "o")]) == 2
    assert "--clip" in capsys.readouterr().out
    assert cli_main(["--suite", "geneval,fid", "--output", str(tmp_path / "o")]) == 2
    assert "geneval_lite" in capsys.readouterr().out
