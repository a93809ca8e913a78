"""vision.data: local fixtures in each real layout -> records the policy consumes."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import datasets
import pytest
from PIL import Image

from mmrl.data import BadSample, PromptSampler
from vision import data as vdata
from vision.data import (
    PROMPT_TEMPLATES,
    VisionDataConfig,
    VisionDataset,
    apply_template,
    build_datasets,
    load_rows,
    to_sft_rows,
)


def _png(path: Path, mode: str = "RGB", colour=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        Image.new("RGB", (8, 8), colour).convert("P").save(path)
    elif mode == "RGBA":
        Image.new("RGBA", (8, 8), (*colour, 0)).save(path)  # fully transparent -> white
    elif mode == "L":
        Image.new("L", (8, 8), 128).save(path)
    else:
        Image.new("RGB", (8, 8), colour).save(path)
    return path


def _png_bytes(colour=(0, 0, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), colour).save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _is_rgb(images) -> bool:
    return all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)


@pytest.fixture
def easyr1_jsonl(tmp_path: Path) -> Path:
    _png(tmp_path / "imgs" / "red.png")
    _png(tmp_path / "imgs" / "pal.png", "P", (0, 255, 0))
    _png(tmp_path / "imgs" / "alpha.png", "RGBA")
    _png(tmp_path / "imgs" / "grey.png", "L")
    rows = [
        {"images": ["imgs/red.png"], "problem": "<image>What colour is the square?", "answer": "red", "level": 1},
        {"images": ["imgs/pal.png", "imgs/alpha.png"], "problem": "Compare <image> with <image> please.",
         "answer": "green", "level": 2},
        {"images": ["imgs/grey.png"], "problem": "How bright is it?", "answer": 7, "level": 3},
    ]
    return _jsonl(tmp_path / "train.jsonl", rows)


def test_easyr1_jsonl_records(easyr1_jsonl: Path):
    train, ev = build_datasets(VisionDataConfig(train=str(easyr1_jsonl), template="answer"))
    assert ev is None and len(train) == 3 and train.layout.kind == "easyr1"
    rec = train[0]
    assert rec["prompt"] == [{"role": "user", "content": [
        {"type": "image"},
        {"type": "text", "text": "What colour is the square?\nAnswer with <answer>...</answer>."},
    ]}]
    assert rec["answer"] == "red" and rec["level"] == 1 and set(rec) == {"prompt", "images", "answer", "level"}
    assert _is_rgb(rec["images"]) and rec["images"][0].getpixel((0, 0)) == (255, 0, 0)

    two = train[1]
    assert [p["type"] for p in two["prompt"][0]["content"]] == ["text", "image", "text", "image", "text"]
    assert two["prompt"][0]["content"][0]["text"] == "Compare"
    assert _is_rgb(two["images"]) and len(two["images"]) == 2
    assert two["images"][0].getpixel((0, 0)) == (0, 255, 0)  # palette
    assert two["images"][1].getpixel((0, 0)) == (255, 255, 255)  # transparent on white

    # No placeholder: images first; numeric answers become text for the reward functions.
    third = train[2]
    assert [p["type"] for p in third["prompt"][0]["content"]] == ["image", "text"]
    assert third["answer"] == "7" and _is_rgb(third["images"])
    assert train[-1]["level"] == 3
    with pytest.raises(IndexError):
        train[3]


def test_templates_and_system_prompt(easyr1_jsonl: Path):
    for name in ("r1", "boxed", "none"):
        cfg = VisionDataConfig(train=str(easyr1_jsonl), template=name, system_prompt="Be brief.")
        rec = build_datasets(cfg)[0][0]
        assert rec["prompt"][0] == {"role": "system", "content": "Be brief."}
        text = rec["prompt"][1]["content"][-1]["text"]
        assert text == apply_template("What colour is the square?", name)
    assert "<think>" in PROMPT_TEMPLATES["r1"] and "<answer>" in PROMPT_TEMPLATES["r1"]
    assert "\\boxed{}" in apply_template("q", "boxed")
    assert apply_template("q", "none") == "q"
    assert apply_template("q", "Q: {question} A:") == "Q: q A:"  # custom format string
    with pytest.raises(ValueError, match=r"unknown prompt template 'cot'.*'answer'.*'r1'"):
        build_datasets(VisionDataConfig(train=str(easyr1_jsonl), template="cot"))


def test_easyr1_parquet_with_image_bytes(tmp_path: Path):
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "problem": datasets.Value("string"),
        "answer": datasets.Value("string"),
    })
    ds = datasets.Dataset.from_dict({
        "images": [[{"bytes": _png_bytes(), "path": None}], [{"bytes": b"not an image", "path": None}],
                   [{"bytes": _png_bytes(), "path": None}]],
        "problem": ["<image>Which colour?", "<image>Broken?", "<image><image>Two placeholders, one image."],
        "answer": ["blue", "x", "y"],
    }, features=features)
    path = tmp_path / "data.parquet"
    ds.to_parquet(str(path))

    train, _ = build_datasets(VisionDataConfig(train=str(path), template="none"))
    rec = train[0]
    assert rec["answer"] == "blue" and rec["images"][0].getpixel((0, 0)) == (0, 0, 255) and _is_rgb(rec["images"])
    assert rec["prompt"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "Which colour?"}]
    with pytest.raises(BadSample, match=r"row 1 .*cannot be decoded"):
        train[1]
    with pytest.raises(BadSample, match=r"row 2 .*2 '<image>' placeholders but the row has 1 images"):
        train[2]
    # The trainer's sampler skips the bad rows and keeps going.
    sampler = PromptSampler(train, batch_size=2, seed=0)
    batch = sampler.next_batch()
    assert [r["answer"] for r in batch] == ["blue", "blue"] and sampler.skipped >= 1


def test_trl_conversational_jsonl(tmp_path: Path):
    _png(tmp_path / "pics" / "a.png", colour=(0, 0, 255))
    rows = [
        {"prompt": [{"role": "system", "content": "Old system."},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
         "image": "a.png", "solution": "blue", "source": "x"},
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "No image part here."}]}],
         "image": "a.png", "solution": "blue", "source": "y"},
    ]
    path = _jsonl(tmp_path / "trl.jsonl", rows)
    cfg = VisionDataConfig(train=str(path), template="answer", image_dir=str(tmp_path / "pics"))
    train, _ = build_datasets(cfg)
    assert train.layout.kind == "trl"
    rec = train[0]
    assert rec["prompt"][0] == {"role": "system", "content": "Old system."}
    assert rec["prompt"][1]["content"] == [
        {"type": "image"}, {"type": "text", "text": "What colour?\nAnswer with <answer>...</answer>."}]
    assert rec["answer"] == "blue" and rec["source"] == "x" and "solution" not in rec and "image" not in rec
    assert _is_rgb(rec["images"]) and rec["images"][0].getpixel((0, 0)) == (0, 0, 255)
    assert [p["type"] for p in train[1]["prompt"][0]["content"]] == ["image", "text"]

    # An explicit answer_key and a system prompt from the config (replacing the data's).
    cfg = VisionDataConfig(train=str(path), answer_key="source", image_dir=str(tmp_path / "pics"),
                           system_prompt="New system.", template="none")
    rec = build_datasets(cfg)[0][0]
    assert rec["answer"] == "x" and rec["solution"] == "blue"
    assert [m["role"] for m in rec["prompt"]] == ["system", "user"] and rec["prompt"][0]["content"] == "New system."


def test_custom_column_names(tmp_path: Path):
    _png(tmp_path / "i.png")
    path = _jsonl(tmp_path / "d.json", [{"pics": ["i.png"], "question": "<image>Q?", "label": "A"}])
    cfg = VisionDataConfig(train=str(path), image_key="pics", problem_key="question", answer_key="label",
                           template="none")
    rec = build_datasets(cfg)[0][0]
    assert rec["answer"] == "A" and set(rec) == {"prompt", "images", "answer"}
    assert rec["prompt"][0]["content"][1] == {"type": "text", "text": "Q?"}


def test_missing_column_and_layout_errors(tmp_path: Path):
    path = _jsonl(tmp_path / "d.jsonl", [{"images": [], "problem": "Q"}])
    with pytest.raises(ValueError, match=r"dataset column 'answer' not found.*columns present: \['images', 'problem'\]"
                       r".*set data.answer_key"):
        build_datasets(VisionDataConfig(train=str(path)))
    path = _jsonl(tmp_path / "e.jsonl", [{"text": "Q", "label": "A"}])
    with pytest.raises(ValueError, match=r"cannot tell the layout.*'problem'.*'prompt'"):
        build_datasets(VisionDataConfig(train=str(path)))
    with pytest.raises(ValueError, match="unknown data layout"):
        VisionDataset([{"problem": "q"}], VisionDataConfig(layout="sharegpt"))


def test_bad_images_are_bad_samples(tmp_path: Path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = [{"images": ["corrupt.png"], "problem": "<image>Q", "answer": "a"},
            {"images": ["missing.png"], "problem": "<image>Q", "answer": "a"},
            {"images": [], "problem": "<image>Q", "answer": "a"}]
    ds = VisionDataset(rows, VisionDataConfig(), source_dir=tmp_path)
    with pytest.raises(BadSample, match=r"row 0 .*corrupt.png.*cannot be decoded"):
        ds[0]
    with pytest.raises(BadSample, match=r"row 1 .*file not found.*missing.png"):
        ds[1]
    with pytest.raises(BadSample, match=r"row 2 .*1 '<image>' placeholders but the row has 0 images"):
        ds[2]


def test_missing_local_path_and_hub_errors(tmp_path: Path, monkeypatch):
    for missing in (str(tmp_path / "nope.jsonl"), "data/train.parquet", "./somewhere"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_rows(missing, "train")

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"'someone/some-dataset'.*offline"):
        load_rows("someone/some-dataset", "train")


def test_directory_with_split_files(tmp_path: Path):
    _png(tmp_path / "i.png")
    _jsonl(tmp_path / "train.jsonl", [{"images": ["i.png"], "problem": "train q", "answer": "1"}] * 3)
    _jsonl(tmp_path / "test.jsonl", [{"images": ["i.png"], "problem": "test q", "answer": "2"}] * 2)
    cfg = VisionDataConfig(train=str(tmp_path), eval=str(tmp_path), template="none", max_train_samples=2)
    train, ev = build_datasets(cfg)
    assert len(train) == 2 and len(ev) == 2
    assert train[0]["answer"] == "1" and ev[1]["answer"] == "2" and _is_rgb(ev[1]["images"])
    with pytest.raises(FileNotFoundError, match="none for 'validation'"):
        load_rows(str(tmp_path), "validation")


def _synthetic():
    # vision.synthetic is written alongside this module; give it a moment if it is mid-write.
    for _ in range(3):
        try:
            from vision import synthetic

            return synthetic
        except ImportError:
            time.sleep(1)
    pytest.skip("vision.synthetic is not available")


def test_synthetic_source():
    synthetic = _synthetic()
    assert "colour_at_position" in synthetic.available_synthetic_tasks()
    cfg = VisionDataConfig(eval="synthetic:colour_at_position", max_train_samples=6, max_eval_samples=3,
                           synthetic_options={"image_size": 64})
    train, ev = build_datasets(cfg)
    assert len(train) == 6 and len(ev) == 3
    rec = train[0]
    assert rec["prompt"][0]["content"][0] == {"type": "image"}
    assert "<think>" in rec["prompt"][0]["content"][1]["text"]
    assert _is_rgb(rec["images"]) and rec["images"][0].size == (64, 64)
    assert isinstance(rec["answer"], str) and rec["task"] == "colour_at_position"
    # Default sizes when max_*_samples are unset; synthetic_options.num_samples wins over them.
    assert len(load_rows("synthetic:colour_at_position", "test", default_synthetic_samples=5)) == 5
    rows = load_rows("synthetic:colour_at_position", "train", synthetic_options={"num_samples": 4})
    assert len(rows) == 4


def test_to_sft_rows(easyr1_jsonl: Path):
    train, _ = build_datasets(VisionDataConfig(train=str(easyr1_jsonl), template="answer"))
    rows = to_sft_rows(train, "answer", max_samples=2)
    assert len(rows) == 2
    user, assistant = rows[0]["messages"]
    assert user["role"] == "user" and user["content"][0] == {"type": "image"}
    assert assistant == {"role": "assistant", "content": [{"type": "text", "text": "<answer>red</answer>"}]}
    assert _is_rgb(rows[0]["images"]) and len(rows[1]["images"]) == 2
    assert rows[1]["messages"][0]["content"] == train[1]["prompt"][0]["content"]

    r1 = to_sft_rows(train, "r1")[2]["messages"][-1]["content"][0]["text"]
    assert r1.startswith("<think>") and r1.endswith("</think>\n<answer>7</answer>")
    assert to_sft_rows(train, "boxed")[0]["messages"][-1]["content"][0]["text"] == "\\boxed{red}"
    with pytest.raises(ValueError, match="unknown answer_format"):
        to_sft_rows(train, "xml")

    # Bad rows are skipped, not fatal.
    bad = VisionDataset([{"images": ["missing.png"], "problem": "<image>Q", "answer": "a"},
                         {"images": [Image.new("L", (4, 4))], "problem": "<image>Q", "answer": "b"}],
                        VisionDataConfig(template="answer"))
    rows = to_sft_rows(bad)
    assert len(rows) == 1 and rows[0]["messages"][-1]["content"][0]["text"] == "<answer>b</answer>"
    assert _is_rgb(rows[0]["images"])


def test_sixteen_bit_grey_is_rescaled():
    img = Image.new("I;16", (4, 4), 65535)
    assert vdata._to_rgb(img).getpixel((0, 0)) == (255, 255, 255)
